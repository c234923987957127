"""Stage 2 of the data path: one pass over a dataset's metadata (instructions, action statistics, episode
lengths), cached as JSON next to the dataset when it is writable, else in the user cache.

The cache file is named by a digest of what the scan reads (the entry's instruction and action keys, the
split and its shard files), so another standardisation or a re-collected dataset is scanned afresh. A damaged
cache file is recomputed; writes go through common.atomic (fsynced, renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from common.atomic import write_text_atomic
from datasets.source import DatasetError, user_cache_root


def action_statistics(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
            "max": a.max(0).tolist(), "p01": np.percentile(a, 1, axis=0).tolist(),
            "p99": np.percentile(a, 99, axis=0).tolist(), "count": int(a.shape[0])}


def compute_scan(episodes: Iterable[dict], action_names: list[str], where: str) -> dict[str, Any]:
    """Episodes as numpy (action [L,A], instruction [L] bytes) -> the scan record."""
    actions, instructions, lengths = [], set(), []
    for ep in episodes:
        actions.append(ep["action"])
        lengths.append(len(ep["action"]))
        instructions.update(s.decode("utf-8") for s in np.unique(ep["instruction"]))
    if not actions:
        raise DatasetError(f"{where}: no episode has a valid step")
    a = np.concatenate(actions, 0)
    return {
        "instructions": sorted(instructions),
        "action_stats": action_statistics(a),
        "action_names": action_names,
        "num_transitions": int(a.shape[0]),
        "num_episodes": len(lengths),
        "max_episode_length": int(max(lengths)),
        "mean_episode_length": float(np.mean(lengths)),
    }


# `data` below is a datasets.rlds_dataset.RLDSDataset (not imported: that module builds on this one).
def scan_digest(data: Any) -> str:
    e = data.entry
    si = data.builder.info.splits[data.split]
    ident = repr((e.instruction, e.instruction_encoding, e.action, e.action_fields, data.split,
                  si.num_examples, [str(p) for p in si.filepaths]))
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


class ScanCache:
    """JSON files next to the dataset when it is writable, else in the user cache."""

    def __init__(self, dataset_dir: str):
        self.dataset_dir = dataset_dir

    def dirs(self) -> list[Path]:
        user = user_cache_root() / hashlib.sha1(self.dataset_dir.encode()).hexdigest()[:16]
        if "://" in self.dataset_dir:
            return [user]
        d = Path(self.dataset_dir)
        # Owner write bit, not os.access: root may write anywhere, but a read-only dataset stays untouched.
        writable = bool(d.stat().st_mode & stat.S_IWUSR) and os.access(d, os.W_OK)
        return [d, user] if writable else [user]

    def read(self, name: str) -> tuple[dict, Path] | None:
        """(the cached record, its file), or None when no readable copy exists."""
        for d in self.dirs():
            f = d / name
            if f.is_file():
                try:
                    return json.loads(f.read_text()), f
                except ValueError:
                    continue  # a damaged cache is recomputed
        return None

    def write(self, name: str, data: dict) -> None:
        for d in self.dirs():
            try:
                d.mkdir(parents=True, exist_ok=True)
                write_text_atomic(d / name, json.dumps(data))
                return
            except OSError:
                continue


def dataset_scan(data: Any) -> tuple[dict[str, Any], str]:
    """(the scan of `data`, where it came from: a cache file, or computed now)."""
    cache = ScanCache(data.dir)
    name = f"scan-{data.split}-{scan_digest(data)}.json"
    cached = cache.read(name)
    if cached is not None:
        return cached[0], f"scan cache {str(cached[1])!r}"
    scan = compute_scan(data.episode_tensors(decode_images=False).as_numpy_iterator(), data.action_names,
                        f"dataset {data.dir!r}: split {data.split!r}")
    cache.write(name, scan)
    return scan, "scan computed now"
