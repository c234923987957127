"""Stage 1 of the data path: where a dataset is, and whether its files can be read.

`open_source(path)` resolves a dataset directory (or bucket path), opens it with
`tfds.builder_from_directory`, checks it is RLDS (episodes of `steps`) with the split asked for, walks
every local shard's record headers (a missing or truncated shard is named now, not mid-training) and reads
our `collect` sidecar (policy_stack.json). Errors are `DatasetError`s naming the dataset, file and field.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.tf_setup import tf, tfds

MAX_OPEN_SHARDS = 32  # shards read at once when streaming episodes (RLDSDataset.episodes())

SIDECAR = "policy_stack.json"  # what `collect` writes beside the TFDS files (datasets/rlds_writer.py)
CACHE_ENV = "TTM_POLICY_CACHE"  # overrides ~/.cache/ttm-policy


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the dataset, the file and the field."""


class CorruptDatasetError(DatasetError):
    """A shard whose bytes fail TFRecord's checksums (changed after they were written); names the file."""


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


def all_keys(tree: Any, prefix: str = "") -> list[str]:
    """Every key path ('observation/image', ...) of a TFDS FeaturesDict, nested dicts included."""
    out = []
    for k in tree.keys():
        v = tree[k]
        if isinstance(v, tfds.features.FeaturesDict):
            out.append(f"{prefix}{k}")
            out += all_keys(v, f"{prefix}{k}/")
        else:
            out.append(f"{prefix}{k}")
    return out


def get_feature(tree: Any, key: str) -> Any:
    """The feature at key path `key` ('observation/image'), or None."""
    node = tree
    for part in key.split("/"):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


def read_sidecar(dataset_dir: str) -> dict:
    """Our `collect` sidecar (env, action names and bounds, ...), or {} for other datasets."""
    try:
        return json.loads(tf.io.gfile.GFile(f"{dataset_dir}/{SIDECAR}").read())
    except (tf.errors.NotFoundError, ValueError):
        return {}


def has_sidecar(dataset_dir: str) -> bool:
    return bool(tf.io.gfile.exists(f"{dataset_dir}/{SIDECAR}"))


@dataclass
class DatasetSource:
    """An opened RLDS dataset directory: the TFDS builder, one split, and what describes the files."""
    dir: str
    builder: Any  # tfds.core.DatasetBuilder
    split: str
    num_episodes: int
    sidecar: dict
    features: Any  # the episode FeaturesDict

    @property
    def name(self) -> str:
        return self.builder.info.name

    @property
    def steps(self) -> Any:
        """The step FeaturesDict."""
        return self.features["steps"].feature

    @property
    def step_keys(self) -> list[str]:
        return all_keys(self.steps)

    @property
    def split_info(self) -> Any:
        return self.builder.info.splits[self.split]


def open_source(path: str | Path, split: str = "train", verify_shards: bool = True) -> DatasetSource:
    """Resolve and open a dataset; with `verify_shards`, every local shard's records are counted."""
    d = resolve_dataset_dir(path)
    info_file = f"{d}/dataset_info.json"
    try:
        builder = tfds.builder_from_directory(d)
    except Exception as exc:  # noqa: BLE001  (tfds raises many types for a broken directory)
        raise DatasetError(f"dataset {d!r}: {info_file!r} could not be opened as a TFDS dataset: {exc}") from None
    features = builder.info.features
    if "steps" not in features:
        raise DatasetError(f"dataset {d!r}: file 'features.json', field 'steps': not an RLDS dataset, "
                           f"episodes have no 'steps' (found {list(features.keys())})")
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {d!r}: split {split!r} not in dataset_info.json; "
                           f"available: {list(builder.info.splits.keys())}")
    num_episodes = int(builder.info.splits[split].num_examples)
    if num_episodes == 0:
        raise DatasetError(f"dataset {d!r}: split {split!r} holds no episodes")
    if verify_shards and "://" not in d:
        si = builder.info.splits[split]
        lengths = list(si.shard_lengths) or [None] * len(si.filepaths)
        for fp, n in zip(si.filepaths, lengths):
            check_tfrecord_shard(Path(str(fp)), n, d)
    return DatasetSource(d, builder, split, num_episodes, read_sidecar(d), features)


def _record_holding(path: str, offset: int) -> tuple[int, int]:
    """(1-based index of the record spanning byte `offset`, number of records) from the record headers."""
    with tf.io.gfile.GFile(path, "rb") as f:
        size = f.size()
        pos, n, hit = 0, 0, 0
        while pos < size:
            f.seek(pos)
            header = f.read(12)
            if len(header) < 12:
                break
            n += 1
            end = pos + 12 + struct.unpack("<Q", header[:8])[0] + 4
            if pos <= offset < end:
                hit = n
            pos = end
    return hit, n


def _tf_message(exc: tf.errors.OpError) -> str:
    """TensorFlow's message without its function-node prefix and op suffix."""
    text = exc.message.replace("\\'", "'")
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\].*$", "", text, flags=re.S).strip()


def find_corrupt_shard(shard_files: list[str], dataset: str) -> CorruptDatasetError | None:
    """Re-read each shard's raw records (checksums verified, nothing decoded) to name the file behind a
    DataLossError: tf.data reports only 'corrupted record at BYTE', not which file. Only run after a read
    failed, so the full pass costs nothing on healthy data. None when every shard reads back."""
    for fp in shard_files:
        try:
            tf.data.TFRecordDataset(fp).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
        except tf.errors.DataLossError as exc:
            text = _tf_message(exc)
            at = re.search(r"corrupted record at (\d+)", text)
            if not at:
                first = text.splitlines()[0] if text else "data loss"
                return CorruptDatasetError(f"dataset {dataset!r}: shard file {Path(fp).name!r} is unreadable: "
                                           f"{first} (re-copy or re-collect it)")
            where = ""
            try:
                rec, n = _record_holding(fp, int(at.group(1)))
                where = f" (record {rec} of {n})" if rec else ""
            except (OSError, tf.errors.OpError, struct.error):
                pass
            return CorruptDatasetError(
                f"dataset {dataset!r}: shard file {Path(fp).name!r} is corrupt: {at.group(0)}{where}: a TFRecord "
                "checksum does not match the bytes on disk (the file changed after it was written; re-copy or "
                "re-collect it)")
        except tf.errors.OpError:
            continue  # missing/unreadable files are named by check_tfrecord_shard, not here
    return None


def read_error(exc: tf.errors.OpError, context: str, shard_files: list[str], dataset: str) -> DatasetError:
    """A named DatasetError for a tf.data failure while reading `dataset`: a corrupt shard names its file."""
    if isinstance(exc, tf.errors.DataLossError):
        found = find_corrupt_shard(shard_files, dataset)
        if found is not None:
            return found
    return dataset_error_from_tf(exc, context)


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
    plain = _tf_message(exc)
    return DatasetError(f"{context}: {plain.splitlines()[0] if plain else type(exc).__name__}")
