"""Any RLDS dataset on disk or in a bucket -> torch batches for behaviour cloning.

One path for every dataset: `tfds.builder_from_directory` -> episodes -> (standardise keys) ->
per-episode tensors -> sequences (whole-episode unrolls or sliding windows) -> torch tensors.

Steps flagged `is_last` carry no valid action and are dropped; datasets that never set `is_last`
(the Bridge sample) keep every step. Nothing here depends on `is_last` being set.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from datasets.tf_setup import tf, tfds

STATS_FILE = "action_stats.json"
INSTRUCTIONS_FILE = "instructions.json"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path or key, what was expected, what came."""


def resolve_dataset_dir(path: str | Path) -> str:
    """Return the TFDS dataset directory (the one holding dataset_info.json) at or under `path`."""
    p = str(path)
    if p.startswith("gs://"):
        return p
    root = Path(p)
    if not root.exists():
        raise DatasetError(f"--data {p!r}: expected an RLDS dataset directory, the path does not exist")
    if (root / "dataset_info.json").is_file():
        return str(root)
    found = sorted(d.parent for d in root.glob("*/*/dataset_info.json")) + sorted(d.parent for d in root.glob("*/dataset_info.json"))
    if len(found) == 1:
        return str(found[0])
    if len(found) > 1:
        raise DatasetError(f"--data {p!r}: expected one RLDS dataset, found {len(found)}: "
                           + ", ".join(str(f) for f in found) + " (pass one of them)")
    missing = [f for f in ("dataset_info.json", "features.json") if not (root / f).is_file()]
    raise DatasetError(f"--data {p!r}: not an RLDS/TFDS dataset directory: missing {', '.join(missing)} "
                       "(expected the folder written by `collect`, or an RLDS dataset's version folder)")


def _lookup(tree: Any, key: str, what: str, available: Any) -> Any:
    node = tree
    for part in key.split("/"):
        if not hasattr(node, "keys") or part not in node.keys():
            raise DatasetError(f"{what} {key!r}: not in the dataset's steps; available keys: {_keys(available)}")
        node = node[part]
    return node


def _keys(tree: Any, prefix: str = "") -> list[str]:
    out = []
    for k in tree.keys():
        v = tree[k]
        if hasattr(v, "keys") and not isinstance(v, (tfds.features.Tensor,)):
            out += _keys(v, f"{prefix}{k}/")
        else:
            out.append(f"{prefix}{k}")
    return out


@dataclass(frozen=True)
class DataKeys:
    """Where the policy's inputs live inside a dataset's steps (paths like 'observation/image')."""
    camera: str = "observation/image"
    proprio: str | None = "observation/state"
    instruction: str = "observation/instruction"
    action: str = "action"


@dataclass
class DatasetSummary:
    path: str
    num_episodes: int
    image_shape: tuple[int, int, int]
    proprio_dim: int
    action_dim: int
    instructions: list[str]
    action_stats: dict[str, list[float]]


class RLDSDataset:
    """An opened RLDS dataset with validated keys, cached action statistics and instruction list."""

    def __init__(self, path: str | Path, keys: DataKeys, split: str = "train"):
        self.dir = resolve_dataset_dir(path)
        try:
            self.builder = tfds.builder_from_directory(self.dir)
        except Exception as exc:  # noqa: BLE001  (tfds raises many types for a broken directory)
            raise DatasetError(f"--data {self.dir!r}: could not be opened as a TFDS dataset: {exc}") from None
        self.keys = keys
        self.split = split
        features = self.builder.info.features
        if "steps" not in features:
            raise DatasetError(f"--data {self.dir!r}: not an RLDS dataset: episodes have no 'steps' feature "
                               f"(found {list(features.keys())})")
        if split not in self.builder.info.splits:
            raise DatasetError(f"split {split!r}: not in {self.dir!r}; available: {list(self.builder.info.splits.keys())}")
        steps = features["steps"].feature
        cam = _lookup(steps, keys.camera, "camera key", steps)
        if not isinstance(cam, tfds.features.Image):
            raise DatasetError(f"camera key {keys.camera!r}: expected an image feature, got {type(cam).__name__}")
        self.image_shape = tuple(cam.shape)
        self.proprio_dim = 0
        if keys.proprio:
            self.proprio_dim = int(np.prod(_lookup(steps, keys.proprio, "proprio key", steps).shape))
        _lookup(steps, keys.instruction, "instruction key", steps)
        act = _lookup(steps, keys.action, "action key", steps)
        if not isinstance(act, tfds.features.Tensor) or len(act.shape) != 1:
            raise DatasetError(f"action key {keys.action!r}: expected a 1-d float vector, got {act!r}")
        self.action_dim = int(act.shape[0])
        self.num_episodes = int(self.builder.info.splits[split].num_examples)
        if self.num_episodes == 0:
            raise DatasetError(f"--data {self.dir!r}: split {split!r} holds no episodes")
        self.sidecar = self._read_json("policy_stack.json") or {}
        self._scan: dict[str, Any] | None = None

    # -- episode stream -----------------------------------------------------------------------
    def episodes(self, decode_images: bool = True, shuffle_files: bool = False) -> tf.data.Dataset:
        decoders = None
        if not decode_images:
            decoders = {"steps": _nested_decoder(self.keys.camera, tfds.decode.SkipDecoding())}
        ds = self.builder.as_dataset(split=self.split, decoders=decoders, shuffle_files=shuffle_files)
        return ds

    def _step_fields(self, steps: dict) -> dict:
        def get(key):
            node = steps
            for part in key.split("/"):
                node = node[part]
            return node

        out = {"image": get(self.keys.camera), "instruction": get(self.keys.instruction),
               "action": tf.cast(get(self.keys.action), tf.float32)}
        if self.keys.proprio:
            p = tf.cast(get(self.keys.proprio), tf.float32)
            out["proprio"] = tf.reshape(p, [-1, self.proprio_dim])
        # Steps marked is_last carry an invalid action; datasets that never mark it keep all steps.
        keep = tf.logical_not(steps["is_last"])
        return {k: tf.boolean_mask(v, keep) for k, v in out.items()}

    def episode_tensors(self, decode_images: bool = True, shuffle_files: bool = False) -> tf.data.Dataset:
        """Each element: one episode's fields stacked over time (image [L,H,W,3], action [L,A], ...)."""
        ds = self.episodes(decode_images, shuffle_files)
        ds = ds.map(lambda ep: ep["steps"].batch(1_000_000).get_single_element(),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(self._step_fields, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.filter(lambda e: tf.shape(e["action"])[0] > 0)

    # -- one pass over the metadata: instructions and action statistics, cached -----------------
    def scan(self) -> dict[str, Any]:
        if self._scan is not None:
            return self._scan
        cache_name = f"scan-{self.split}-{_key_digest(self.keys)}.json"
        cached = self._read_json(cache_name)
        if cached is None:
            actions, instructions, lengths = [], set(), []
            for ep in self.episode_tensors(decode_images=False).as_numpy_iterator():
                actions.append(ep["action"])
                lengths.append(len(ep["action"]))
                instructions.update(s.decode("utf-8") for s in np.unique(ep["instruction"]))
            a = np.concatenate(actions, 0).astype(np.float64)
            cached = {
                "instructions": sorted(instructions),
                "action_stats": {
                    "mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
                    "min": a.min(0).tolist(), "max": a.max(0).tolist(),
                    "p01": np.percentile(a, 1, axis=0).tolist(), "p99": np.percentile(a, 99, axis=0).tolist(),
                    "count": int(a.shape[0]),
                },
                "num_transitions": int(a.shape[0]),
                "max_episode_length": int(max(lengths)),
                "mean_episode_length": float(np.mean(lengths)),
            }
            self._write_json(cache_name, cached)
        self._scan = cached
        return cached

    @property
    def instructions(self) -> list[str]:
        return list(self.scan()["instructions"])

    @property
    def action_stats(self) -> dict[str, list[float]]:
        return dict(self.scan()["action_stats"])

    def summary(self) -> DatasetSummary:
        return DatasetSummary(self.dir, self.num_episodes, self.image_shape, self.proprio_dim,
                              self.action_dim, self.instructions, self.action_stats)

    # -- cache files next to the dataset (or in the user cache when that is read-only) ----------
    def _cache_dirs(self) -> list[Path]:
        digest = hashlib.sha1(self.dir.encode()).hexdigest()[:16]
        user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "policy_stack" / digest
        return ([Path(self.dir)] if not self.dir.startswith("gs://") else []) + [user]

    def _read_json(self, name: str) -> dict | None:
        for d in self._cache_dirs():
            f = d / name
            if f.is_file():
                return json.loads(f.read_text())
        return None

    def _write_json(self, name: str, data: dict) -> None:
        for d in self._cache_dirs():
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, d / name)
                return
            except OSError:
                continue


def _key_digest(keys: DataKeys) -> str:
    return hashlib.sha1(repr(keys).encode()).hexdigest()[:8]


def _nested_decoder(key: str, decoder: Any) -> dict:
    out: Any = decoder
    for part in reversed(key.split("/")):
        out = {part: out}
    return out


@dataclass
class SequenceSpec:
    """How episodes become training sequences."""
    mode: str  # "episode" | "window"
    length: int  # T
    image_size: int  # frames resized to image_size x image_size (0 = keep)


def make_sequences(data: RLDSDataset, spec: SequenceSpec, instruction_ids: dict[str, int],
                   shuffle: bool, seed: int, cache: bool, shuffle_buffer: int = 256) -> tf.data.Dataset:
    """Episodes -> fixed-length sequences with a validity mask.

    "episode": the first T steps of each episode (the memory starts at the episode's first step, as
    at inference); batches are padded at the end to their longest episode, with mask False there. "window": for every step t, the T steps ending at t,
    padded at the episode start (RT-1's history window).
    """
    keys = tf.constant(list(instruction_ids.keys()))
    vals = tf.constant(list(instruction_ids.values()), dtype=tf.int64)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, vals), default_value=-1)
    size = spec.image_size
    T = spec.length

    def prepare(ep):
        img = ep["image"]
        if size and (img.shape[1] != size or img.shape[2] != size):
            img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, [size, size], antialias=True)), 0, 255), tf.uint8)
        out = {"image": img, "action": ep["action"], "instruction": table.lookup(ep["instruction"][0])}
        if "proprio" in ep:
            out["proprio"] = ep["proprio"]
        return out

    ds = data.episode_tensors(shuffle_files=shuffle).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def pad_front(x):
        pad = tf.maximum(T - tf.shape(x)[0], 0)
        return tf.pad(x[-T:], [[pad, 0]] + [[0, 0]] * (len(x.shape) - 1))

    def episode_mode(ep):
        # Variable length (at most T); padded_batch pads each batch only to its longest episode.
        out = {k: v[:T] for k, v in ep.items() if k != "instruction"}
        out["mask"] = tf.ones_like(out["action"][:, 0], dtype=tf.bool)
        out["instruction"] = ep["instruction"]
        return out

    def window_mode(ep):
        n = tf.shape(ep["action"])[0]
        seq = {k: v for k, v in ep.items() if k != "instruction"}

        def window(t):
            start = tf.maximum(t - T + 1, 0)
            w = {k: pad_front(v[start: t + 1]) for k, v in seq.items()}
            w["mask"] = tf.range(T) >= T - (t + 1 - start)
            w["instruction"] = ep["instruction"]
            return w

        return tf.data.Dataset.range(tf.cast(n, tf.int64)).map(lambda t: window(tf.cast(t, tf.int32)))

    if spec.mode == "episode":
        ds = ds.map(episode_mode, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.flat_map(window_mode)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer * 8, seed=seed + 1)
    return ds


class TorchBatches(torch.utils.data.IterableDataset):
    """Endless (or one-pass) stream of torch batches from a tf.data pipeline."""

    def __init__(self, ds: tf.data.Dataset, batch_size: int, repeat: bool = True):
        super().__init__()
        ds = ds.repeat() if repeat else ds
        self.ds = ds.padded_batch(batch_size, drop_remainder=repeat).prefetch(2)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.ds.as_numpy_iterator():
            yield {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}  # tf hands out read-only arrays
