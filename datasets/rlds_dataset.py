"""Stage 2 of the data path: an opened, validated RLDS dataset, as a stream of episodes.

`RLDSDataset(path)` opens the files (datasets/source.py), picks the dataset's standardisation entry
(datasets/standardize.py: camera, instruction, embedding, proprio, and how the action becomes a vector),
validates it against features.json, and reads one episode so that a broken dataset fails at open time.
`episode_tensors()` streams episodes with their fields stacked over time (images left encoded until after
the DDP shard and shuffle), `scan()` the cached metadata pass (datasets/statistics.py).

Steps flagged `is_last` carry no valid action and are dropped; datasets that never set `is_last`
(the Bridge sample) keep every step. Nothing here depends on `is_last` being set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.source import MAX_OPEN_SHARDS, DatasetError, DatasetSource, all_keys, get_feature, open_source, read_error
from datasets.standardize import Standardization, select
from datasets.statistics import dataset_scan, scan_digest
from datasets.tf_setup import tf, tfds


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
    action statistics, episode lengths).

    `path`: a dataset directory or bucket path, or a DatasetSource already opened (datasets/source.py).
    `standardization`: "auto", an entry name, a YAML file of entries, or a Standardization (for example
    one built from explicit keys with datasets.standardize.from_keys). `camera`: one of the entry's cameras
    (full key or last part) or another step key.
    """

    def __init__(self, path: str | Path | DatasetSource, *, split: str | None = None,
                 standardization: str | Standardization = "auto", camera: str | None = None,
                 use_proprio: bool = True, verify_shards: bool = True):
        if isinstance(path, DatasetSource):
            if split is not None and split != path.split:
                raise ValueError(f"split: expected the opened source's split {path.split!r}, got {split!r}")
            src = path
        else:
            src = open_source(path, split or "train", verify_shards)
        self.source = src
        self.dir = src.dir
        self.builder = src.builder
        self.name = src.name
        self.split = src.split
        self.num_episodes = src.num_episodes
        self.sidecar = src.sidecar
        self._steps = src.steps
        self.entry: Standardization = select(standardization, self.name, self.sidecar, src.step_keys,
                                             f"dataset {self.dir!r}")
        self.use_proprio = bool(use_proprio and self.entry.proprio)
        self._validate(camera)
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
            raise self.read_error(exc, "first episode unreadable") from None
        if ep is not None and int(ep["action"].shape[-1]) != self.action_dim:
            raise self._field_error(self.entry.action, f"{self.action_dim} action values", int(ep["action"].shape[-1]))

    @property
    def shard_files(self) -> list[str]:
        """The split's shard files (as dataset_info.json lists them)."""
        return [str(p) for p in self.builder.info.splits[self.split].filepaths]

    def read_error(self, exc: tf.errors.OpError, what: str) -> DatasetError:
        """A tf.data failure reading this dataset as a named DatasetError (a corrupt shard: CorruptDatasetError
        naming the file), never a raw TensorFlow error."""
        return read_error(exc, f"dataset {self.dir!r}: split {self.split!r}: {what}", self.shard_files, self.dir)

    # -- validation of the entry against the dataset's features ------------------------------------
    def _field_error(self, key: str, expected: str, got: Any) -> DatasetError:
        return DatasetError(f"dataset {self.dir!r}: file 'features.json', field 'steps/{key}' "
                            f"(standardization {self.entry.name!r}): expected {expected}, got {got}")

    def _need(self, key: str, what: str) -> Any:
        feat = get_feature(self._steps, key)
        if feat is None:
            raise DatasetError(f"dataset {self.dir!r}: file 'features.json': {what} field 'steps/{key}' "
                               f"(standardization {self.entry.name!r}) is not in the dataset; step keys: "
                               f"{all_keys(self._steps)}")
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
        if e.instruction_embedding and get_feature(self._steps, e.instruction_embedding) is not None:
            emb = get_feature(self._steps, e.instruction_embedding)
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

    # -- episode stream -----------------------------------------------------------------------------
    def episodes(self, decode_images: bool = True, shuffle_files: bool = False, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
        """Raw RLDS episodes. Images stay encoded unless decode_images (decoding after the DDP shard and
        shuffle is cheaper: see episode_tensors)."""
        decoders = None
        if not decode_images:  # every camera of the entry stays encoded (a nested dict of SkipDecoding)
            decoders = {}
            for cam in self.entry.cameras:
                if get_feature(self._steps, cam) is None:
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

    # -- one pass over the metadata: instructions and action statistics, cached (datasets/statistics.py)
    def scan(self) -> dict[str, Any]:
        if self._scan is None:
            self._scan, self.scan_source = dataset_scan(self)
        return self._scan

    @property
    def instructions(self) -> list[str]:
        return list(self.scan()["instructions"])

    @property
    def action_stats(self) -> dict[str, list[float]]:
        return dict(self.scan()["action_stats"])

    def summary(self) -> DatasetSummary:
        return DatasetSummary(self.dir, self.num_episodes, self.image_shape, self.proprio_dim,
                              self.action_dim, self.instructions, self.action_stats)

    def _cache_digest(self) -> str:
        """The digest in the scan cache file's name (scan-SPLIT-DIGEST.json)."""
        return scan_digest(self)
