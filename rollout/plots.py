"""Evaluation figures (matplotlib, Agg backend: no display needed): success per task and the TTM memory."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.atomic import atomic_output


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_png_path(path: str | Path, name: str = "figure path") -> Path:
    """Validate an output figure path before any work is done for it: a .png name in a directory that
    exists or can be made."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{name}: expected a .png file name, got {str(path)!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{name}: cannot create the directory {str(path.parent)!r} ({e.strerror})") from e
    return path


def _save(fig, path: str | Path) -> str:
    path = check_png_path(path)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return str(path)


def success_chart(per_task: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "success per task") -> str:
    """Bar chart of success rate per task (with episode counts), written as PNG -> path."""
    if not per_task:
        raise ValueError("per_task: expected results for at least one task, got none")
    plt = _pyplot()
    tasks = list(per_task)
    rates = [100 * float(per_task[t]["success_rate"]) for t in tasks]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) + 2), 3.2))
    bars = ax.bar(tasks, rates, color="#4C72B0")
    for b, t in zip(bars, tasks):
        ax.annotate(f"{b.get_height():.0f}% (n={int(per_task[t]['episodes'])})", (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("success (%)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def memory_figure(trace: Mapping[str, Any], path: str | Path) -> str:
    """What the TTM memory attends to, step by step over one episode.

    Top: read weights, the share of each step's read that comes from the memory tokens vs each input
    token (summed over the r read tokens). Bottom: write weights, the share of the new memory drawn
    from the old memory, the inputs and the step's outputs (summed over the m memory tokens).
    """
    read, write = np.asarray(trace["read"], np.float64), np.asarray(trace["write"], np.float64)
    m, n = int(trace["memory_tokens"]), int(trace["input_tokens"])
    if read.ndim != 3 or write.ndim != 3 or read.shape[-1] != m + n or write.shape[-1] < m + n:
        raise ValueError(f"memory trace: expected read [T,r,{m}+{n}] and write [T,m,{m}+{n}+r], got "
                         f"{read.shape} and {write.shape}")
    plt = _pyplot()
    # Normalise per step to fractions of the total weight (sums over selected tokens).
    r_src = read.sum(1) / read.sum((1, 2))[:, None]  # [T, m+n]
    w_src = write.sum(1) / write.sum((1, 2))[:, None]  # [T, m+n+r]
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    labels = ["mem"] * m + [f"in{i}" for i in range(n)]
    for ax, data, title, extra in ((axes[0], r_src, "read: where each step's read tokens come from", []),
                                   (axes[1], w_src, "write: where the new memory comes from",
                                    ["out"] * (w_src.shape[1] - m - n))):
        im = ax.imshow(data.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ax.axhline(m - 0.5, color="w", lw=1)
        if extra:
            ax.axhline(m + n - 0.5, color="w", lw=1)
        ax.set_ylabel("source token")
        ax.set_title(title, fontsize=10)
        ticks = [m // 2, m + n // 2] + ([m + n + len(extra) // 2] if extra else [])
        ax.set_yticks(ticks, ["memory", "inputs"] + (["outputs"] if extra else []))
        fig.colorbar(im, ax=ax, label="share of weight")
    axes[1].set_xlabel("episode step")
    status = "success" if trace.get("success") else "failure"
    # Instructions can be long: wrap them so the title stays inside the figure.
    title = f"TTM memory over an episode: {trace.get('task', '')} ({status})\n'{trace.get('instruction', '')}'"
    fig.suptitle("\n".join(textwrap.wrap(title, 90, replace_whitespace=False)), fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
