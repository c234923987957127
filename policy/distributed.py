"""Process groups for data-parallel training under torchrun (one process per device).

`torchrun --nproc_per_node N [--nnodes M ...] run_policy.py train ...` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python run_policy.py train` is world size 1 and
needs no process group. Backend: nccl on GPUs, gloo on CPU (so that 2 CPU processes can be tested).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, TensorBoard and the policy directory."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment {name}: expected an integer (set by torchrun), got {raw!r}") from None


def pick_device(requested: str, local_rank: int) -> torch.device:
    """train.device -> a torch device; 'auto' takes this process's GPU when there is one."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device: expected 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK: expected < {torch.cuda.device_count()} (GPUs on this node), got {local_rank}")
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"environment RANK: expected 0 <= RANK < WORLD_SIZE ({world}), got {rank}")
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel when world size > 1 (it broadcasts rank 0's weights at construction)."""
    if not info.enabled:
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # Depthwise conv weights' gradients come in a different memory layout than DDP's buckets: a copy, no error.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Some configs own parameters a step does not use (e.g. the TTM's memory write after the last step of a
    # 1-frame window): DDP must look for them or it waits forever for their gradients.
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on at least one (all ranks must skip a step together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return values
    t = values.detach().clone().to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, broadcast the rest from
    rank 0. DDP hands rank 0's buffers to every rank before each forward, but each rank's last forward
    updates its own; syncing before a checkpoint makes every rank hold the same, saved, state."""
    if not info.enabled:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world_size)
        else:
            dist.broadcast(buf, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# -- a process group on this machine, started from Python -------------------------------------------------
# On a CPU, one process per core with one torch thread each trains faster than one process with a thread per
# core: the quickstart's small convolutions and attention parallelise badly over threads (2 threads:
# 1.12-1.18x one thread's frames/s; 2 processes: 1.4-2.0x; docs/RESULTS.md 4b). `train.processes` starts such a
# group itself, as `torchrun --standalone --nproc_per_node N` would, so the demo and `train` need no launcher.
LOCAL_GROUP_ENV = "POLICY_STACK_LOCAL_GROUP"  # set in the group's processes: they must not start another


def in_launched_group() -> bool:
    """True inside a process group started by torchrun or by run_local_group."""
    return _env_int("WORLD_SIZE", 1) > 1 or os.environ.get(LOCAL_GROUP_ENV) == "1"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_KEPT: list = []


def keep_until_exit(obj) -> None:
    """In a run_local_group member: hold `obj` (every Trainer holds itself) until the process ends. Members end with
    os._exit, so its tf.data iterator is never destroyed: that destructor waited forever for the input
    pipeline's threads at the end of a demo-sized run (both members hung after their last step)."""
    if os.environ.get(LOCAL_GROUP_ENV) == "1":
        _KEPT.append(obj)


def _report(out_dir: str, rank: int, kind: str, payload) -> None:
    """A member's outcome, as a pickle in the group's directory (renamed into place: never half-read)."""
    import pickle

    tmp = os.path.join(out_dir, f".rank{rank}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump((kind, payload), f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))


def _group_member(rank: int, fn, args: tuple, world: int, port: int, threads: int, out_dir: str) -> None:
    import sys
    import traceback

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       LOCAL_GROUP_ENV: "1"})
    torch.set_num_threads(threads)
    code = 0
    try:
        value = fn(*args)
        if rank == 0:
            _report(out_dir, rank, "result", value)
    except Exception as exc:
        # The parent re-raises the member's own exception (a ConfigError stays a ConfigError with its
        # message; the member's traceback rides along as a note), and ends the other members.
        exc.add_note(f"in train.processes member {rank}:\n" + traceback.format_exc())
        try:
            _report(out_dir, rank, "error", exc)
        except Exception:  # an exception that does not pickle
            _report(out_dir, rank, "error", RuntimeError(f"{type(exc).__name__}: {exc}"))
        code = 1
    except KeyboardInterrupt:
        code = 130
    # multiprocessing's own finalizers still run (what a process's normal exit runs): the semaphores this
    # member made (tqdm's lock) are given back to the resource tracker instead of reported as leaked.
    from multiprocessing import util

    util._run_finalizers(0)
    util._run_finalizers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (see keep_until_exit)


def run_local_group(fn, args: tuple, processes: int, threads: int = 0):
    """Run fn(*args) in `processes` new processes on this machine that form one gloo process group
    (RANK 0..processes-1); return rank 0's return value. The first member that fails ends the others and
    its exception is raised here; Ctrl-C ends them all. `threads`: torch threads per member (0 = this
    machine's cores shared out evenly). fn and args must pickle (the members are spawned)."""
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    if processes < 1:
        raise ValueError(f"train.processes: expected >= 1, got {processes}")
    if in_launched_group():
        raise ValueError(f"train.processes: expected 1 inside a process group that is already running (torchrun "
                         f"or train.processes; WORLD_SIZE={os.environ.get('WORLD_SIZE')}), got {processes}")
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    failure: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="policy-stack-group-") as out_dir:
        group = mp.start_processes(_group_member, args=(fn, args, processes, _free_port(), threads, out_dir),
                                   nprocs=processes, join=False, start_method="spawn")
        try:
            while not group.join():
                pass
        except mp.ProcessExitedException as exc:
            how = (f"was killed by {exc.signal_name} (out of memory? try fewer processes or a smaller "
                   "train.batch_size)") if exc.signal_name else f"ended with exit code {exc.exit_code}"
            failure = RuntimeError(f"train.processes: process {exc.error_index} of {processes} {how}")
        finally:
            for p in group.processes:  # Ctrl-C or a failure: nobody is left behind
                if p.is_alive():
                    p.terminate()
            for p in group.processes:
                p.join()
        outcomes = {}
        for rank in range(processes):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes[rank] = pickle.load(f)
    for kind, payload in outcomes.values():
        if kind == "error":  # the member's own exception first: it says what went wrong
            raise payload from None
    if failure is not None:
        raise failure from None
    if 0 not in outcomes:
        raise RuntimeError(f"train.processes: the group of {processes} ended without rank 0's result")
    return outcomes[0][1]
