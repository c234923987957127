"""Stage 2 of the data path: one pass over a dataset's metadata (instructions, action statistics, episode
lengths), cached as JSON next to the dataset when it is writable, else in the user cache.

The cache file is named by a digest of how the scan reads the dataset (the entry's instruction and action
keys, the split), so each standardisation has its own. Inside, the scan is stored with the content key of
what it summarises (content_key: every shard file's name, size and mtime_ns, and the digests of
dataset_info.json, features.json and the sidecar): a dataset replaced at the same path, even with the same
episode count, or a shard whose bytes changed, no longer matches, and is scanned afresh (the file is
rewritten). A damaged cache file is recomputed; writes go through common.atomic (fsynced, renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from common.atomic import write_text_atomic
from datasets.source import SIDECAR, DatasetError, user_cache_root
from datasets.tf_setup import tf

CACHE_FORMAT = 2  # {"format", "key", "scan"}; files of format 1 (a bare scan keyed by path and counts) are stale
METADATA_FILES = ("dataset_info.json", "features.json", SIDECAR)


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
    """The digest in the cache file's name: how the scan reads the dataset (not what the files hold)."""
    e = data.entry
    ident = repr((e.instruction, e.instruction_encoding, e.action, e.action_fields, list(data.action_names),
                  data.split))
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def _stat(path: str) -> list[int]:
    """[size, mtime_ns] of a file; [-1, -1] when it is missing (the read names it)."""
    try:
        if "://" in path:
            st = tf.io.gfile.stat(path)
            return [int(st.length), int(st.mtime_nsec)]
        st = os.stat(path)
        return [int(st.st_size), int(st.st_mtime_ns)]
    except (OSError, tf.errors.OpError):
        return [-1, -1]


def _file_digest(path: str) -> str | None:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()
    except tf.errors.OpError:
        return None


def content_key(data: Any) -> dict[str, Any]:
    """What the scan summarises, cheaply (stats only, no payload reads): [name, size, mtime_ns] of every shard
    file of the split and the sha1 of each metadata file. JSON-shaped, so a cached copy compares equal."""
    files = [str(p) for p in data.builder.info.splits[data.split].filepaths]
    if any("://" in f for f in files) and len(files) > 1:
        with ThreadPoolExecutor(16) as pool:  # bucket stats are one round trip each
            stats = list(pool.map(_stat, files))
    else:
        stats = [_stat(f) for f in files]
    return {"split": data.split,
            "shards": [[Path(f).name, *st] for f, st in zip(files, stats)],
            "metadata": {m: _file_digest(f"{data.dir}/{m}") for m in METADATA_FILES}}


def stale_reason(cached: Any, key: dict[str, Any]) -> str | None:
    """Why a cache record does not describe the dataset now (None: it does)."""
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT or not isinstance(cached.get("scan"), dict):
        return "written in an older format (keyed by path and episode count only)"
    old = cached.get("key")
    if old == key:
        return None
    if not isinstance(old, dict):
        return "it has no content key"
    for m in METADATA_FILES:
        if (old.get("metadata") or {}).get(m) != key["metadata"][m]:
            return f"{m} changed"
    now = {s[0]: s[1:] for s in key["shards"]}
    then = {s[0]: s[1:] for s in old.get("shards") or [] if isinstance(s, list) and s}
    for name, st in now.items():
        if name not in then:
            return f"shard file {name!r} is new"
        if then[name] != st:
            size = (f"size {then[name][0]} -> {st[0]} bytes" if then[name][0] != st[0] else "same size")
            return f"shard file {name!r} changed ({size}, mtime_ns {then[name][1]} -> {st[1]})"
    return "the shard files changed"


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

    def copies(self, name: str) -> Iterator[tuple[Any, Path]]:
        """(record, its file) for every readable copy, dataset directory first."""
        for d in self.dirs():
            f = d / name
            if f.is_file():
                try:
                    yield json.loads(f.read_text()), f
                except (OSError, ValueError):
                    continue  # a damaged cache is recomputed

    def write(self, name: str, data: dict) -> None:
        for d in self.dirs():
            try:
                d.mkdir(parents=True, exist_ok=True)
                write_text_atomic(d / name, json.dumps(data))
                return
            except OSError:
                continue


def dataset_scan(data: Any) -> tuple[dict[str, Any], str]:
    """(the scan of `data`, where it came from: a cache file, or computed now). A cache whose content key
    no longer matches the files is rebuilt, never trusted."""
    cache = ScanCache(data.dir)
    name = f"scan-{data.split}-{scan_digest(data)}.json"
    key = content_key(data)
    source = "scan computed now"
    for record, file in cache.copies(name):
        reason = stale_reason(record, key)
        if reason is None:
            return record["scan"], f"scan cache {str(file)!r}"
        source = f"scan computed now (the scan cache {str(file)!r} was stale: {reason})"
    try:
        scan = compute_scan(data.episode_tensors(decode_images=False).as_numpy_iterator(), data.action_names,
                            f"dataset {data.dir!r}: split {data.split!r}")
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
        raise data.read_error(exc, "scanning the episodes") from None
    cache.write(name, {"format": CACHE_FORMAT, "key": key, "scan": scan})
    return scan, source
