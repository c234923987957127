"""Any RLDS dataset on disk or in a bucket -> torch batches for behaviour cloning.

One path for every dataset: `tfds.builder_from_directory` -> episodes (images left encoded) -> the
dataset's standardisation (datasets/standardize.py) picks camera, instruction, embedding, proprio and
flattens the action -> DDP shard and seeded shuffle of episodes -> image decode + resize in parallel
maps -> sequences (whole-episode unrolls or sliding windows) -> RT-1's pad-and-random-crop -> torch.

Steps flagged `is_last` carry no valid action and are dropped; datasets that never set `is_last`
(the Bridge sample) keep every step. Nothing here depends on `is_last` being set.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from datasets.standardize import Standardization, StandardizationError, from_keys, select
from datasets.tf_setup import tf, tfds

MAX_OPEN_SHARDS = 32  # shards read at once when streaming episodes (episodes())

SIDECAR = "policy_stack.json"
CACHE_ENV = "TTM_POLICY_CACHE"  # overrides ~/.cache/ttm-policy


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the dataset, the file and the field."""


def user_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttm-policy"


def resolve_dataset_dir(path: str | Path) -> str:
    """Return the TFDS dataset directory (the one holding dataset_info.json) at or under `path`."""
    p = str(path)
    if "://" in p:
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


def check_tfrecord_shard(path: Path, expected_records: int | None, dataset: str) -> None:
    """Walk a TFRecord file's record headers (no payload reads): a missing or truncated shard, or one with
    fewer records than dataset_info.json lists, is named here rather than failing mid-training."""
    if not path.is_file():
        raise DatasetError(f"dataset {dataset!r}: shard file {path.name!r} is missing (listed in dataset_info.json)")
    size = path.stat().st_size
    pos, n = 0, 0
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            pos += 12 + length + 4
            if pos > size:
                break
            f.seek(pos)
            n += 1
    if pos != size:
        raise DatasetError(f"dataset {dataset!r}: shard file {path.name!r} is truncated: record {n + 1} ends at "
                           f"byte {pos}, the file has {size} bytes (re-copy or re-collect it)")
    if expected_records is not None and n != expected_records:
        raise DatasetError(f"dataset {dataset!r}: shard file {path.name!r}: expected {expected_records} episodes "
                           f"(dataset_info.json), found {n}")


def _all_keys(tree: Any, prefix: str = "") -> list[str]:
    out = []
    for k in tree.keys():
        v = tree[k]
        if isinstance(v, tfds.features.FeaturesDict):
            out.append(f"{prefix}{k}")
            out += _all_keys(v, f"{prefix}{k}/")
        else:
            out.append(f"{prefix}{k}")
    return out


def _get(tree: Any, key: str) -> Any:
    node = tree
    for part in key.split("/"):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class DataKeys:
    """Explicit step keys (older call sites); prefer a standardisation entry."""
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
    """An opened, validated RLDS dataset: its standardisation entry, shapes, cached scan (instructions,
    action statistics, episode lengths)."""

    def __init__(self, path: str | Path, keys: DataKeys | None = None, split: str = "train", *,
                 standardization: str | Standardization = "auto", camera: str | None = None,
                 use_proprio: bool = True, verify_shards: bool = True):
        self.dir = resolve_dataset_dir(path)
        info_file = f"{self.dir}/dataset_info.json"
        try:
            self.builder = tfds.builder_from_directory(self.dir)
        except Exception as exc:  # noqa: BLE001  (tfds raises many types for a broken directory)
            raise DatasetError(f"dataset {self.dir!r}: {info_file!r} could not be opened as a TFDS dataset: {exc}") from None
        self.name = self.builder.info.name
        self.split = split
        features = self.builder.info.features
        if "steps" not in features:
            raise DatasetError(f"dataset {self.dir!r}: file 'features.json', field 'steps': not an RLDS dataset, "
                               f"episodes have no 'steps' (found {list(features.keys())})")
        if split not in self.builder.info.splits:
            raise DatasetError(f"dataset {self.dir!r}: split {split!r} not in dataset_info.json; "
                               f"available: {list(self.builder.info.splits.keys())}")
        self.num_episodes = int(self.builder.info.splits[split].num_examples)
        if self.num_episodes == 0:
            raise DatasetError(f"dataset {self.dir!r}: split {split!r} holds no episodes")
        if verify_shards and "://" not in self.dir:
            si = self.builder.info.splits[split]
            lengths = list(si.shard_lengths) or [None] * len(si.filepaths)
            for fp, n in zip(si.filepaths, lengths):
                check_tfrecord_shard(Path(str(fp)), n, self.dir)
        self.sidecar = self._read_sidecar()
        self._steps = features["steps"].feature
        self._episode = features
        step_keys = _all_keys(self._steps)
        try:
            entry = select(standardization, self.name, self.sidecar, step_keys, f"dataset {self.dir!r}")
        except StandardizationError:
            if keys is None:
                raise
            entry = None
        if keys is not None:  # explicit keys win over the entry's; names/bounds kept where the action matches
            entry = from_keys(keys.camera, keys.instruction, keys.proprio, keys.action, entry)
        self.entry: Standardization = entry
        self.use_proprio = bool(use_proprio and entry.proprio)
        self._validate(camera)
        self.keys = DataKeys(self.camera, entry.proprio if self.use_proprio else None, entry.instruction, entry.action)
        self._scan: dict[str, Any] | None = None
        self.scan_source = "not scanned yet"  # where scan() came from: a cache file, or computed now
        if verify_shards:
            self._check_first_episode()

    def _check_first_episode(self) -> None:
        """Read one episode now so that frames of another size than declared, or a missing field, fail at
        open time naming the dataset and field, not minutes into training."""
        try:
            ep = next(iter(self.episode_tensors(decode_images=True, parallel_calls=1).take(1)), None)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
            raise dataset_error_from_tf(exc, f"dataset {self.dir!r}: split {self.split!r}: first episode unreadable") from None
        if ep is not None and int(ep["action"].shape[-1]) != self.action_dim:
            raise self._field_error(self.entry.action, f"{self.action_dim} action values", int(ep["action"].shape[-1]))

    # -- validation of the entry against the dataset's features ------------------------------------
    def _field_error(self, key: str, expected: str, got: Any) -> DatasetError:
        return DatasetError(f"dataset {self.dir!r}: file 'features.json', field 'steps/{key}' "
                            f"(standardization {self.entry.name!r}): expected {expected}, got {got}")

    def _need(self, key: str, what: str) -> Any:
        feat = _get(self._steps, key)
        if feat is None:
            raise DatasetError(f"dataset {self.dir!r}: file 'features.json': {what} field 'steps/{key}' "
                               f"(standardization {self.entry.name!r}) is not in the dataset; step keys: "
                               f"{_all_keys(self._steps)}")
        return feat

    def _validate(self, camera: str | None) -> None:
        e = self.entry
        if camera is None:
            cam_key = e.cameras[0]
        else:
            matches = [c for c in e.cameras if c == camera or c.split("/")[-1] == camera]
            cam_key = matches[0] if matches else camera
        self.camera = cam_key
        cam = self._need(cam_key, "camera")
        if not isinstance(cam, tfds.features.Image):
            raise self._field_error(cam_key, "an image feature", type(cam).__name__)
        shape = tuple(cam.shape)
        if len(shape) != 3 or shape[-1] != 3 or any(d is None for d in shape):
            raise self._field_error(cam_key, "RGB frames of a fixed size (H, W, 3)", shape)
        self.image_shape = tuple(int(d) for d in shape)
        self.image_encoding = cam.encoding_format or "png"
        self.proprio_dim = 0
        if self.use_proprio:
            p = self._need(e.proprio, "proprio")
            if len(p.shape) > 1 or any(d is None for d in p.shape):
                raise self._field_error(e.proprio, "a fixed-size vector", tuple(p.shape))
            self.proprio_dim = int(np.prod(p.shape))
        instr = self._need(e.instruction, "instruction")
        if e.instruction_encoding == "text" and not isinstance(instr, tfds.features.Text):
            raise self._field_error(e.instruction, "a text feature (or instruction_encoding: codepoints)",
                                    type(instr).__name__)
        self.embedding_dim = 0
        if e.instruction_embedding and _get(self._steps, e.instruction_embedding) is not None:
            emb = _get(self._steps, e.instruction_embedding)
            if len(emb.shape) != 1 or emb.shape[0] is None:
                raise self._field_error(e.instruction_embedding, "a fixed-size float vector", tuple(emb.shape))
            self.embedding_dim = int(emb.shape[0])
        act = self._need(e.action, "action")
        if e.action_fields:
            dim = 0
            for f in e.action_fields:
                sub = self._need(f"{e.action}/{f.key}", "action")
                shape = tuple(sub.shape)
                if shape != (f.size,) and not (f.size == 1 and shape == ()):
                    raise self._field_error(f"{e.action}/{f.key}", f"shape ({f.size},)", shape)
                dim += f.dim
            self.action_dim = dim
        else:
            if not isinstance(act, tfds.features.Tensor) or len(act.shape) != 1 or act.shape[0] is None:
                raise self._field_error(e.action, "a 1-d float vector (or action_fields for a dict action)", act)
            self.action_dim = int(act.shape[0])
        names = e.flat_action_names()
        own = list(self.sidecar.get("action_names") or [])  # written by `collect`: the env's own names win
        if len(own) == self.action_dim:
            names = own
        elif names is not None and len(names) != self.action_dim:
            raise self._field_error(e.action, f"{len(names)} dimensions (action_names of the entry)", self.action_dim)
        self.action_names = names or [f"a{i}" for i in range(self.action_dim)]
        self.action_bounds = e.flat_action_bounds()
        lo, hi = self.sidecar.get("action_low"), self.sidecar.get("action_high")
        if lo and hi and len(lo) == len(hi) == self.action_dim:
            self.action_bounds = (list(lo), list(hi))

    def _read_sidecar(self) -> dict:
        try:
            return json.loads(tf.io.gfile.GFile(f"{self.dir}/{SIDECAR}").read())
        except (tf.errors.NotFoundError, ValueError):
            return {}

    # -- episode stream -----------------------------------------------------------------------------
    def episodes(self, decode_images: bool = True, shuffle_files: bool = False, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
        """Raw RLDS episodes. Images stay encoded unless decode_images (decoding after the DDP shard and
        shuffle is cheaper: see episode_tensors)."""
        decoders = None
        if not decode_images:  # every camera of the entry stays encoded (a nested dict of SkipDecoding)
            decoders = {}
            for cam in self.entry.cameras:
                if _get(self._steps, cam) is None:
                    continue
                node = decoders
                *parents, leaf = cam.split("/")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = tfds.decode.SkipDecoding()
            decoders = {"steps": decoders}
        index, count = shard
        # Shuffled (training) reads take every shard round-robin, one episode at a time (up to
        # MAX_OPEN_SHARDS files open). Datasets are often written one task per shard; reading 4 shards in
        # blocks of 16 episodes (tfds' block) fed training one group of tasks after another, in the same
        # order each epoch (the cache keeps the first epoch's order), and MT10's loss rose at every epoch
        # boundary (docs/RESULTS.md 3c). Unshuffled reads keep the dataset's own order.
        si = self.builder.info.splits[self.split]
        n_shards = max(1, len(si.shard_lengths) or len(si.filepaths))
        cycle = min(n_shards, MAX_OPEN_SHARDS) if shuffle_files else 1
        read = tfds.ReadConfig(shuffle_seed=seed if shuffle_files else None,
                               interleave_cycle_length=cycle, interleave_block_length=1)
        ds = self.builder.as_dataset(split=self.split, decoders=decoders, shuffle_files=shuffle_files,
                                     read_config=read)
        if count > 1:
            ds = ds.shard(count, index)  # by episode: ranks see disjoint episodes even with one file
        return ds

    def _step_fields(self, steps: dict) -> dict:
        e = self.entry

        def get(key):
            node = steps
            for part in key.split("/"):
                node = node[part]
            return node

        out = {"image": get(self.camera), "action": self._flat_action(get(e.action))}
        out["instruction"] = self._instruction_text(get(e.instruction))
        if self.use_proprio:
            out["proprio"] = tf.reshape(tf.cast(get(e.proprio), tf.float32), [-1, self.proprio_dim])
        if self.embedding_dim:
            out["instruction_embedding"] = tf.cast(get(e.instruction_embedding), tf.float32)
        # Steps marked is_last carry an invalid action; datasets that never mark it keep all steps.
        keep = tf.logical_not(steps["is_last"]) if "is_last" in steps else tf.ones_like(out["action"][:, 0], tf.bool)
        return {k: tf.boolean_mask(v, keep) for k, v in out.items()}

    def _flat_action(self, a: Any) -> tf.Tensor:
        e = self.entry
        if not e.action_fields:
            return tf.cast(a, tf.float32)
        cols = []
        for f in e.action_fields:
            v = tf.reshape(tf.cast(a[f.key], tf.float32), [-1, f.size])
            cols.append(tf.cast(tf.argmax(v, axis=-1), tf.float32)[:, None] if f.discrete else v)
        return tf.concat(cols, axis=-1)

    def _instruction_text(self, x: tf.Tensor) -> tf.Tensor:
        if self.entry.instruction_encoding == "codepoints":
            codes = tf.RaggedTensor.from_tensor(tf.cast(x, tf.int32), padding=0)
            return tf.strings.unicode_encode(codes, "UTF-8")
        return x

    def episode_tensors(self, decode_images: bool = True, shuffle_files: bool = False, seed: int = 0,
                        shard: tuple[int, int] = (0, 1), parallel_calls: int = -1) -> tf.data.Dataset:
        """Each element: one episode's fields stacked over time (image [L,H,W,3] or encoded [L], action [L,A]...)."""
        calls = tf.data.AUTOTUNE if parallel_calls in (-1, 0) else parallel_calls
        ds = self.episodes(decode_images=False, shuffle_files=shuffle_files, seed=seed, shard=shard)
        ds = ds.map(lambda ep: self._step_fields(ep["steps"].batch(1_000_000).get_single_element()),
                    num_parallel_calls=calls, deterministic=True)
        ds = ds.filter(lambda e: tf.shape(e["action"])[0] > 0)
        if decode_images:
            ds = ds.map(lambda e: {**e, "image": self.decode_frames(e["image"])}, num_parallel_calls=calls,
                        deterministic=True)
        return ds

    def decode_frames(self, encoded: tf.Tensor) -> tf.Tensor:
        """[L] encoded frames -> [L,H,W,3] uint8, checked against the declared shape (a frame of another size
        fails here, naming the dataset and field, not later inside the model)."""
        h, w, _ = self.image_shape
        frames = tf.map_fn(lambda b: tf.io.decode_image(b, channels=3, expand_animations=False), encoded,
                           fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
        check = tf.debugging.assert_equal(
            tf.shape(frames)[1:3], tf.constant([h, w]),
            message=f"dataset {self.dir!r}: field 'steps/{self.camera}': a frame does not have the declared "
                    f"shape {self.image_shape} (features.json)")
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(frames), [None, h, w, 3])

    # -- one pass over the metadata: instructions and action statistics, cached -------------------
    def scan(self) -> dict[str, Any]:
        if self._scan is not None:
            return self._scan
        cache_name = f"scan-{self.split}-{self._cache_digest()}.json"
        cached = self._read_json(cache_name)
        if cached is not None:
            self.scan_source = f"scan cache {str(self._cache_file(cache_name))!r}"
        else:
            self.scan_source = "scan computed now"
            actions, instructions, lengths = [], set(), []
            for ep in self.episode_tensors(decode_images=False).as_numpy_iterator():
                actions.append(ep["action"])
                lengths.append(len(ep["action"]))
                instructions.update(s.decode("utf-8") for s in np.unique(ep["instruction"]))
            if not actions:
                raise DatasetError(f"dataset {self.dir!r}: split {self.split!r}: no episode has a valid step")
            a = np.concatenate(actions, 0)
            cached = {
                "instructions": sorted(instructions),
                "action_stats": action_statistics(a),
                "action_names": self.action_names,
                "num_transitions": int(a.shape[0]),
                "num_episodes": len(lengths),
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

    # -- cache files next to the dataset when it is writable, else in the user cache ----------------
    def _cache_digest(self) -> str:
        e = self.entry
        ident = repr((e.instruction, e.instruction_encoding, e.action, e.action_fields, self.split,
                      self.builder.info.splits[self.split].num_examples,
                      [str(p) for p in self.builder.info.splits[self.split].filepaths]))
        return hashlib.sha1(ident.encode()).hexdigest()[:12]

    def cache_dirs(self) -> list[Path]:
        user = user_cache_root() / hashlib.sha1(self.dir.encode()).hexdigest()[:16]
        if "://" in self.dir:
            return [user]
        d = Path(self.dir)
        # Owner write bit, not os.access: root may write anywhere, but a read-only dataset stays untouched.
        writable = bool(d.stat().st_mode & stat.S_IWUSR) and os.access(d, os.W_OK)
        return [d, user] if writable else [user]

    def _cache_file(self, name: str) -> Path | None:
        return next((d / name for d in self.cache_dirs() if (d / name).is_file()), None)

    def _read_json(self, name: str) -> dict | None:
        for d in self.cache_dirs():
            f = d / name
            if f.is_file():
                try:
                    return json.loads(f.read_text())
                except ValueError:
                    continue  # a damaged cache is recomputed
        return None

    def _write_json(self, name: str, data: dict) -> None:
        for d in self.cache_dirs():
            try:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, d / name)
                return
            except OSError:
                continue


def dataset_error_from_tf(exc: tf.errors.OpError, context: str) -> DatasetError:
    """Our own assertion messages (dataset, field, declared shape) out of a tf.data error."""
    text = exc.message.replace("\\'", "'")
    unknown = re.search(r"\[(dataset '.*?': instruction)\] \[(.*?)\] \[(is not in the instruction list .*?)\]",
                        text, re.S)
    if unknown:  # make_sequences' lookup check
        return DatasetError(f"{unknown.group(1)} {unknown.group(2)!r} {unknown.group(3)}")
    ours = re.search(r"(dataset '.*?\(features\.json\))", text)
    got = re.search(r"\[x \(.*?\) = \] \[(\d+) (\d+)\]", text)
    if ours and got:
        return DatasetError(f"{ours.group(1)}, got {got.group(1)}x{got.group(2)} frames in the shards")
    if ours:
        return DatasetError(ours.group(1))
    return DatasetError(f"{context}: {text.splitlines()[0] if text else type(exc).__name__}")


def action_statistics(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
            "max": a.max(0).tolist(), "p01": np.percentile(a, 1, axis=0).tolist(),
            "p99": np.percentile(a, 99, axis=0).tolist(), "count": int(a.shape[0])}


@dataclass
class SequenceSpec:
    """How episodes become training sequences."""
    mode: str  # "episode" | "window"
    length: int  # T
    image_size: int  # frames resized to image_size x image_size (0 = keep)
    crop_pad: int = 0  # RT-1 augmentation: pad by this many pixels, random-crop back (0 = off)
    parallel_calls: int = -1  # tf.data map parallelism (-1 = AUTOTUNE)

    def __post_init__(self):
        if self.mode not in ("episode", "window"):
            raise ValueError(f"data.sequence: expected 'episode' or 'window', got {self.mode!r}")
        if self.length < 1:
            raise ValueError(f"data.sequence_length: expected >= 1, got {self.length}")
        if self.crop_pad < 0:
            raise ValueError(f"data.crop_pad: expected >= 0 pixels, got {self.crop_pad}")


def make_sequences(data: RLDSDataset, spec: SequenceSpec, instruction_ids: dict[str, int],
                   shuffle: bool, seed: int, cache: bool, shuffle_buffer: int = 256,
                   shard: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """Episodes -> fixed-length sequences with a validity mask.

    "episode": the first T steps of each episode (the memory starts at the episode's first step, as at
    inference); batches are padded at the end to their longest episode, with mask False there.
    "window": for every step t, the T steps ending at t, padded at the episode start (RT-1's history
    window); a window never crosses into another episode. Deterministic for a given seed.
    """
    keys = tf.constant(list(instruction_ids.keys()))
    vals = tf.constant(list(instruction_ids.values()), dtype=tf.int64)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, vals), default_value=-1)
    # -1 would index the last instruction: an instruction missing from the list (a stale scan cache) fails
    missing = [f"dataset {data.dir!r}: instruction",
               f"is not in the instruction list of the {data.scan_source} (stale: delete that file to rescan "
               "the dataset)" if data.scan_source.startswith("scan cache") else
               f"is not in the instruction list the sequences were built with ({data.scan_source})"]
    size = spec.image_size
    T = spec.length
    calls = tf.data.AUTOTUNE if spec.parallel_calls in (-1, 0) else spec.parallel_calls

    def prepare(ep):
        img = data.decode_frames(ep["image"])
        if size and (data.image_shape[0] != size or data.image_shape[1] != size):
            img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, [size, size], antialias=True)), 0, 255), tf.uint8)
        text = ep["instruction"][0]
        idx = table.lookup(text)
        with tf.control_dependencies([tf.debugging.Assert(idx >= 0, [missing[0], text, missing[1]])]):
            idx = tf.identity(idx)
        out = {"image": img, "action": ep["action"], "instruction": idx}
        if "proprio" in ep:
            out["proprio"] = ep["proprio"]
        if "instruction_embedding" in ep:
            out["instruction_embedding"] = ep["instruction_embedding"][0]
        return out

    ds = data.episode_tensors(decode_images=False, shuffle_files=shuffle, seed=seed, shard=shard,
                              parallel_calls=spec.parallel_calls)
    ds = ds.map(prepare, num_parallel_calls=calls, deterministic=True)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    per_episode = ("instruction", "instruction_embedding")

    def pad_front(x):
        pad = tf.maximum(T - tf.shape(x)[0], 0)
        return tf.pad(x[-T:], [[pad, 0]] + [[0, 0]] * (len(x.shape) - 1))

    def episode_mode(ep):
        # Variable length (at most T); padded_batch pads each batch only to its longest episode.
        out = {k: v[:T] for k, v in ep.items() if k not in per_episode}
        out["mask"] = tf.ones_like(out["action"][:, 0], dtype=tf.bool)
        out.update({k: ep[k] for k in per_episode if k in ep})
        return out

    def window_mode(ep):
        n = tf.shape(ep["action"])[0]
        seq = {k: v for k, v in ep.items() if k not in per_episode}

        def window(t):
            start = tf.maximum(t - T + 1, 0)
            w = {k: pad_front(v[start: t + 1]) for k, v in seq.items()}
            w["mask"] = tf.range(T) >= T - (t + 1 - start)
            w.update({k: ep[k] for k in per_episode if k in ep})
            return w

        return tf.data.Dataset.range(tf.cast(n, tf.int64)).map(lambda t: window(tf.cast(t, tf.int32)))

    if spec.mode == "episode":
        ds = ds.map(episode_mode, num_parallel_calls=calls, deterministic=True)
    else:
        ds = ds.flat_map(window_mode)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer * 8, seed=seed + 1)
    if spec.crop_pad and shuffle:
        ds = random_crop(ds, spec.crop_pad, seed + 2, calls)
    return ds


def random_crop(ds: tf.data.Dataset, pad: int, seed: int, calls: int) -> tf.data.Dataset:
    """RT-1's augmentation: pad each sequence's frames by `pad` pixels (edge-reflected), then crop back to
    the original size at one random offset per sequence (a steady camera moves as a whole). Stateless
    seeds make it reproducible; the seed stream is drawn afresh each epoch of a repeated dataset (a replayed
    one would crop the n-th sequence of every epoch at the same offset)."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def crop(el, s):
        img = el["image"]
        h, w = tf.shape(img)[1], tf.shape(img)[2]
        padded = tf.pad(img, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
        off = tf.random.stateless_uniform([2], seed=s, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        out = dict(el)
        out["image"] = tf.ensure_shape(padded[:, off[0]: off[0] + h, off[1]: off[1] + w, :], img.shape)
        return out

    return tf.data.Dataset.zip((ds, seeds)).map(crop, num_parallel_calls=calls, deterministic=True)


class TorchBatches(torch.utils.data.IterableDataset):
    """Endless (or one-pass) stream of torch batches from a tf.data pipeline."""

    def __init__(self, ds: tf.data.Dataset, batch_size: int, repeat: bool = True, prefetch: int = 2):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"train.batch_size: expected >= 1, got {batch_size}")
        ds = ds.repeat() if repeat else ds
        self.ds = ds.padded_batch(batch_size, drop_remainder=repeat).prefetch(prefetch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = self.ds.as_numpy_iterator()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
                raise dataset_error_from_tf(exc, "reading training batches") from None
            yield {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}  # tf hands out read-only arrays
