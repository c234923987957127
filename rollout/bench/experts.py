"""`bench experts`: scripted-expert success per tabletop task, and the one expert-rollout timer.

    python run_policy.py bench experts --seeds 200 [--noise 0.2] [--tasks reach lift] [--json PATH]

Prints one line per task (success rate, mean episode length, control steps/s) and optionally
writes the same numbers as JSON. Rendering is off: experts read privileged state only.

`expert_rollouts` is the timer `bench env` uses too (any env from envs.make, Meta-World included).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from rollout.bench import args as A
from rollout.bench import register


def expert_rollouts(env: Any, seeds: list[int], noise: float = 0.0) -> dict:
    """Run the registry's expert (envs.make_expert) on each seed: success, episode lengths, the seeds that
    failed, and two rates: env.step time alone (wall and CPU; the expert's own time excluded) and whole
    episodes (resets and expert included) per wall-clock second."""
    import envs

    expert = envs.make_expert(env, noise=noise, seed=0)
    successes, lengths, failed, step_s, step_cpu, steps = 0, [], [], 0.0, 0.0, 0
    start = time.perf_counter()
    for seed in seeds:
        ts = env.reset(seed=seed)
        while not ts.last():
            action = expert.act(ts)
            t, c = time.perf_counter(), time.process_time()
            ts = env.step(action)
            step_s += time.perf_counter() - t
            step_cpu += time.process_time() - c
            steps += 1
        successes += int(env.success)
        lengths.append(env.step_count)
        if not env.success:
            failed.append(seed)
    seconds = time.perf_counter() - start
    return {"expert_success": successes / len(seeds), "successes": successes, "episodes": len(seeds),
            "mean_length": float(np.mean(lengths)), "max_length": int(max(lengths)),
            "control_steps_per_s": steps / step_s if step_s else 0.0,
            # Per CPU-second of this process: on a shared machine this is the rate an idle core would give.
            "control_steps_per_cpu_s": steps / step_cpu if step_cpu else 0.0,
            "failed_seeds": failed, "seconds": seconds,
            "episode_steps_per_s": sum(lengths) / seconds if seconds else 0.0}


def measure_task(task: str, seeds: int, noise: float = 0.0, first_seed: int = 0) -> dict:
    """Roll out the tabletop expert for episode seeds first_seed..first_seed+seeds-1."""
    import envs

    env = envs.make("tabletop", task, render=False)
    try:
        r = expert_rollouts(env, list(range(first_seed, first_seed + seeds)), noise)
    finally:
        env.close()
    return {
        "task": task,
        "episodes": seeds,
        "noise": noise,
        "success_rate": r["expert_success"],
        "mean_length": r["mean_length"],
        "max_steps": env.max_steps,
        "steps_per_s": r["episode_steps_per_s"],
        "failed_seeds": r["failed_seeds"],
    }


def tabletop_task(text: str) -> str:
    """argparse type: a tabletop task name (the suite is imported only when the flag is given)."""
    from envs.tabletop import task_names

    if text not in task_names():
        raise argparse.ArgumentTypeError(f"expected a tabletop task among {task_names()}, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_seeds(p, 200)
    A.add_noise(p)
    p.add_argument("--tasks", nargs="+", type=tabletop_task, default=None,
                   help="subset of the tabletop tasks (default: all)")
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    from envs.tabletop import task_names

    results = []
    for task in a.tasks or task_names():
        r = measure_task(task, a.seeds, a.noise)
        results.append(r)
        print(
            f"{task:14s} success {r['success_rate']:6.1%}  mean length {r['mean_length']:5.1f}/{r['max_steps']}"
            f"  {r['steps_per_s']:6.0f} steps/s  failed seeds {r['failed_seeds'][:10]}",
            flush=True,
        )
    return {"seeds": a.seeds, "noise": a.noise, "tasks": results}


register("experts", "tabletop expert success per task and mean episode length", add_arguments, run,
         description=__doc__.split("\n\n")[0])
