"""Evaluate a policy directory by rollouts in simulation: per-task success, lengths, videos.

Evaluation seeds start at datasets.collect.EVAL_SEED_BASE, disjoint from demonstration seeds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class EvalResult:
    per_task: dict[str, dict[str, float]]
    episodes: int
    seconds: float
    videos: list[str] = field(default_factory=list)

    @property
    def mean_success(self) -> float:
        return float(np.mean([t["success_rate"] for t in self.per_task.values()])) if self.per_task else 0.0

    def to_json(self) -> dict:
        return {"mean_success": round(self.mean_success, 4), "episodes": self.episodes,
                "seconds": round(self.seconds, 2), "per_task": self.per_task, "videos": self.videos}

    def table(self) -> str:
        rows = [f"{'task':<12} {'success':>8} {'episodes':>9} {'mean len':>9}"]
        for task, r in self.per_task.items():
            rows.append(f"{task:<12} {r['success_rate']:>8.0%} {r['episodes']:>9d} {r['mean_length']:>9.1f}")
        rows.append(f"{'mean':<12} {self.mean_success:>8.0%} {self.episodes:>9d}")
        return "\n".join(rows)


def evaluate(policy_dir: str | Path, env_name: str | None = None, tasks: list[str] | None = None,
             episodes_per_task: int = 20, seed: int = 0, video_dir: str | Path | None = None,
             videos_per_task: int = 1, progress: bool = True, threads: int = 1) -> EvalResult:
    """`threads`: torch threads for the policy. One by default: the software renderer (llvmpipe) needs
    the other core, and torch's spinning worker threads slow both down badly when they compete."""
    import torch

    import envs
    from datasets.collect import EVAL_SEED_BASE
    from policy.runner import PolicyRunner
    from tqdm import tqdm

    torch.set_num_threads(threads)
    runner = PolicyRunner.load(policy_dir)
    trained_env = runner.spec.env
    env_name = env_name or trained_env.get("env", "tabletop")
    tasks = tasks or trained_env.get("tasks") or list(envs.list_tasks(env_name))
    image_size = int(runner.spec.image_shape[0])
    camera = trained_env.get("camera", "front")
    if episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task: expected >= 1, got {episodes_per_task}")

    per_task: dict[str, dict[str, float]] = {}
    videos: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="eval", unit="ep", disable=not progress)
    for ti, task in enumerate(tasks):
        env = envs.make(env_name, task=task, image_size=image_size, camera=camera)
        successes, lengths = 0, []
        try:
            for i in range(episodes_per_task):
                ts = env.reset(seed=EVAL_SEED_BASE + seed * 100_000 + ti * 1_000 + i)
                runner.reset(str(env.instruction))
                record = video_dir is not None and i < videos_per_task
                frames = [ts.observation[runner.spec.camera_key]] if record else []
                while not ts.last():
                    ts = env.step(runner.step(ts.observation))
                    if record:
                        frames.append(ts.observation[runner.spec.camera_key])
                successes += int(env.success)
                lengths.append(env.step_count)
                if record:
                    videos.append(write_video(Path(video_dir) / f"{task}_{i:03d}.mp4", frames))
                bar.update(1)
                bar.set_postfix(task=task, success=f"{successes}/{i + 1}")
        finally:
            env.close()
        per_task[task] = {"success_rate": successes / episodes_per_task, "episodes": episodes_per_task,
                          "mean_length": float(np.mean(lengths))}
    bar.close()
    return EvalResult(per_task, len(tasks) * episodes_per_task, time.perf_counter() - start, videos)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, min_size: int = 256) -> str:
    """mp4 via imageio/ffmpeg; small frames are upscaled (nearest) so the video is watchable."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, min_size // frames[0].shape[0])
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=1) as w:
        for f in frames:
            w.append_data(np.repeat(np.repeat(f, scale, axis=0), scale, axis=1))
    tmp.replace(path)
    return str(path)
