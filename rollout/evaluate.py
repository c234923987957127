"""Evaluate a policy directory by rollouts in simulation: per-task success, lengths, videos, a chart.

Episodes run across `workers` spawned processes, each with its own runner (one torch thread) and
environments. An episode is a function of its seed alone, so results do not depend on the number of
workers. Evaluation seeds are numbered by common.seeds, disjoint from demonstration seeds.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_output
from common.seeds import check_eval_request, check_eval_task_count, eval_seed


@dataclass(frozen=True)
class EpisodeJob:
    policy_dir: str
    env_name: str
    task: str
    episode: int
    seed: int
    image_size: int
    camera: str
    video_path: str | None


@dataclass
class EpisodeRecord:
    task: str
    episode: int
    seed: int
    instruction: str
    success: bool
    length: int
    return_: float
    action_digest: str  # hash of the episode's actions: equal digests = the same rollout
    video: str | None = None
    # How it ended: "success", "time limit" or "policy terminated" (the terminate action), and the
    # task's own record of what happened where it keeps one (tabletop: the target slot, the episode's other
    # choices (stack's base `other`, `pad`, `direction`, `cue`), the first object grasped (`first_grasped`)
    # and, for stateful checks, e.g. cue_touch's first touch: a slot name, or "invalid" = too early or two
    # at once; put_back's `go_step` and final `distance_from_start` in metres; the memory benchmark's
    # `failed` reason, `placed_on`, `first_press`, `touches`).
    outcome: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    per_task: dict[str, dict[str, float]]
    episodes: int
    seconds: float
    videos: list[str] = field(default_factory=list)
    records: list[EpisodeRecord] = field(default_factory=list)
    chart: str | None = None
    memory_figure: str | None = None

    @property
    def mean_success(self) -> float:
        return float(np.mean([t["success_rate"] for t in self.per_task.values()])) if self.per_task else 0.0

    def to_json(self) -> dict:
        out: dict[str, Any] = {"mean_success": round(self.mean_success, 4), "episodes": self.episodes,
                               "seconds": round(self.seconds, 2), "per_task": self.per_task, "videos": self.videos,
                               "records": [asdict(r) for r in self.records]}
        if self.chart:
            out["chart"] = self.chart
        if self.memory_figure:
            out["memory_figure"] = self.memory_figure
        return out

    def table(self) -> str:
        # Memory-benchmark tasks add a column: a memory task's chance level, or which memory task a control is for.
        w = max([12, *map(len, self.per_task)])
        notes = {t: f"chance {r['chance']:.0%}" if "chance" in r else f"control of {r['control_of']}"
                 for t, r in self.per_task.items() if "chance" in r or "control_of" in r}
        rows = [f"{'task':<{w}} {'success':>8} {'episodes':>9} {'mean len':>9}" + ("  memory" if notes else "")]
        for task, r in self.per_task.items():
            rows.append(f"{task:<{w}} {r['success_rate']:>8.0%} {r['episodes']:>9d} {r['mean_length']:>9.1f}"
                        + (f"  {notes[task]}" if task in notes else ""))
        rows.append(f"{'mean':<{w}} {self.mean_success:>8.0%} {self.episodes:>9d}")
        return "\n".join(rows)


def task_seed_order(trained: list[str], known: list[str]) -> list[str]:
    """The order that numbers a policy's evaluation seed blocks: the tasks it was trained on, in training
    order, then the env's other tasks in the env's order. It does not depend on `--tasks`, so evaluating
    some of the tasks plays the same episodes of each as evaluating all of them."""
    first = [t for t in trained if t in known]
    order = first + [t for t in known if t not in first]
    check_eval_task_count(len(order))
    return order


def in_loop_evaluator(policy_dir: Path, episodes_per_task: int, video_dir: Path, videos_per_task: int) -> dict:
    """The trainer's evaluation in the loop (policy.train.Evaluator): the policy's own env and trained
    tasks, evaluation seed block 0, in this process; returns EvalResult.to_json()."""
    return evaluate(policy_dir, None, None, episodes_per_task, seed=0, video_dir=video_dir,
                    videos_per_task=videos_per_task, progress=False).to_json()


def evaluate(policy_dir: str | Path, env_name: str | None = None, tasks: list[str] | None = None,
             episodes_per_task: int = 20, seed: int = 0, video_dir: str | Path | None = None,
             videos_per_task: int = 1, progress: bool = True, threads: int = 1, workers: int = 1,
             chart: str | Path | None = None, memory_figure: str | Path | None = None) -> EvalResult:
    """`threads`: torch threads per worker. One by default: the software renderer (llvmpipe) needs
    the other core, and torch's spinning worker threads slow both down badly when they compete.
    `chart`: PNG bar chart of success per task. `memory_figure`: PNG of the TTM memory's read and
    write weights over the first episode (TTM policies only)."""
    import envs
    from policy.policy_dir import load_policy_dir
    from tqdm import tqdm

    _check_int("--episodes-per-task", episodes_per_task, 1)
    _check_int("--videos-per-task", videos_per_task, 0)
    _check_int("--workers", workers, 1)
    _check_int("--seed", seed, 0)
    check_eval_request(seed, episodes_per_task)
    spec = load_policy_dir(policy_dir).spec  # fails early, with the policy's own message
    trained_env = spec.env
    env_name = env_name or trained_env.get("env", "tabletop")
    known = list(envs.list_tasks(env_name))
    trained_tasks = list(trained_env.get("tasks") or [])
    tasks = list(tasks or trained_tasks or known)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown} for env {env_name!r}; expected some of {known}")
    if memory_figure is not None:
        _require_ttm(policy_dir)
    from rollout.plots import check_png_path

    if chart is not None:  # checked before the rollouts, not after them
        check_png_path(chart, "--chart")
    if memory_figure is not None:
        check_png_path(memory_figure, "--memory-figure")
    image_size = int(spec.image_shape[0])
    camera = trained_env.get("camera")  # None: the env's default camera

    seed_index = {t: i for i, t in enumerate(task_seed_order(trained_tasks, known))}
    jobs = [EpisodeJob(str(policy_dir), env_name, task, i, eval_seed(seed, seed_index[task], i), image_size, camera,
                       str(Path(video_dir) / f"{task}_{i:03d}.mp4") if video_dir is not None and i < videos_per_task
                       else None)
            for task in tasks for i in range(episodes_per_task)]
    start = time.perf_counter()
    records: list[EpisodeRecord] = []
    bar = tqdm(total=len(jobs), desc="eval", unit="ep", disable=not progress)
    for rec in _run_jobs(jobs, workers, threads):
        records.append(rec)
        bar.update(1)
        bar.set_postfix(task=rec.task, success=f"{sum(r.success for r in records)}/{len(records)}")
    bar.close()
    records.sort(key=lambda r: (tasks.index(r.task), r.episode))
    per_task = {}
    for task in tasks:
        rs = [r for r in records if r.task == task]
        per_task[task] = {"success_rate": sum(r.success for r in rs) / len(rs), "episodes": len(rs),
                          "mean_length": float(np.mean([r.length for r in rs])), **envs.memory_facts(env_name, task)}
    result = EvalResult(per_task, len(records), time.perf_counter() - start,
                        [r.video for r in records if r.video], records)
    if chart is not None:
        from rollout.plots import success_chart

        result.chart = success_chart(per_task, chart, title=f"{Path(policy_dir).name}: success per task")
    if memory_figure is not None:
        from rollout.plots import memory_figure as plot_memory

        first = eval_seed(seed, seed_index[tasks[0]], 0)
        trace = memory_trace(policy_dir, env_name, tasks[0], first, image_size, camera, threads)
        result.memory_figure = plot_memory(trace, memory_figure)
    return result


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _require_ttm(policy_dir: str | Path) -> None:
    from policy.policy_dir import load_policy_dir

    from policy.controllers import controller_info

    kind = load_policy_dir(policy_dir).cfg.model.controller.type
    if not controller_info(kind).attention_maps:
        raise ValueError(f"--memory-figure: expected a TTM policy (model.controller.type 'ttm'), got {kind!r}")


def _run_jobs(jobs: list[EpisodeJob], workers: int, threads: int):
    if workers == 1:
        _init_worker(threads)
        try:
            for job in jobs:
                yield run_episode(job)
        finally:
            _close_worker_envs()
            # The next evaluate() in this process must load the policy again: training's in-loop
            # evaluation rewrites the same policy directory with new weights.
            _RUNNERS.clear()
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(run_episode, jobs)
        # All done: let the workers exit normally (their atexit hooks free the renderers) instead of
        # the terminate() that leaving the `with` sends; an error still terminates them.
        pool.close()
        pool.join()


# Per worker process: one runner per policy dir, one env per task (rendering contexts are expensive).
_RUNNERS: dict[str, Any] = {}
_ENVS: dict[tuple, Any] = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _close_worker_envs() -> None:
    # Free the EGL contexts now, not in interpreter-exit finalisers.
    while _ENVS:
        _ENVS.popitem()[1].close()


def run_episode(job: EpisodeJob) -> EpisodeRecord:
    import envs
    from policy.runner import PolicyRunner

    runner = _RUNNERS.get(job.policy_dir)
    if runner is None:
        runner = _RUNNERS[job.policy_dir] = PolicyRunner.load(job.policy_dir, threads=None)
    key = (job.env_name, job.task, job.image_size, job.camera)
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = envs.make(job.env_name, task=job.task, image_size=job.image_size, camera=job.camera)
    ts = env.reset(seed=job.seed)
    runner.reset(str(env.instruction))
    cam = runner.spec.camera_key
    frames = [ts.observation[cam]] if job.video_path else []
    total = 0.0
    digest = hashlib.blake2b(digest_size=8)
    while not ts.last():
        action = runner.step(ts.observation)
        digest.update(action.tobytes())
        ts = env.step(action)
        total += float(ts.reward or 0.0)
        if job.video_path:
            frames.append(ts.observation[cam])
    video = write_video(Path(job.video_path), frames) if job.video_path else None
    success = bool(env.success)
    # The loop ended on a last step: termination (discount 0) is success or the terminate action,
    # truncation (discount 1) the step limit.
    outcome = "success" if success else ("policy terminated" if ts.discount == 0.0 else "time limit")
    return EpisodeRecord(job.task, job.episode, job.seed, str(env.instruction), success, int(env.step_count),
                         total, digest.hexdigest(), video, outcome, _episode_details(env))


def _episode_details(env: Any) -> dict[str, Any]:
    """JSON-safe scalars the env keeps about the episode (target slot, task state), else {}."""
    details: dict[str, Any] = {}
    target = getattr(env, "target", None)
    if isinstance(target, str):
        details["target"] = target
    # what else the task chose for the episode (tabletop: stack's base object, the pad, the direction)
    choice = getattr(env, "episode", None)
    if is_dataclass(choice):
        details.update({k: v for k, v in asdict(choice).items() if isinstance(v, str) and k not in details})
    for k, v in dict(getattr(env, "task_state", {}) or {}).items():
        if isinstance(v, (str, bool, int, float, np.generic)):
            details[k] = v.item() if isinstance(v, np.generic) else v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            details[k] = list(v)  # e.g. touch_order's touches, in order
    return details


def memory_trace(policy_dir: str | Path, env_name: str, task: str, seed: int, image_size: int, camera: str,
                 threads: int = 1) -> dict[str, Any]:
    """One episode with the TTM's read and write weights recorded at every step:
    {"read": [T,r,m+N], "write": [T,m,m+N+r], "memory_tokens": m, "input_tokens": N, "instruction", "task", "success"}."""
    import torch

    import envs
    from policy.runner import PolicyRunner

    torch.set_num_threads(threads)
    runner = PolicyRunner.load(policy_dir, record_attention=True, threads=None)
    env = envs.make(env_name, task=task, image_size=image_size, camera=camera)
    try:
        ts = env.reset(seed=seed)
        runner.reset(str(env.instruction))
        while not ts.last():
            ts = env.step(runner.step(ts.observation))
        success, instruction = bool(env.success), str(env.instruction)
    finally:
        env.close()
    read = np.concatenate([a["read"] for a in runner.attention])  # batch of 1 -> [T, ...]
    write = np.concatenate([a["write"] for a in runner.attention])
    m = runner.policy.cfg.model.controller.memory_tokens
    return {"read": read, "write": write, "memory_tokens": m, "input_tokens": read.shape[-1] - m,
            "instruction": instruction, "task": task, "success": success}


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, min_size: int = 256) -> str:
    """mp4 via imageio/ffmpeg; small frames are upscaled (nearest) so the video is watchable."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, min_size // frames[0].shape[0])
    with atomic_output(path, suffix=".mp4") as tmp:  # imageio picks the format from the extension
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=1) as w:
            for f in frames:
                w.append_data(np.repeat(np.repeat(f, scale, axis=0), scale, axis=1))
    return str(path)
