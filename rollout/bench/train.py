"""`bench train`: what a training step costs with a given config, on this machine.

Reports samples (valid frames) per second and per-step seconds split into data wait / forward /
backward / optimizer (medians over the timed steps, after warm-up steps that are not counted), and
peak memory: CUDA max allocated on a GPU, the process's peak RSS on CPU. Without --data a tiny
tabletop dataset is collected into a temporary directory first.

Arithmetic rate: the FLOPs of one training step (3x its forward pass, counted by
torch.utils.flop_counter: convolutions and matrix products, not elementwise work) over the median step
time, beside the rate of a 1024x1024 float32 matmul measured in the same run on
the same threads: their ratio is the share of the machine's dense arithmetic rate training reaches.
With train.processes = N the N processes train together (one gloo group, each its share of the batch):
samples/s and FLOPs are the group's, the reference the sum of the N processes' matmul rates.
--profile N: where the time goes, by operator (torch.profiler), for N more steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rollout.bench import args as A
from rollout.bench import register

if TYPE_CHECKING:
    import torch

WARMUP_STEPS = 3


def _peak_memory(device: torch.device) -> dict:
    import torch

    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"kind": "cpu_peak_rss", "bytes": int(rss_kib if sys.platform == "darwin" else rss_kib * 1024)}


def matmul_gflops(device: "torch.device", n: int = 1024, reps: int = 20) -> float:
    """The best of `reps` timed n x n float32 matmuls, in GFLOP/s (2 n^3 FLOPs each)."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(reps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:  # warm-up: the first calls allocate and pick kernels
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def step_flops(trainer) -> tuple[int, int]:
    """FLOPs of one training step: 3x the forward pass's (the backward computes the gradients of the
    inputs and of the weights, each about one forward), the forward counted on one training batch.
    FlopCounterMode's own count of convolution_backward treats depthwise (grouped) convolutions as dense
    and overcounts them about 15x here, so the backward is not counted directly. Returns (FLOPs, valid
    frames of that micro-batch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = next(trainer._batches)  # the trainer's data position moves on by one micro-batch; timing only
    # In training mode (eval mode takes fused inference kernels the counter does not see), with the
    # BatchNorm statistics this forward updates put back.
    saved = [b.detach().clone() for b in trainer.model.buffers()]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        trainer._loss(batch)
    with torch.no_grad():
        for b, s in zip(trainer.model.buffers(), saved):
            b.copy_(s)
    return 3 * int(counter.get_total_flops()), int(batch["mask"].sum())


def profile_steps(trainer, steps: int, top: int = 15) -> dict:
    """Run `steps` more training steps under torch.profiler: the operators that take the most self CPU
    time (their share of the steps' wall time), and what no operator accounts for (Python between the
    operators, the data wait, the trainer's own work). Self times add up without double counting."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    in_ops = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return {
        "steps": steps, "seconds_per_step": round(wall_us / steps / 1e6, 5),
        "operators": [{"name": e.key, "share": round(e.self_cpu_time_total / wall_us, 4), "calls_per_step":
                       round(e.count / steps, 1)} for e in ranked[:top]],
        "other_operators_share": round(sum(e.self_cpu_time_total for e in ranked[top:]) / wall_us, 4),
        # Time spent in operators on other threads (DDP's reducer) also counts, so this can go below 0.
        "outside_operators_share": round(1 - in_ops / wall_us, 4),
    }


def bench_train(config: str, data: str | None, steps: int, overrides: list[str] | None = None,
                warmup: int = WARMUP_STEPS, profile: int = 0) -> dict:
    import torch

    from policy.config import load_config
    from policy.distributed import barrier, in_launched_group, mean_over_ranks, run_local_group, shutdown
    from policy.train import Trainer

    if steps < 1:
        raise ValueError(f"--steps: expected >= 1 timed steps, got {steps}")
    # The timed steps never reach the schedule's end; checkpoints and evaluation are off.
    base = [f"train.steps={steps + warmup + profile}", "train.save_every=0", "train.eval_every=0"]
    cfg = load_config(config, base + list(overrides or []))
    data_label = str(data) if data else "generated: tabletop reach+lift, 4 episodes each"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if data is None:
            from datasets.collect import collect

            data = str(collect("tabletop", ["reach", "lift"], 4, Path(tmp) / "data", workers=1, progress=False).path)
        if cfg.train.processes > 1 and not in_launched_group():
            # the group times itself; rank 0 reports for all (the data stays in this process's temp dir)
            res = run_local_group(bench_train, (config, data, steps, overrides, warmup, profile), cfg.train.processes,
                                  cfg.train.num_threads)
            return {**res, "data": data_label}
        trainer = Trainer(cfg, data, Path(tmp) / "run", progress=False)
        dev = trainer.info.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        rows = []
        t0 = time.perf_counter()
        trainer.train_step()  # the first warm-up step; with train.compile the compilation happens here
        first_step_s = time.perf_counter() - t0
        flops, frames = step_flops(trainer)  # of one micro-batch; a step runs grad_accum of them
        flops *= cfg.train.grad_accum
        frames *= cfg.train.grad_accum
        for i in range(1, warmup + steps):
            t0 = time.perf_counter()
            stats, wait = trainer.train_step()
            total = time.perf_counter() - t0
            if i >= warmup:
                rows.append((total, wait, stats.forward_s, stats.backward_s, stats.optimizer_s, stats.samples))
        arr = np.array(rows)
        med = np.median(arr, axis=0)
        per_step = float(arr[:, 0].sum())
        world = trainer.info.world_size
        # A process group: every member ran its share of each step, so the step's work is world x this
        # member's; the reference is the sum of the members' matmul rates, each measured while the others
        # wait (measured at once they shared the memory bus and varied 100-185 GFLOP/s between runs).
        flops *= world
        frames *= world
        achieved = flops / float(med[0]) / 1e9
        mine = 0.0
        for r in range(world):
            barrier(trainer.info)
            if r == trainer.info.rank:
                mine = matmul_gflops(dev)
        reference = float(mean_over_ranks(torch.tensor([mine]), trainer.info)[0]) * world
        profiled = profile_steps(trainer, profile) if profile else None  # rank 0's view in a group
        shutdown(trainer.info)
        return {
            "config": str(config), "overrides": list(overrides or []), "data": data_label,
            "device": str(dev), "world_size": trainer.info.world_size,
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "autocast": cfg.train.autocast, "compile": cfg.train.compile,
            "threads_per_process": torch.get_num_threads(), "timed_steps": steps, "warmup_steps": warmup,
            "samples_per_second": round(world * float(arr[:, 5].sum()) / per_step, 2),
            "first_step_seconds": round(first_step_s, 3),
            "seconds_per_step": {"total": round(float(med[0]), 5), "data_wait": round(float(med[1]), 5),
                                 "forward": round(float(med[2]), 5), "backward": round(float(med[3]), 5),
                                 "optimizer": round(float(med[4]), 5)},
            "flops_per_step": flops, "gflops_per_frame": round(flops / max(frames, 1) / 1e9, 4),
            "achieved_gflops_per_second": round(achieved, 2), "matmul_gflops_per_second": round(reference, 2),
            "fraction_of_matmul_rate": round(achieved / reference, 3),
            "peak_memory": _peak_memory(dev),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            **({"profile": profiled} if profiled else {}),
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_config(p, "training config")
    p.add_argument("--data", default=None,
                   help="RLDS dataset directory (default: a tiny tabletop dataset collected into a temp dir)")
    A.add_steps(p, 20, f"timed training steps (after {WARMUP_STEPS} untimed warm-up steps)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N more steps with torch.profiler: the top operators by self CPU time and "
                        "the share of the step outside any operator (default 0: off)")
    A.add_overrides(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    if a.profile < 0:
        raise ValueError(f"--profile: expected 0 (off) or a number of steps >= 1, got {a.profile}")
    res = bench_train(str(A.config_path(a)), a.data, a.steps, overrides=a.overrides, profile=a.profile)
    print(json.dumps(res, indent=2))
    return res


register("train", "training samples/s, seconds per step split into data wait / forward / backward / optimizer, "
         "peak memory", add_arguments, run)
