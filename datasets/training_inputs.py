"""One call from a config to everything training reads: datasets, statistics, instructions, torch batches.

    inputs = open_training_inputs(cfg, data_path, rank=rank, world_size=world_size, seed=cfg.train.seed)
    batch = next(inputs.batches())  # image [B,T,H,W,3] uint8, action [B,T,A], mask [B,T] bool,
                                    # instruction [B] (index into inputs.instructions), proprio [B,T,P]
                                    # (if used), instruction_embedding [B,E] (if every dataset has one)

Each rank reads a disjoint share of every dataset's episodes (pass the SAME seed on every rank: the shards
are cut from the seeded file order); for a given seed the batch stream is the
same on every run, so a resumed run that skips the batches it has seen (`inputs.batches(skip)`) continues
exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from datasets.rlds_dataset import RLDSDataset
from datasets.sequences import SequenceSpec, make_sequences
from datasets.source import (DatasetError, DatasetSource, dataset_error_from_tf, find_corrupt_shard, has_sidecar,
                             open_source)
from datasets.standardize import Standardization, StandardizationError, from_keys, select
from datasets.tf_setup import tf
from datasets.torch_batches import TorchBatches

_DEFAULT_CAMERA = "observation/image"
CACHE_BUDGET_BYTES = 4 * 2**30  # decoded frames held by data.cache_in_memory, per process


@dataclass
class TrainingInputs:
    """What training reads from the data layer: the opened datasets (keys, shapes, action statistics), the
    instruction list that batch["instruction"] indexes, and this rank's batch stream (`batches(skip)`)."""
    dataset: RLDSDataset  # the first (or only) dataset: shapes, action names, sidecar
    datasets: list[RLDSDataset]  # every dataset of the mixture (the first included): the config must fit each
    weights: list[float]
    scan: dict[str, Any]  # action_stats, max_episode_length, num_transitions, ... (pooled over a mixture)
    instructions: list[str]  # batch["instruction"] indexes this list
    sequence: SequenceSpec
    batch_size: int  # sequences per torch batch (training: this rank's micro-batch)
    action_names: list[str] = field(default_factory=list)
    _stream: Callable[[], TorchBatches] | None = field(default=None, repr=False)  # builds the pipeline afresh
    _built: TorchBatches | None = field(default=None, repr=False)  # the one built at open, not yet handed out

    def batches(self, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """A fresh stream of this rank's torch batches, starting after `skip` batches of the seeded stream
        (exact resume: the pipeline is rebuilt from its seeds, never an iterator already read from)."""
        stream = self._built if self._built is not None else self._stream()
        self._built = None
        if skip:
            stream.ds = stream.ds.skip(skip)
        return iter(stream)

    @property
    def action_dim(self) -> int:
        return self.dataset.action_dim

    @property
    def proprio_dim(self) -> int:
        return self.dataset.proprio_dim

    @property
    def embedding_dim(self) -> int:
        """0 when some dataset ships no precomputed instruction embedding."""
        return min(d.embedding_dim for d in self.datasets)


def open_dataset(cfg: Any, path: str | Path, standardization: str = "auto") -> RLDSDataset:
    """Our own datasets (with a `collect` sidecar) read through the config's keys (data.camera,
    data.proprio_key, data.instruction_key) under 'auto'; any other dataset through its standardisation entry."""
    d = cfg.data
    use_proprio = bool(cfg.model.use_proprio)
    if standardization == "auto":
        src = open_source(path)
        if has_sidecar(src.dir):
            entry = config_keys_entry(src, d.camera, d.instruction_key, d.proprio_key if use_proprio else None)
            return RLDSDataset(src, standardization=entry, use_proprio=use_proprio)
        path = src
    camera = None if d.camera == _DEFAULT_CAMERA else d.camera
    return RLDSDataset(path, standardization=standardization, camera=camera, use_proprio=use_proprio)


def config_keys_entry(src: DatasetSource, camera: str, instruction: str, proprio: str | None) -> Standardization:
    """The entry for explicit step keys: those keys, with the action names and bounds of the entry 'auto'
    selects for the dataset where its action is the same vector (else none: the sidecar's, or a0, a1, ...)."""
    try:
        base = select("auto", src.name, src.sidecar, src.step_keys, f"dataset {src.dir!r}")
    except StandardizationError:
        base = None  # a layout no entry knows: the explicit keys alone
    return from_keys(camera, instruction, proprio, "action", base)


def pooled_scan(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of several datasets together: exact count/mean/std/min/max; p01/p99 are the outermost
    of the datasets' percentiles (a bound, not the pooled percentile)."""
    if len(scans) == 1:
        return dict(scans[0])
    n = np.array([s["action_stats"]["count"] for s in scans], np.float64)[:, None]
    mean = np.array([s["action_stats"]["mean"] for s in scans])
    var = np.array([s["action_stats"]["std"] for s in scans]) ** 2
    m = (n * mean).sum(0) / n.sum()
    v = (n * (var + (mean - m) ** 2)).sum(0) / n.sum()
    st = lambda k, f: f(np.array([s["action_stats"][k] for s in scans]), axis=0).tolist()  # noqa: E731
    return {
        "action_stats": {"mean": m.tolist(), "std": np.sqrt(v).tolist(), "min": st("min", np.min),
                         "max": st("max", np.max), "p01": st("p01", np.min), "p99": st("p99", np.max),
                         "count": int(n.sum())},
        "num_transitions": int(sum(s["num_transitions"] for s in scans)),
        "num_episodes": int(sum(s.get("num_episodes", 0) for s in scans)),
        "max_episode_length": int(max(s["max_episode_length"] for s in scans)),
        "mean_episode_length": float(sum(s["mean_episode_length"] * s.get("num_episodes", 1) for s in scans)
                                     / max(sum(s.get("num_episodes", 1) for s in scans), 1)),
        "instructions": sorted({i for s in scans for i in s["instructions"]}),
    }


def check_data_source(cfg: Any, data_path: str | Path | None) -> None:
    """Exactly one source of data: --data or data.mixture (checked before a run writes anything)."""
    if cfg.data.mixture and data_path:
        raise ValueError(f"--data {str(data_path)!r}: expected none with data.mixture (list every dataset in "
                         "the mixture), got both")
    if not cfg.data.mixture and not data_path:
        raise ValueError("--data: expected an RLDS dataset directory (or data.mixture in the config), got neither")


def open_training_inputs(cfg: Any, data_path: str | Path | None, *, rank: int = 0, world_size: int = 1,
                         seed: int = 0, repeat: bool = True, batch_size: int | None = None) -> TrainingInputs:
    """`batch_size`: sequences per torch batch (default cfg.train.batch_size; training passes its per-rank
    micro-batch). `repeat`: an endless stream of full batches, else one pass (the last batch may be short)."""
    d = cfg.data
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    check_data_source(cfg, data_path)
    if d.mixture:
        sources = [(m.path, float(m.weight), m.standardization) for m in d.mixture]
    else:
        sources = [(str(data_path), 1.0, d.standardization)]
    datasets = [open_dataset(cfg, p, s) for p, _, s in sources]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.action_dim != first.action_dim:
            raise DatasetError(f"data.mixture: dataset {ds.dir!r} has {ds.action_dim} action dimensions "
                               f"({ds.entry.name}), expected {first.action_dim} like {first.dir!r}")
        if ds.proprio_dim != first.proprio_dim:
            raise DatasetError(f"data.mixture: dataset {ds.dir!r} has proprio of size {ds.proprio_dim}, expected "
                               f"{first.proprio_dim} like {first.dir!r} (or set model.use_proprio=false)")
    scan = pooled_scan([ds.scan() for ds in datasets])
    instructions = sorted({i for ds in datasets for i in ds.instructions})
    ids = {s: i for i, s in enumerate(instructions)}
    spec = SequenceSpec(d.sequence, d.sequence_length, cfg.model.image.image_size, crop_pad=d.crop_pad,
                        parallel_calls=d.parallel_calls, resize=cfg.model.image.resize)
    cache = bool(d.cache_in_memory)
    if cache:  # a cache larger than memory is the classic RLDS loader death: fall back to streaming
        size = cfg.model.image.image_size
        frames = scan["num_transitions"] / max(world_size, 1)
        est = frames * (size * size * 3 if size else int(np.prod(first.image_shape)))
        if est > CACHE_BUDGET_BYTES:
            warnings.warn(f"data.cache_in_memory: the decoded dataset would take ~{est / 2**30:.1f} GiB "
                          f"(> {CACHE_BUDGET_BYTES / 2**30:.0f} GiB); streaming from disk instead", stacklevel=2)
            cache = False
    with_embedding = all(ds.embedding_dim for ds in datasets) and len({ds.embedding_dim for ds in datasets}) == 1
    weights = [w for _, w, _ in sources]
    total = sum(weights)
    weights = [w / total for w in weights]
    batch_size = batch_size or cfg.train.batch_size

    def stream() -> TorchBatches:
        seqs = []
        for i, ds in enumerate(datasets):
            s = make_sequences(ds, spec, ids, shuffle=True, seed=seed + 1000 * i, cache=cache,
                               shuffle_buffer=d.shuffle_buffer, shard=(rank, world_size))
            if not with_embedding and ds.embedding_dim:
                s = s.map(lambda el: {k: v for k, v in el.items() if k != "instruction_embedding"})
            seqs.append(s.repeat() if len(datasets) > 1 else s)
        mixed = seqs[0] if len(seqs) == 1 else tf.data.Dataset.sample_from_datasets(seqs, weights, seed=seed)
        return TorchBatches(mixed, batch_size, repeat=repeat, on_error=read_error)

    def read_error(exc: tf.errors.OpError) -> DatasetError:
        # A DataLossError names no file: look for the corrupt shard in each dataset of the stream.
        if isinstance(exc, tf.errors.DataLossError):
            for ds in datasets:
                found = find_corrupt_shard(ds.shard_files, ds.dir)
                if found is not None:
                    return found
        return dataset_error_from_tf(exc, "reading training batches")

    return TrainingInputs(first, datasets, weights, scan, instructions, spec, batch_size, list(first.action_names),
                          _stream=stream, _built=stream())
