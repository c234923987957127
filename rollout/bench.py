"""Benchmarks that print JSON: policy step latency (simulator speed: rollout/bench_env.py)."""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
import torch


def _machine() -> dict:
    # The load average says how noisy the numbers are on a shared machine.
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def bench_step(policy_dir: str | None, config: str | None, steps: int, threads: int) -> dict:
    """Median/p90 latency of `PolicyRunner.step` at batch 1 (a trained policy or a fresh one from a config)."""
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
            "steps_per_second": round(1000 / statistics.median(ms), 1), "machine": _machine()}
