"""Scripted demonstrations -> RLDS.

Worker processes run the environment and its scripted expert (rendering included) and send finished
episodes back as numpy; the parent writes them with the atomic RLDS writer, so an interrupted
collection leaves no dataset behind. With noise, executed actions are perturbed while the recorded
action is the expert's clean action for the state reached (DART): demonstrations show recoveries. Workers are spawned, not forked: the parent has TensorFlow loaded.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.seeds import demo_seed


@dataclass(frozen=True)
class EpisodeRequest:
    env: str
    task: str
    seed: int
    image_size: int
    camera: str
    noise: float
    goals: str | None = None  # Meta-World: "benchmark" (the 50 MT goals) or "random"; None: the env's default


def _env_kwargs(req: EpisodeRequest) -> dict[str, Any]:
    return {} if req.goals is None else {"goals": req.goals}


def run_expert_episode(req: EpisodeRequest, env=None):
    """Run one scripted episode; returns a datasets.rlds_writer.Episode."""
    import envs
    from datasets.rlds_writer import Episode

    own = env is None
    if own:
        env = envs.make(req.env, task=req.task, image_size=req.image_size, camera=req.camera, **_env_kwargs(req))
    try:
        expert = envs.make_expert(env, noise=req.noise, seed=req.seed)  # tabletop or Meta-World
        ts = env.reset(seed=req.seed)
        expert.reset()
        observations, actions, rewards, discounts = [dict(ts.observation)], [], [], []
        while not ts.last():
            executed = np.asarray(expert.act(ts), dtype=np.float32)
            ts = env.step(executed)
            # With --noise the expert executes a perturbed action but records its clean one (DART).
            actions.append(np.asarray(getattr(expert, "clean_action", executed), dtype=np.float32))
            rewards.append(float(ts.reward))
            discounts.append(float(ts.discount))
            observations.append(dict(ts.observation))
        success = bool(env.success)
        meta = {"task": req.task, "instruction": str(env.instruction), "seed": req.seed, "success": success,
                "env": req.env, "env_version": str(getattr(env, "VERSION", "1"))}
        return Episode(observations, actions, rewards, discounts, terminal=ts.discount == 0.0, metadata=meta)
    finally:
        if own:
            env.close()


_WORKER_ENVS: dict[tuple, Any] = {}


def _worker(req: EpisodeRequest):
    import envs

    key = (req.env, req.task, req.image_size, req.camera, req.goals)
    if key not in _WORKER_ENVS:  # one env per task per worker, reused across episodes
        _WORKER_ENVS[key] = envs.make(req.env, task=req.task, image_size=req.image_size, camera=req.camera,
                                      **_env_kwargs(req))
    return run_expert_episode(req, _WORKER_ENVS[key])


def iter_episodes(requests: list[EpisodeRequest], workers: int) -> Iterator:
    if workers <= 1:
        try:
            for r in requests:
                yield _worker(r)
        finally:  # free the EGL contexts now, not in interpreter-exit finalisers
            while _WORKER_ENVS:
                _WORKER_ENVS.popitem()[1].close()
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_worker, requests, chunksize=2)


def _action_names(env_name: str, size: int) -> list[str]:
    """The env's action names (common.action_interface), checked against the spec's action size."""
    import envs

    names = list(envs.action_names(env_name))
    if len(names) != size:
        raise ValueError(f"env {env_name!r}: its action spec has {size} dimensions but its action interface "
                         f"names {len(names)} ({names}); common/action_interface.py and the env disagree")
    return names


@dataclass
class CollectResult:
    path: str
    episodes_written: int
    episodes_failed: int
    transitions: int
    seconds: float
    per_task: dict[str, dict[str, float]]

    def to_json(self) -> dict:
        return {"path": self.path, "episodes_written": self.episodes_written,
                "episodes_failed": self.episodes_failed, "transitions": self.transitions,
                "seconds": round(self.seconds, 2), "per_task": self.per_task}


def reuse_dataset(out: str | Path, env_name: str, tasks: list[str], episodes_per_task: int, seed: int,
                  noise: float) -> CollectResult | None:
    """The dataset an earlier `collect` wrote at `out` with exactly these settings (None if there is none).
    Datasets are written atomically, so one that exists is complete; one made with other settings is
    refused, naming the setting, rather than trained on by mistake."""
    from datasets.rlds_dataset import RLDSDataset

    path = Path(out)
    if not path.exists():
        return None
    info = RLDSDataset(path).sidecar  # DatasetError, naming the path, if it is not a dataset
    want = {"env": env_name, "tasks": list(tasks), "num_episodes": episodes_per_task * len(tasks), "seed": seed,
            "noise": noise}
    for key, value in want.items():
        if info.get(key) != value:
            raise ValueError(f"{str(path)!r}: the dataset there has {key} = {info.get(key)!r}, this run asks for "
                             f"{value!r}; use another --out, or remove it to collect again")
    return CollectResult(str(path), int(info["num_episodes"]), 0, int(info.get("num_transitions", 0)), 0.0, {})


class _DeferredInterrupt:
    """Ctrl-C while an episode is being written is delivered right after it: an exception raised inside
    TF's record writer can be swallowed there, and the run would go on as if nothing happened."""

    def __init__(self):
        self.critical = self.pending = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self.critical:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        self.critical = True

    def __exit__(self, *exc):
        self.critical = False
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def collect(env_name: str, tasks: list[str], episodes_per_task: int, out: str | Path, seed: int = 0,
            image_size: int = 64, camera: str | None = None, workers: int = 2, noise: float = 0.0,
            keep_failures: bool = False, image_encoding: str = "png", progress: bool = True,
            episodes_per_shard: int = 100, overwrite: bool = False, goals: str | None = None) -> CollectResult:
    """Write `episodes_per_task` expert episodes per task to a new RLDS dataset at `out`.

    Re-running: an existing complete dataset at `out` is refused unless `overwrite` (then it is replaced
    only once the new one is complete); an interrupted run leaves only a hidden staging directory, removed
    by the next run. Failed expert episodes are dropped unless `keep_failures` (then marked success=False).
    `goals` (Meta-World only): "benchmark" cycles each task's 50 MT goals (the default; more than 50
    episodes per task repeat goals), "random" draws a fresh goal per episode from the same ranges.
    """
    import envs
    from tqdm import tqdm

    from datasets.rlds_writer import AtomicRLDSWriter

    if episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task: expected >= 1, got {episodes_per_task}")
    if goals is not None:
        if envs.env_family(env_name) != "metaworld":
            raise ValueError(f"--goals: only Meta-World envs have goal sets; env {env_name!r} does not take it")
        from envs.metaworld_env import GOALS

        if goals not in GOALS:
            raise ValueError(f"--goals: expected one of {list(GOALS)}, got {goals!r}")
    camera = envs.default_camera(env_name) if camera is None else camera  # recorded in the sidecar for eval
    requests = [EpisodeRequest(env_name, task, demo_seed(seed, ti, i), image_size, camera, noise, goals)
                for ti, task in enumerate(tasks) for i in range(episodes_per_task)]
    probe = envs.make(env_name, task=tasks[0], image_size=image_size, camera=camera)
    obs_spec, act_spec = probe.observation_spec(), probe.action_spec()
    probe.close()
    sidecar = {"env": env_name, "tasks": tasks, "image_size": image_size, "camera": camera, "seed": seed,
               "noise": noise, "action_names": _action_names(env_name, act_spec.shape[0]),
               "action_low": np.asarray(act_spec.minimum, np.float32).tolist(),
               "action_high": np.asarray(act_spec.maximum, np.float32).tolist()}
    sidecar["keep_failures"] = keep_failures
    if goals is not None:
        sidecar["goals"] = goals
    writer = AtomicRLDSWriter(out, obs_spec, act_spec, sidecar, image_encoding,
                              episodes_per_shard=episodes_per_shard, overwrite=overwrite)
    per_task = {t: {"episodes": 0, "successes": 0, "steps": 0} for t in tasks}
    failed = 0
    start = time.perf_counter()
    guard = _DeferredInterrupt()
    try:
        bar = tqdm(iter_episodes(requests, workers), total=len(requests), desc="collect", unit="ep",
                   disable=not progress)
        for ep in bar:
            stats = per_task[ep.metadata["task"]]
            stats["episodes"] += 1
            stats["steps"] += len(ep.actions)
            if ep.metadata["success"]:
                stats["successes"] += 1
            else:
                failed += 1
                if not keep_failures:
                    continue
            with guard:
                writer.add(ep)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        guard.restore()
    summary = {t: {"expert_success": s["successes"] / max(s["episodes"], 1),
                   "mean_length": s["steps"] / max(s["episodes"], 1)} for t, s in per_task.items()}
    return CollectResult(str(path), writer.num_episodes, failed, writer.num_steps,
                         time.perf_counter() - start, summary)
