"""Step cost versus episode length, for every controller with the same tokenizer and head.

For each controller, R episodes of length max(at) + K - 1 are stepped with one fixed random frame;
the latency "at step t" is the median of steps t .. t+K-1 over all R episodes (R*K samples). The
controllers run in one process, interleaved per episode, so machine noise hits them alike.

TTM and LSTM carry a fixed-size state, so their step cost must not grow with t; the full-history
causal transformer attends over every past token (KV cache), so its cost grows; the RT-1 window
recomputes a fixed 6-frame window from cached image tokens.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rollout.bench import _machine

DEFAULT_CONTROLLERS = ("ttm", "rt1", "causal_transformer", "lstm")
DEFAULT_AT = (1, 10, 100, 1000)


def _build(config: str, controller: str, overrides: list[str], proprio_dim: int, action_dims: int, seed: int):
    from policy.config import load_config
    from policy.model import PolicyModel

    # memory_horizon 0: the controller's own recurrent state (a horizon > 0 re-runs the last H frames),
    # which is what whole-episode training produces.
    extra = [f"model.controller.type={controller}"]
    if controller != "rt1":
        extra += ["model.controller.memory_horizon=0", "data.sequence=episode"]
    cfg = load_config(config, list(overrides) + extra)
    torch.manual_seed(seed)
    m = cfg.model
    model = PolicyModel(m, vocab_size=m.language.vocab_size, num_action_dims=action_dims,
                        proprio_dim=proprio_dim if m.use_proprio else 0).eval()
    return cfg, model


def bench_step_latency(config: str, controllers: tuple[str, ...] = DEFAULT_CONTROLLERS,
                       at: tuple[int, ...] = DEFAULT_AT, repeats: int = 3, window: int = 10, threads: int = 2,
                       overrides: list[str] | None = None, action_dims: int = 5, proprio_dim: int = 4,
                       seed: int = 0, plot: str | Path | None = None, progress: bool = True) -> dict:
    if not at or min(at) < 1:
        raise ValueError(f"--at: expected step numbers >= 1, got {list(at)}")
    if repeats < 1 or window < 1 or threads < 1:
        raise ValueError(f"--repeats, --window, --threads: expected >= 1, got {repeats}, {window}, {threads}")
    from policy.controllers import CONTROLLER_TYPES

    unknown = [c for c in controllers if c not in CONTROLLER_TYPES]
    if unknown:
        raise ValueError(f"--controllers: expected names from {list(CONTROLLER_TYPES)}, got {unknown}")
    torch.set_num_threads(threads)
    overrides = list(overrides or [])
    built = {c: _build(config, c, overrides, proprio_dim, action_dims, seed) for c in controllers}
    cfg = next(iter(built.values()))[0]
    size = cfg.model.image.image_size
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8, generator=g)
    proprio = torch.randn(1, proprio_dim, generator=g) if cfg.model.use_proprio else None
    length = max(at) + window - 1
    times = {c: np.zeros((repeats, length)) for c in controllers}

    from tqdm import tqdm

    bar = tqdm(total=repeats * len(controllers) * length, desc="step-latency", unit="step", disable=not progress)
    with torch.inference_mode():
        contexts = {}
        for c, (_, model) in built.items():
            ids = torch.randint(3, cfg.model.language.vocab_size, (1, cfg.model.language.max_tokens), generator=g)
            contexts[c] = model.encode_instruction(ids, torch.ones_like(ids, dtype=torch.bool))
        for r in range(repeats):
            for c, (_, model) in built.items():  # interleaved: noise is shared, not aimed at one controller
                state = model.init_state(1)
                for _ in range(3):  # warm-up outside the timed episode
                    model.step(image, contexts[c], proprio, model.init_state(1))
                for t in range(length):
                    t0 = time.perf_counter()
                    _, state = model.step(image, contexts[c], proprio, state)
                    times[c][r, t] = time.perf_counter() - t0
                bar.update(length)
    bar.close()

    results = {}
    for c in controllers:
        per_step = {}
        for s in at:
            sample = 1000 * times[c][:, s - 1:s - 1 + window].reshape(-1)
            per_step[str(s)] = {"median_ms": round(float(np.median(sample)), 3),
                                "p90_ms": round(float(np.percentile(sample, 90)), 3)}
        first, last = str(at[1] if len(at) > 1 else at[0]), str(at[-1])
        results[c] = {
            "latency_at_step": per_step,
            "ratio_last_to_second": round(per_step[last]["median_ms"] / per_step[first]["median_ms"], 3),
            "steps_per_second_at_last": round(1000 / per_step[last]["median_ms"], 1),
            "params": int(sum(p.numel() for p in built[c][1].parameters())),
        }
    out = {"benchmark": "step-latency", "config": str(config), "overrides": overrides, "image_size": size,
           "controllers": list(controllers), "at": list(at), "repeats": repeats, "window": window,
           "samples_per_point": repeats * window, "threads": threads,
           "ratio_definition": f"median latency at step {at[-1]} / at step {at[1] if len(at) > 1 else at[0]}",
           "results": results, "machine": _machine()}
    if plot:
        out["plot"] = _plot(out, times, Path(plot))
    return out


def _plot(out: dict, times: dict[str, np.ndarray], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for c, t in times.items():
        med = 1000 * np.median(t, axis=0)
        steps = np.arange(1, med.size + 1)
        # A running median over 9 steps keeps the trend readable on a noisy shared machine.
        smooth = np.array([np.median(med[max(0, i - 4):i + 5]) for i in range(med.size)])
        ax.plot(steps, smooth, label=c)
    ax.set_xscale("log")
    ax.set_xlabel("episode step")
    ax.set_ylabel("policy step latency (ms, median)")
    ax.set_title(f"Step cost vs episode length ({Path(out['config']).stem}, {out['threads']} threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def summary_line(res: dict) -> str:
    parts = [f"{c}: " + " ".join(f"{s}:{v['median_ms']}ms" for s, v in r["latency_at_step"].items())
             for c, r in res["results"].items()]
    return " | ".join(parts)


__all__ = ["bench_step_latency", "DEFAULT_AT", "DEFAULT_CONTROLLERS"]
