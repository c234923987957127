"""Scripted-expert success per tabletop task.

    python -m envs.measure_experts --seeds 200 [--noise 0.2] [--tasks reach lift] [--json PATH]

Prints one line per task (success rate, mean episode length, control steps/s) and optionally
writes the same numbers as JSON. Rendering is off: experts read privileged state only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")

from envs.experts import make_expert  # noqa: E402
from envs.tabletop import TabletopEnv, task_names  # noqa: E402


def measure_task(task: str, seeds: int, noise: float = 0.0, first_seed: int = 0) -> dict:
    """Roll out the expert for episode seeds first_seed..first_seed+seeds-1."""
    env = TabletopEnv(task, render=False)
    expert = make_expert(env, noise=noise, seed=0)
    successes, lengths, failed = 0, [], []
    start = time.perf_counter()
    try:
        for seed in range(first_seed, first_seed + seeds):
            ts = env.reset(seed=seed)
            while not ts.last():
                ts = env.step(expert.act(ts))
            successes += env.success
            lengths.append(env.step_count)
            if not env.success:
                failed.append(seed)
    finally:
        env.close()
    seconds = time.perf_counter() - start
    return {
        "task": task,
        "episodes": seeds,
        "noise": noise,
        "success_rate": successes / seeds,
        "mean_length": sum(lengths) / len(lengths),
        "max_steps": env.max_steps,
        "steps_per_s": sum(lengths) / seconds,
        "failed_seeds": failed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200, help="episodes per task (seeds 0..N-1)")
    parser.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise on dx, dy, dz")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"subset of {task_names()}")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.noise < 0:
        parser.error(f"--noise must be >= 0, got {args.noise}")
    tasks = args.tasks or task_names()
    unknown = [t for t in tasks if t not in task_names()]
    if unknown:
        parser.error(f"--tasks must be among {task_names()}, got unknown {unknown}")

    results = []
    for task in tasks:
        r = measure_task(task, args.seeds, args.noise)
        results.append(r)
        print(
            f"{task:14s} success {r['success_rate']:6.1%}  mean length {r['mean_length']:5.1f}/{r['max_steps']}"
            f"  {r['steps_per_s']:6.0f} steps/s  failed seeds {r['failed_seeds'][:10]}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "noise": args.noise, "tasks": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
