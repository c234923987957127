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
