"""`bench env`: per task, scripted-expert success and episode length, control steps per second without
rendering, and rendered frames per second at a given image size (one process, one thread).

Also the tabletop simulator's raw speed, from Python: `benchmark_env` (control steps/s with random
actions) and `benchmark_render` (frames/s of a fixed scene); numbers in docs/ENVS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.experts import expert_rollouts
from rollout.bench.machine import machine

# expert_rollouts' keys that bench env reports per task
_EXPERT_KEYS = ("expert_success", "successes", "episodes", "mean_length", "max_length", "control_steps_per_s",
                "control_steps_per_cpu_s")



def upstream_rollouts(env: Any, seeds: list[int]) -> float:
    """Meta-World's own policy stepping Meta-World directly (no adapter): the unpatched reference rate."""
    import warnings

    from metaworld.policies import ENV_POLICY_MAP

    from envs.metaworld_env import mw_name

    policy = ENV_POLICY_MAP[mw_name(env.task)]()
    successes = 0
    for seed in seeds:
        env.reset(seed=seed)  # sets the goal for this seed
        obs = env.raw_observation
        for _ in range(env.max_steps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obs, _, _, _, info = env.mw.step(policy.get_action(obs))
            if info["success"]:
                successes += 1
                break
    return successes / len(seeds)


def render_rate(env: Any, frames: int = 100) -> tuple[float, float]:
    """Frames per wall-clock second and per CPU-second of env.render() at the env's image size, the
    scene changing between frames (CPU time counts the software renderer's threads too)."""
    ts = env.reset(seed=0)
    rng = np.random.default_rng(0)
    seconds = cpu = 0.0
    for _ in range(frames):
        if ts.last():
            ts = env.reset()
        t, c = time.perf_counter(), time.process_time()
        env.render()
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        ts = env.step(np.append(rng.uniform(-1, 1, 4), 0.0).astype(np.float32))
    return frames / seconds, frames / max(cpu, 1e-9)


def bench_env(env_name: str, tasks: list[str] | None = None, seeds: int = 10, image_size: int = 96,
              camera: str | None = None, noise: float = 0.0, frames: int = 100, upstream: bool = False,
              progress: bool = True) -> dict:
    import envs

    if seeds < 1:
        raise ValueError(f"--seeds: expected >= 1, got {seeds}")
    if frames < 1:
        raise ValueError(f"--frames: expected >= 1, got {frames}")
    tasks = tasks or list(envs.list_tasks(env_name))
    seed_list = list(range(seeds))
    per_task: dict[str, dict] = {}
    start = time.perf_counter()
    for task in tasks:
        env = envs.make(env_name, task, image_size=image_size, camera=camera, render=False)
        try:
            rollouts = expert_rollouts(env, seed_list, noise)
            row = {k: rollouts[k] for k in _EXPERT_KEYS}
            if upstream and envs.env_family(env_name) == "metaworld":
                row["upstream_expert_success"] = upstream_rollouts(env, seed_list)
        finally:
            env.close()
        env = envs.make(env_name, task, image_size=image_size, camera=camera)
        try:
            row["rendered_frames_per_s"], row["rendered_frames_per_cpu_s"] = render_rate(env, frames)
            row["camera"] = env.camera
        finally:
            env.close()
        per_task[task] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        if progress:
            print(f"{task:28s} success {row['expert_success']:.2f}  len {row['mean_length']:6.1f}  "
                  f"{row['control_steps_per_s']:7.0f} steps/s  {row['rendered_frames_per_s']:6.0f} fps", flush=True)
    mean = lambda key: round(float(np.mean([r[key] for r in per_task.values()])), 4)  # noqa: E731
    summary = {"mean_expert_success": mean("expert_success"), "min_expert_success": min(
        r["expert_success"] for r in per_task.values()), "mean_length": mean("mean_length"),
        "control_steps_per_s": mean("control_steps_per_s"), "rendered_frames_per_s": mean("rendered_frames_per_s"),
        "control_steps_per_cpu_s": mean("control_steps_per_cpu_s"),
        "rendered_frames_per_cpu_s": mean("rendered_frames_per_cpu_s")}
    if upstream and envs.env_family(env_name) == "metaworld":
        summary["mean_upstream_expert_success"] = mean("upstream_expert_success")
    return {"benchmark": "env", "env": env_name, "image_size": image_size, "seeds": seeds, "noise": noise,
            "frames": frames, "per_task": per_task, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1), "machine": machine()}


def benchmark_env(task: str = "lift", steps: int = 1000, render: bool = False, image_size: int = 64) -> dict:
    """Tabletop control steps per second with random actions (episodes reset as they end).

    Also reports CPU seconds of this process (all its threads, llvmpipe's included): on a shared
    machine wall-clock rates swing with other jobs, CPU-time rates much less.
    """
    from common.action_interface import ACTION_MAX, ACTION_MIN
    from envs.tabletop import TabletopEnv

    env = TabletopEnv(task, image_size=image_size, seed=0, render=render)
    try:
        rng = np.random.default_rng(0)
        actions = rng.uniform(ACTION_MIN, ACTION_MAX, size=(steps, 5)).astype(np.float32)
        actions[:, 4] = 0.0  # never terminate early, so resets stay rare
        env.reset(seed=0)
        start, cpu_start = time.perf_counter(), time.process_time()
        for a in actions:
            env.step(a)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        env.close()
    return {
        "task": task,
        "steps": steps,
        "render": render,
        "image_size": image_size,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "cpu_seconds": cpu_seconds,
        "steps_per_cpu_s": steps / max(cpu_seconds, 1e-9),
    }


def benchmark_render(image_size: int = 96, frames: int = 500, camera: str = "front", task: str = "lift") -> dict:
    """Tabletop rendered frames per second (render only, scene fixed after one reset)."""
    from envs.tabletop import TabletopEnv

    env = TabletopEnv(task, image_size=image_size, camera=camera, seed=0, render=True)
    try:
        env.reset(seed=0)
        env.render()  # warm-up: first frame allocates buffers
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(frames):
            env.render()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        env.close()
    return {
        "camera": camera,
        "image_size": image_size,
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        "cpu_seconds": cpu_seconds,
        "frames_per_cpu_s": frames / max(cpu_seconds, 1e-9),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="tabletop", help="tabletop, metaworld-mt10 or metaworld-mt50")
    p.add_argument("--tasks", default=None, help="'all' (default) or a comma-separated list of tasks")
    A.add_seeds(p, 10)
    A.add_image_size(p, 96, "rendered frame size S x S")
    p.add_argument("--camera", default=None, help="camera (default: the env's)")
    A.add_noise(p)
    p.add_argument("--frames", type=A.positive_int, default=100, help="rendered frames timed per task")
    p.add_argument("--upstream", action="store_true",
                   help="Meta-World: also run upstream policies directly on Meta-World, no adapter")
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    import envs

    tasks = envs.parse_tasks(a.env, a.tasks) if a.tasks else None
    res = bench_env(a.env, tasks, a.seeds, a.image_size, camera=a.camera, noise=a.noise, frames=a.frames,
                    upstream=a.upstream)
    print(json.dumps(res, indent=2))
    return res


register("env", "per task: expert success over N seeds, mean episode length, control steps/s without rendering, "
         "frames/s at the image size", add_arguments, run)
