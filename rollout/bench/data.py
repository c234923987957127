"""bench data: how fast the training input pipeline delivers torch batches, and whether its memory stays flat.

Builds the inputs exactly as training does (datasets.training_inputs.open_training_inputs, shuffling on)
and iterates for a fixed time, sampling resident memory (RSS) as it goes.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rollout.bench import args as A
from rollout.bench import register


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _at(samples: list[tuple[float, float]], t: float) -> float:
    """RSS at the first sample at or after t seconds (the last sample if the run was shorter)."""
    for s, v in samples:
        if s >= t:
            return v
    return samples[-1][1]


def bench_data(data: str, config: str | Path, batch_size: int = 64, window: int = 1, image_size: int = 64,
               minutes: float = 1.0, sequence: str = "window", cache: bool = True, crop_pad: int = 0,
               parallel_calls: int = -1, threads: int = 1, sample_every_s: float = 5.0,
               overrides: list[str] | None = None) -> dict:
    if minutes <= 0:
        raise ValueError(f"--minutes: expected > 0, got {minutes}")
    if batch_size < 1 or window < 1 or image_size < 8:
        raise ValueError(f"--batch-size/--window/--image-size: expected >= 1, >= 1, >= 8, "
                         f"got {batch_size}, {window}, {image_size}")
    from datasets.tf_setup import tf

    if threads > 0:
        try:  # only possible before TensorFlow runs its first op (always so from the command line)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            threads = -1  # reported as "not set"

    from datasets.training_inputs import open_training_inputs
    from policy.config import load_config

    ov = [f"train.batch_size={batch_size}", f"data.sequence={sequence}", f"data.sequence_length={window}",
          f"model.image.image_size={image_size}", f"data.cache_in_memory={str(cache).lower()}",
          f"data.crop_pad={crop_pad}", f"data.parallel_calls={parallel_calls}",
          f"model.controller.memory_horizon={window if sequence == 'window' else 0}"] + list(overrides or [])
    cfg = load_config(config, ov)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    inputs = open_training_inputs(cfg, data, seed=cfg.train.seed)
    opened = time.perf_counter() - t0
    stream = inputs.batches()  # this rank's batch stream, as training reads it
    first = next(stream)
    first_batch = time.perf_counter() - t0
    frames, valid, batches = 0, 0, 0
    samples = [(0.0, rss_mb())]
    start = time.perf_counter()
    next_sample = sample_every_s
    deadline = minutes * 60
    while True:
        b = next(stream)
        batches += 1
        frames += int(b["image"].shape[0] * b["image"].shape[1])
        valid += int(b["mask"].sum())
        el = time.perf_counter() - start
        if el >= next_sample:
            samples.append((round(el, 1), round(rss_mb(), 1)))
            next_sample += sample_every_s
        if el >= deadline:
            break
    seconds = time.perf_counter() - start
    at2 = _at(samples, 120.0)
    end = samples[-1][1]
    return {
        "data": inputs.dataset.dir, "standardization": inputs.dataset.entry.name,
        "batch_size": batch_size, "window": window, "sequence": sequence, "image_size": image_size,
        "cache_in_memory": cache, "crop_pad": crop_pad, "parallel_calls": parallel_calls, "threads": threads,
        "episodes": inputs.dataset.num_episodes, "transitions": inputs.scan["num_transitions"],
        "first_batch_shape": list(first["image"].shape),
        "open_s": round(opened, 2), "time_to_first_batch_s": round(first_batch, 2),
        "seconds": round(seconds, 1), "batches": batches,
        "frames_per_s": round(frames / seconds, 1), "valid_frames_per_s": round(valid / seconds, 1),
        "rss_mb": {"before_open": round(rss0, 1), "start": samples[0][1], "minute_2": at2, "end": end,
                   "min": min(v for _, v in samples), "max": max(v for _, v in samples)},
        "rss_growth_pct_minute2_to_end": round(100 * (end - at2) / at2, 2),
        "rss_growth_pct_start_to_end": round(100 * (end - samples[0][1]) / samples[0][1], 2),
        "rss_samples": samples, "pid": os.getpid(),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="RLDS dataset directory (required)")
    A.add_config(p, "training config whose input pipeline is built")
    p.add_argument("--batch-size", type=A.positive_int, default=64, help="sequences per batch")
    p.add_argument("--window", type=A.positive_int, default=1, help="steps per sequence (T)")
    p.add_argument("--sequence", default="window", choices=["window", "episode"], help="sequence mode")
    A.add_image_size(p, 64, "frames resized to S x S")
    p.add_argument("--minutes", type=A.positive_float, default=1.0, help="how long to iterate")
    p.add_argument("--no-cache", action="store_true", help="decode every epoch (no in-memory cache)")
    p.add_argument("--crop-pad", type=int, default=0, help="RT-1 pad-and-random-crop pixels")
    p.add_argument("--parallel-calls", type=int, default=-1, help="tf.data map calls (-1 AUTOTUNE)")
    A.add_threads(p, "TensorFlow inter- and intra-op threads")
    A.add_overrides(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    if not a.data:
        raise ValueError("bench data: expected --data PATH (an RLDS dataset directory), got none")
    res = bench_data(a.data, str(A.config_path(a)), batch_size=a.batch_size, window=a.window, image_size=a.image_size,
                     minutes=a.minutes, sequence=a.sequence, cache=not a.no_cache, crop_pad=a.crop_pad,
                     parallel_calls=a.parallel_calls, threads=a.threads, overrides=a.overrides)
    print(json.dumps({k: v for k, v in res.items() if k != "rss_samples"}, indent=2))
    return res


register("data", "training input pipeline: frames/s delivered as torch batches, time to first batch, "
         "resident memory over the run", add_arguments, run)
