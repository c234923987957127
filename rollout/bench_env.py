"""`bench env`: per task, scripted-expert success and episode length, control steps per second without
rendering, and rendered frames per second at a given image size (one process, one thread)."""
from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np


def _machine() -> dict:
    import os

    return {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "mujoco_gl": os.environ.get("MUJOCO_GL"), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}


def expert_rollouts(env: Any, seeds: list[int], noise: float = 0.0) -> dict:
    """Run the registry's expert on each seed; env.step time is measured apart from the expert's."""
    import envs

    expert = envs.make_expert(env, noise=noise, seed=0)
    successes, lengths, step_s, step_cpu, steps = 0, [], 0.0, 0.0, 0
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
    return {"expert_success": successes / len(seeds), "successes": successes, "episodes": len(seeds),
            "mean_length": float(np.mean(lengths)), "max_length": int(max(lengths)),
            "control_steps_per_s": steps / step_s if step_s else 0.0,
            # Per CPU-second of this process: on a shared machine this is the rate an idle core would give.
            "control_steps_per_cpu_s": steps / step_cpu if step_cpu else 0.0}


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
            row = expert_rollouts(env, seed_list, noise)
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
            "seconds": round(time.perf_counter() - start, 1), "machine": _machine()}
