"""dm_env episodes -> an RLDS dataset on disk, written with `rlds.tfds.EpisodeWriter`.

RLDS step convention (as envlogger writes it): step i holds the observation of timestep i, the
action taken from it, and the reward/discount that followed; the last step holds the final
observation with is_last=True and a zero (invalid) action.

Writes are atomic: episodes go to a hidden staging directory next to the destination, which is
fsynced and renamed into place (common.atomic.swap_in) only after the writer has closed and the dataset
reads back. A full disk ends the write with DiskFullError naming --out, and the staging directory removed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from dm_env import specs

from common.atomic import WriteError, aside_path, free_mib, fsync_tree, restore_set_aside, set_aside, swap_in
from datasets.source import SIDECAR
from datasets.tf_setup import tf, tfds  # noqa: F401  (hides GPUs from TensorFlow)

DATASET_NAME = "policy_stack_rlds"
DATASET_VERSION = "1.0.0"


def feature_from_spec(spec: specs.Array, image_encoding: str = "png") -> Any:
    """One dm_env spec -> the TFDS feature that stores it."""
    if isinstance(spec, specs.StringArray):
        if spec.shape != ():
            raise ValueError(f"spec {spec.name!r}: only scalar strings are supported, got shape {spec.shape}")
        return tfds.features.Text()
    if spec.dtype == np.uint8 and len(spec.shape) == 3 and spec.shape[-1] in (1, 3):
        return tfds.features.Image(shape=spec.shape, encoding_format=image_encoding)
    return tfds.features.Tensor(shape=spec.shape, dtype=np.dtype(spec.dtype))


def features_from_specs(tree: Any, image_encoding: str = "png") -> Any:
    if isinstance(tree, Mapping):
        return tfds.features.FeaturesDict({k: features_from_specs(v, image_encoding) for k, v in tree.items()})
    return feature_from_spec(tree, image_encoding)


@dataclass
class Episode:
    """A finished episode as plain numpy: observations has one entry per timestep (N+1), actions N."""
    observations: list[dict[str, np.ndarray]]
    actions: list[np.ndarray]
    rewards: list[float]
    discounts: list[float]
    terminal: bool  # the last timestep ended the task (discount 0), as opposed to a time limit
    metadata: dict[str, Any]

    def to_rlds(self, action_shape: tuple[int, ...], action_dtype: np.dtype) -> dict[str, Any]:
        n = len(self.actions)
        if len(self.observations) != n + 1:
            raise ValueError(f"episode: expected {n + 1} observations for {n} actions, got {len(self.observations)}")
        steps = []
        for i, obs in enumerate(self.observations):
            last = i == n
            steps.append({
                "observation": obs,
                "action": np.zeros(action_shape, action_dtype) if last else self.actions[i],
                "reward": np.float32(0.0 if last else self.rewards[i]),
                "discount": np.float32(1.0 if last else self.discounts[i]),
                "is_first": i == 0,
                "is_last": last,
                "is_terminal": last and self.terminal,
            })
        return {"steps": steps, **self.metadata}


EPISODE_METADATA = {
    "task": tfds.features.Text(),
    "instruction": tfds.features.Text(),
    "seed": tfds.features.Scalar(dtype=np.int64),
    "success": tfds.features.Scalar(dtype=np.bool_),
    "env": tfds.features.Text(),
    "env_version": tfds.features.Text(),
}


class DiskFullError(WriteError):
    """The disk filled up while a dataset was written; names --out. Nothing is left behind."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


def _disk_full(exc: BaseException) -> bool:
    # TensorFlow's file writers (TFRecordWriter, tf.io.gfile) report ENOSPC/EDQUOT as RESOURCE_EXHAUSTED.
    if isinstance(exc, tf.errors.ResourceExhaustedError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _free_space(path: Path) -> str:
    free = free_mib(path)
    return "free space unknown" if free is None else f"{free} MiB free there"


class AtomicRLDSWriter:
    """Writes episodes into a staging directory; `commit()` moves the finished dataset to `out_dir`.

    `out_dir` becomes a TFDS dataset directory (dataset_info.json, features.json, tfrecord shards)
    that `tfds.builder_from_directory(out_dir)` reads.
    """

    def __init__(self, out_dir: str | Path, observation_spec: Any, action_spec: specs.Array,
                 sidecar: dict[str, Any], image_encoding: str = "png", episodes_per_shard: int = 100,
                 overwrite: bool = False):
        from rlds.tfds import episode_writer  # imported here: `rlds` pulls in reverb, slow to import

        self.out_dir = Path(out_dir).resolve()
        self.overwrite = overwrite
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise FileExistsError(f"--out {str(self.out_dir)!r}: expected a directory path, it is a file")
        # An .old-* copy is a dataset being overwritten: put back if a kill between commit's two renames
        # left none at --out, else it is left over and removed.
        parent = self.out_dir.parent
        restore_set_aside(self.out_dir)
        for old in set_aside(self.out_dir):
            shutil.rmtree(old, ignore_errors=True)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            is_dataset = (self.out_dir / "dataset_info.json").is_file()
            if is_dataset and not overwrite:
                raise FileExistsError(f"--out {str(self.out_dir)!r}: already holds a complete dataset; pass "
                                      "--overwrite to replace it (it is swapped only once the new one is complete)")
            if not is_dataset:  # --overwrite replaces a dataset, never a directory of other files
                raise FileExistsError(f"--out {str(self.out_dir)!r}: expected a new or empty directory or an "
                                      "existing dataset, it holds other files (choose another path or delete it)")
        if image_encoding not in ("png", "jpeg"):
            raise ValueError(f"--image-encoding: expected 'png' or 'jpeg', got {image_encoding!r}")
        if isinstance(episodes_per_shard, bool) or not isinstance(episodes_per_shard, int) or episodes_per_shard < 1:
            raise ValueError(f"--episodes-per-shard: expected an integer >= 1, got {episodes_per_shard!r}")
        # Staging directories of interrupted runs never read as a dataset; clear them now.
        for stale in parent.glob(f".{self.out_dir.name}.partial-*") if parent.exists() else []:
            shutil.rmtree(stale, ignore_errors=True)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        self.action_shape = tuple(action_spec.shape)
        self.action_dtype = np.dtype(action_spec.dtype)
        self.sidecar = dict(sidecar)
        ds_config = episode_writer.DatasetConfig(
            name=DATASET_NAME,
            observation_info=features_from_specs(observation_spec, image_encoding),
            action_info=feature_from_spec(action_spec, image_encoding),
            reward_info=tfds.features.Scalar(dtype=np.float32),
            discount_info=tfds.features.Scalar(dtype=np.float32),
            step_metadata_info={},
            episode_metadata_info=EPISODE_METADATA,
        )
        self.num_episodes = 0
        self.num_steps = 0
        self._writer = None
        with self._disk_full_named():
            self.staging.mkdir()
            self._writer = episode_writer.EpisodeWriter(
                data_directory=str(self.staging), ds_config=ds_config,
                max_episodes_per_file=episodes_per_shard, version=DATASET_VERSION)

    @contextlib.contextmanager
    def _disk_full_named(self) -> Iterator[None]:
        """A full disk, wherever in the write it shows (a shard, dataset_info.json, the sidecar, fsync), ends
        as DiskFullError naming --out; the staging directory is removed first, so no half dataset is left
        and an existing dataset at --out (with --overwrite) is untouched."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (anything but a full disk is re-raised as it came)
            if not _disk_full(exc):
                raise
            detail = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
            self.abort()
            kept = ("; the dataset already at --out is untouched" if (self.out_dir / "dataset_info.json").is_file()
                    else "")
            raise DiskFullError(
                f"--out {str(self.out_dir)!r}: the disk is full: writing the dataset failed after "
                f"{self.num_episodes} episode(s) ({detail}; {_free_space(self.out_dir.parent)}); the partial dataset "
                f"was removed{kept}; free some space or choose another --out") from exc

    def add(self, episode: Episode) -> None:
        with self._disk_full_named():
            self._writer.add_episode(episode.to_rlds(self.action_shape, self.action_dtype))
        self.num_episodes += 1
        self.num_steps += len(episode.actions)

    def commit(self) -> Path:
        if self.num_episodes == 0:
            self.abort()
            raise ValueError("collect: no episode to write (every episode failed or none was requested)")
        built = self.staging  # the EpisodeWriter's data_directory is the TFDS dataset directory itself
        with self._disk_full_named():
            self._writer.close()
            info = {**self.sidecar, "num_episodes": self.num_episodes, "num_transitions": self.num_steps}
            (built / SIDECAR).write_text(json.dumps(info, indent=2, sort_keys=True))
            tfds.builder_from_directory(str(built))  # must read back before it is published
            # The staging tree is on disk before the rename publishes it (fsync can be where ENOSPC shows).
            fsync_tree(built)
        if self.out_dir.exists() and not self.overwrite:
            self.out_dir.rmdir()  # only an empty directory reaches here (checked in __init__)
        # With --overwrite the old dataset stays in place until the new one is complete (a crash leaves the
        # old dataset or the new, whole).
        swap_in(built, self.out_dir, aside_path(self.out_dir))
        return self.out_dir

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception:  # noqa: BLE001  (the staging directory is discarded anyway)
            pass
        shutil.rmtree(self.staging, ignore_errors=True)


def write_episodes(out_dir: str | Path, episodes: Iterable[Episode], observation_spec: Any,
                   action_spec: specs.Array, sidecar: dict[str, Any], image_encoding: str = "png",
                   episodes_per_shard: int = 100, overwrite: bool = False) -> Path:
    writer = AtomicRLDSWriter(out_dir, observation_spec, action_spec, sidecar, image_encoding,
                              episodes_per_shard=episodes_per_shard, overwrite=overwrite)
    try:
        for ep in episodes:
            writer.add(ep)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
