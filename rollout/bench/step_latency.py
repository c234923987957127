"""Step cost versus episode length, for every controller with the same tokenizer and head.

Every controller gets the same image tokenizer, head, frame and instruction; only the controller
differs. See bench_step_latency for how step t is timed.

TTM and LSTM carry a fixed-size state, so their step cost must not grow with t; the full-history
causal transformer attends over every past token (KV cache), so its cost grows; the RT-1 window
recomputes a fixed 6-frame window from cached image tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common.atomic import atomic_output
from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.machine import machine

DEFAULT_AT = (1, 10, 100, 1000)
PLOT_POINTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _build(config: str, controller: str, overrides: list[str], proprio_dim: int, action_dims: int, seed: int):
    import torch

    from policy.config import load_config
    from policy.model import PolicyModel

    # memory_horizon 0: the controller's own recurrent state (a horizon > 0 re-runs the last H frames),
    # which is what whole-episode training produces.
    from policy.controllers import controller_info

    extra = [f"model.controller.type={controller}"]
    if controller_info(controller).carried_memory:
        extra += ["model.controller.memory_horizon=0", "data.sequence=episode"]
    cfg = load_config(config, list(overrides) + extra)
    torch.manual_seed(seed)
    m = cfg.model
    model = PolicyModel(m, vocab_size=m.language.vocab_size, num_action_dims=action_dims,
                        proprio_dim=proprio_dim if m.use_proprio else 0).eval()
    return cfg, model


def bench_step_latency(config: str, controllers: tuple[str, ...] | None = None,
                       at: tuple[int, ...] = DEFAULT_AT, samples: int = 30, threads: int = 2,
                       overrides: list[str] | None = None, action_dims: int = 5, proprio_dim: int = 4,
                       seed: int = 0, plot: str | Path | None = None, progress: bool = True) -> dict:
    """Latency of policy step t, for t in `at`, measured `samples` times from the state after step t-1.

    Each controller is first stepped (untimed) through an episode to max(at), keeping its state before
    every reported step. The timed calls then replay step t from that saved state, in a seeded random
    order over (controller, t): machine noise is spread over all points instead of hitting the late
    steps of an episode, and "the median of many" is a median over `samples` calls.
    """
    if not at or min(at) < 1:
        raise ValueError(f"--at: expected step numbers >= 1, got {list(at)}")
    if samples < 1 or threads < 1:
        raise ValueError(f"--samples, --threads: expected >= 1, got {samples}, {threads}")
    import torch

    from policy.controllers import controller_names

    controllers = tuple(controllers or controller_names())  # default: every registered controller
    unknown = [c for c in controllers if c not in controller_names()]
    if unknown:
        raise ValueError(f"--controllers: expected names from {list(controller_names())}, got {unknown}")
    torch.set_num_threads(threads)
    overrides = list(overrides or [])
    at = tuple(sorted(set(int(s) for s in at)))
    points = tuple(sorted(set(at) | (set(PLOT_POINTS) & set(range(1, max(at) + 1)) if plot else set())))
    built = {c: _build(config, c, overrides, proprio_dim, action_dims, seed) for c in controllers}
    cfg = next(iter(built.values()))[0]
    size = cfg.model.image.image_size
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8, generator=g)
    proprio = torch.randn(1, proprio_dim, generator=g) if cfg.model.use_proprio else None

    from tqdm import tqdm

    contexts, saved = {}, {}
    with torch.inference_mode():
        bar = tqdm(total=len(controllers) * max(points), desc="roll out", unit="step", disable=not progress)
        for c, (_, model) in built.items():
            ids = torch.randint(3, cfg.model.language.vocab_size, (1, cfg.model.language.max_tokens), generator=g)
            contexts[c] = model.encode_instruction(ids, torch.ones_like(ids, dtype=torch.bool))
            state = model.init_state(1)
            for t in range(1, max(points) + 1):
                if t in points:
                    saved[c, t] = state  # step() returns a new state; the saved one is never mutated
                _, state = model.step(image, contexts[c], proprio, state)
                bar.update(1)
        bar.close()
        order = [(c, t) for c in controllers for t in points] * samples
        np.random.default_rng(seed).shuffle(order)
        times: dict[tuple[str, int], list[float]] = {k: [] for k in saved}
        for c, _ in built.items():  # warm-up
            for _ in range(3):
                built[c][1].step(image, contexts[c], proprio, saved[c, points[0]])
        for c, t in tqdm(order, desc="timed steps", unit="step", disable=not progress):
            model = built[c][1]
            t0 = time.perf_counter()
            model.step(image, contexts[c], proprio, saved[c, t])
            times[c, t].append(time.perf_counter() - t0)

    results = {}
    ref = at[1] if len(at) > 1 else at[0]
    for c in controllers:
        per_step = {}
        for s in points:
            ms = 1000 * np.asarray(times[c, s])
            per_step[str(s)] = {"median_ms": round(float(np.median(ms)), 3),
                                "p90_ms": round(float(np.percentile(ms, 90)), 3)}
        results[c] = {
            "latency_at_step": {str(s): per_step[str(s)] for s in at},
            "ratio_last_to_ref": round(per_step[str(at[-1])]["median_ms"] / per_step[str(ref)]["median_ms"], 3),
            "steps_per_second_at_last": round(1000 / per_step[str(at[-1])]["median_ms"], 1),
            "params": int(sum(p.numel() for p in built[c][1].parameters())),
            **({"plot_points": per_step} if plot else {}),
        }
    out = {"benchmark": "step-latency", "config": str(config), "overrides": overrides, "image_size": size,
           "controllers": list(controllers), "at": list(at), "samples_per_point": samples, "threads": threads,
           "ratio_definition": f"median latency at step {at[-1]} / at step {ref}",
           "results": results, "machine": machine()}
    if plot:
        out["plot"] = _plot(out, Path(plot))
    return out


def _plot(out: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for c, r in out["results"].items():
        pts = sorted((int(s), v["median_ms"]) for s, v in r["plot_points"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
    ax.set_xscale("log")
    ax.set_xlabel("episode step")
    ax.set_ylabel(f"policy step latency (ms, median of {out['samples_per_point']})")
    ax.set_title(f"Step cost vs episode length ({Path(out['config']).stem}, {out['threads']} threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return str(path)


def summary_line(res: dict) -> str:
    parts = [f"{c}: " + " ".join(f"{s}:{v['median_ms']}ms" for s, v in r["latency_at_step"].items())
             for c, r in res["results"].items()]
    return " | ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_config(p, "config whose tokenizer and head every controller shares")
    p.add_argument("--controllers", default=None,
                   help="controller types compared (same tokenizer and head), comma-separated "
                        "(default: every registered controller)")
    p.add_argument("--at", type=A.step_list, default=DEFAULT_AT, help="episode steps reported (comma list)")
    p.add_argument("--samples", type=A.positive_int, default=30,
                   help="timed calls of each step t (from the saved state after step t-1)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a latency-vs-step plot")
    A.add_threads(p)
    A.add_overrides(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    res = bench_step_latency(str(A.config_path(a)), tuple(a.controllers.split(",")) if a.controllers else None, a.at, samples=a.samples, threads=a.threads,
                             overrides=a.overrides, plot=a.plot)
    print(json.dumps(res, indent=2))
    return res


register("step-latency", "per-step latency at episode steps 1..1000 for every controller, side by side",
         add_arguments, run)

__all__ = ["bench_step_latency", "DEFAULT_AT"]
