"""Stage 4 of the data path: a tf.data pipeline of sequences -> torch batches (padded to the batch's longest)."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from datasets.source import DatasetError, dataset_error_from_tf
from datasets.tf_setup import tf


class TorchBatches(torch.utils.data.IterableDataset):
    """Endless (or one-pass) stream of torch batches from a tf.data pipeline.

    `on_error`: turns a tf.data read failure into a named DatasetError (training passes one that names the
    corrupt shard of the datasets it reads); without it the error is named from its message alone."""

    def __init__(self, ds: tf.data.Dataset, batch_size: int, repeat: bool = True, prefetch: int = 2,
                 on_error: Callable[[tf.errors.OpError], DatasetError] | None = None):
        super().__init__()
        self.on_error = on_error
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
                if self.on_error is not None:
                    raise self.on_error(exc) from None
                raise dataset_error_from_tf(exc, "reading training batches") from None
            yield {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}  # tf hands out read-only arrays
