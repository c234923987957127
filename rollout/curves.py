"""Training curves: read the scalars a run logged to TensorBoard (RUN/tb) and plot them side by side.

`python run_policy.py plot-curves RUN [RUN ...] --out PNG [--tags ...] [--labels ...] [--smooth K]`
draws one panel per tag (train/loss, train/token_accuracy and, when logged, eval/success_rate) with a
line per run, so runs trained with different controllers or seeds compare on one figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TAGS = ("train/loss", "train/token_accuracy", "eval/success_rate")


def read_scalars(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} from every TensorBoard event file under RUN/tb (a resumed run appends
    new files; where two files log the same step, the later file wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tb"
    files = sorted(tb.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime) if tb.is_dir() else []
    if not files:
        raise FileNotFoundError(f"run {str(run_dir)!r}: expected TensorBoard event files under {str(tb)!r} "
                                "(written by `train`), found none")
    merged: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    out = {}
    for tag, pts in merged.items():
        steps = sorted(pts)
        out[tag] = (np.array(steps), np.array([pts[s] for s in steps]))
    return out


def _smooth(values: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over k points (k <= 1: unchanged); the first points average what exists."""
    if k <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - k, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _default_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name, with as many parent parts as it takes to tell the runs apart."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels  # the same directory named twice: refused by the caller


def plot_curves(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
                tags: Sequence[str] | None = None, smooth: int = 1, title: str | None = None) -> dict:
    """Plot `tags` for every run into one PNG; returns {"figure": path, "runs": {label: {tag: {...}}}}
    with each curve's first and last values (last = mean of the final `smooth` points; eval tags are not smoothed)."""
    from rollout.plots import _pyplot, _save

    if not run_dirs:
        raise ValueError("runs: expected at least one run directory, got none")
    labels = list(labels) if labels else _default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"labels: expected one per run ({len(run_dirs)}), got {len(labels)}")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:  # the summary is keyed by label: a repeated one would drop a run
        raise ValueError(f"labels: expected one distinct label per run, got {repeated} more than once")
    from rollout.plots import check_png_path

    check_png_path(out, "--out")  # before reading the event files
    if smooth < 1:
        raise ValueError(f"smooth: expected >= 1 points, got {smooth}")
    scalars = [read_scalars(r) for r in run_dirs]
    logged = {t for s in scalars for t in s}
    if tags:
        missing = [t for t in tags if t not in logged]
        if missing:
            raise ValueError(f"tags: {missing} were not logged by any run; logged tags: {sorted(logged)}")
        tags = list(tags)
    else:
        tags = [t for t in DEFAULT_TAGS if t in logged]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    summary: dict[str, dict] = {}
    for label, s in zip(labels, scalars):
        summary[label] = {}
        for ax, tag in zip(axes[0], tags):
            if tag not in s:
                continue
            steps, values = s[tag]
            k = 1 if tag.startswith("eval/") else smooth  # eval points are few and already averages
            ys = _smooth(values, k)
            ax.plot(steps, ys, label=label, marker="o" if len(steps) < 20 else None, lw=1.4)
            summary[label][tag] = {"first_step": int(steps[0]), "first": float(values[0]),
                                   "last_step": int(steps[-1]), "last": float(np.mean(values[-k:])),
                                   "points": int(len(steps))}
    for ax, tag in zip(axes[0], tags):
        ax.set_title(tag + (f" (mean of {smooth})" if smooth > 1 and not tag.startswith("eval/") else ""))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if tag.endswith("accuracy") or tag.startswith("eval/success"):
            ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        path = _save(fig, out)
    finally:
        plt.close(fig)
    return {"figure": path, "tags": tags, "runs": summary}
