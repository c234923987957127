"""`bench step`: policy step latency at batch 1 (a trained policy directory or a fresh model from a config).

With `--load K`, step latency on a loaded machine: K busy processes spin beside the policy, as other
programs would on a robot's shared computer. Each thread setting (torch threads x OpenMP wait policy) is
measured in a fresh process, since OMP_WAIT_POLICY is read once when the OpenMP runtime starts, first
with the machine idle and then loaded. With the default active waiting, OpenMP threads spin for their
work-mates; on busy cores a spinning thread holds the core its mate needs, and each step waits for the
slowest thread."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

        runner = PolicyRunner.load(policy_dir, threads=None)
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


# (threads, OMP_WAIT_POLICY) measured under load; None = the variable unset (libgomp's default: spin a
# while, then sleep). "chosen" is what run_policy.py serve / eval / bench step set (policy.threads).
LOAD_SETTINGS = ((2, None), (2, "PASSIVE"), (1, None), (1, "PASSIVE"))


def _burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def _measure_in_subprocess(policy_dir: str | None, config: str, steps: int, threads: int, wait: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_WAIT_POLICY"] = wait or ""  # "" = unset for the child (run_policy.py leaves an empty one alone)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [sys.executable, str(A.REPO_ROOT / "run_policy.py"), "bench", "step", "--steps", str(steps),
               "--threads", str(threads), "--json", str(out)]
        cmd += ["--policy", policy_dir] if policy_dir else ["--config", config]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench step --load: the measuring process ({threads} threads, OMP_WAIT_POLICY="
                               f"{wait or 'unset'}) failed: {done.stderr.strip()[-500:]}")
        return json.loads(out.read_text())


def bench_step_under_load(policy_dir: str | None, config: str, steps: int, load: int,
                          settings: tuple[tuple[int, str | None], ...] = LOAD_SETTINGS) -> dict:
    """Step latency for each (threads, wait policy) of `settings`, idle and with `load` busy processes."""
    rows = []
    for threads, wait in settings:
        row: dict = {"threads": threads, "omp_wait_policy": wait or "unset (libgomp default)"}
        for state in ("idle", "loaded"):
            burners = [_burner() for _ in range(load if state == "loaded" else 0)]
            try:
                time.sleep(0.5 if burners else 0)  # let the burners reach their cores
                r = _measure_in_subprocess(policy_dir, config, steps, threads, wait)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            row[state] = {"median_ms": r["median_ms"], "p90_ms": r["p90_ms"]}
        row["loaded_over_idle_p90"] = round(row["loaded"]["p90_ms"] / row["idle"]["p90_ms"], 2)
        rows.append(row)
    from policy.threads import RUNTIME_THREADS, RUNTIME_WAIT_POLICY

    best = min(rows, key=lambda r: r["loaded"]["p90_ms"])
    return {"benchmark": "step_under_load", "source": policy_dir or config, "steps": steps, "load_processes": load,
            "cpus": os.cpu_count(), "settings": rows,
            "chosen": {"threads": RUNTIME_THREADS, "omp_wait_policy": RUNTIME_WAIT_POLICY},
            "best_loaded_p90": {"threads": best["threads"], "omp_wait_policy": best["omp_wait_policy"],
                                "p90_ms": best["loaded"]["p90_ms"]},
            "machine": machine()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_policy(p, "policy directory (default: a fresh model from --config)")
    A.add_config(p, "config for a freshly initialised policy, without --policy")
    A.add_steps(p, 200)
    A.add_threads(p)
    p.add_argument("--load", type=int, default=0, metavar="K",
                   help="measure with K busy processes beside the policy, for each thread setting "
                        f"{[(t, w or 'unset') for t, w in LOAD_SETTINGS]} (idle and loaded; --threads is ignored)")
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    if a.load < 0:
        raise ValueError(f"--load: expected a number of busy processes >= 0, got {a.load}")
    if a.load:
        res = bench_step_under_load(a.policy, str(A.config_path(a)), a.steps, a.load)
    else:
        res = bench_step(a.policy, str(A.config_path(a)), a.steps, a.threads)
    print(json.dumps(res, indent=2))
    return res


register("step", "policy step latency at batch 1", add_arguments, run)
