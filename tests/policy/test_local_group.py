"""run_local_group (train.processes): a gloo group started from Python, its result, its failures.

The training itself through train.processes is tested in test_training.py (same weights as torchrun)."""
import os
import signal

import pytest
import torch
import torch.distributed as dist

from policy.distributed import init_distributed, run_local_group, shutdown


def summed_rank(offset: float) -> float:
    info = init_distributed("cpu")
    t = torch.tensor([float(info.rank) + offset])
    dist.all_reduce(t)
    shutdown(info)
    return float(t[0]) + 100 * info.rank  # only rank 0's value comes back


def fail_on_rank_1() -> None:
    info = init_distributed("cpu")
    if info.rank == 1:
        raise KeyError("rank 1's own error")
    dist.barrier()  # rank 0 waits here until the group is ended


def die_on_rank_1() -> None:
    info = init_distributed("cpu")
    if info.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def threads_and_rank() -> tuple[int, int, int]:
    info = init_distributed("cpu")
    return torch.get_num_threads(), info.rank, info.world_size


def test_the_group_returns_rank_0s_value_and_sets_threads():
    assert run_local_group(summed_rank, (0.5,), 2) == pytest.approx(2.0)  # (0 + .5) + (1 + .5), from rank 0
    assert run_local_group(threads_and_rank, (), 2, threads=1) == (1, 0, 2)


def test_a_members_error_is_raised_as_itself_and_ends_the_group():
    import multiprocessing

    with pytest.raises(KeyError, match="rank 1's own error"):
        run_local_group(fail_on_rank_1, (), 2)
    with pytest.raises(RuntimeError, match=r"train\.processes: process 1 of 2 was killed by SIGKILL \(out of memory\?"):
        run_local_group(die_on_rank_1, (), 2)
    assert not multiprocessing.active_children()


def test_no_group_inside_a_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"train\.processes: expected 1 inside a process group that is already "
                                         r"running \(torchrun or train\.processes; WORLD_SIZE=2\), got 2"):
        run_local_group(threads_and_rank, (), 2)
