"""`bench step`: policy step latency at batch 1 (a trained policy directory or a fresh model from a config)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.machine import machine


def bench_step(policy_dir: str | None, config: str | None, steps: int, threads: int) -> dict:
    """Median/p90 latency of `PolicyRunner.step` at batch 1 (a trained policy or a fresh one from a config)."""
    import torch

    torch.set_num_threads(threads)
    if policy_dir:
        from policy.runner import PolicyRunner

        runner = PolicyRunner.load(policy_dir)
        spec = runner.spec
        rng = np.random.default_rng(0)
        obs = {spec.camera_key: rng.integers(0, 255, spec.image_shape, dtype=np.uint8)}
        if spec.proprio_key:
            obs[spec.proprio_key] = rng.normal(size=spec.proprio_dim).astype(np.float32)
        runner.reset("pick up the red block")
        step = lambda: runner.step(obs)  # noqa: E731
        source = policy_dir
    else:
        from policy.config import load_config
        from policy.model import PolicyModel

        cfg = load_config(config)
        model = PolicyModel(cfg.model, vocab_size=cfg.model.language.vocab_size, num_action_dims=5, proprio_dim=4).eval()
        size = cfg.model.image.image_size
        image = torch.randint(0, 255, (1, size, size, 3), dtype=torch.uint8)
        proprio = torch.zeros(1, 4) if cfg.model.use_proprio else None
        with torch.inference_mode():
            ids = torch.ones(1, cfg.model.language.max_tokens, dtype=torch.long)
            context = model.encode_instruction(ids, ids > 0)
        state = [model.init_state(1)]

        @torch.inference_mode()
        def step():
            _, state[0] = model.step(image, context, proprio, state[0])

        source = config
    for _ in range(10):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ms = sorted(1000 * x for x in times)
    return {"benchmark": "step", "source": str(source), "steps": steps, "threads": threads,
            "median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * len(ms))], 3),
            "steps_per_second": round(1000 / statistics.median(ms), 1), "machine": machine()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_policy(p, "policy directory (default: a fresh model from --config)")
    A.add_config(p, "config for a freshly initialised policy, without --policy")
    A.add_steps(p, 200)
    A.add_threads(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    res = bench_step(a.policy, str(A.config_path(a)), a.steps, a.threads)
    print(json.dumps(res, indent=2))
    return res


register("step", "policy step latency at batch 1", add_arguments, run)
