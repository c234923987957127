"""Stage 4 of the data path: a tf.data pipeline of sequences -> torch batches (padded to the batch's longest)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from datasets.source import dataset_error_from_tf
from datasets.tf_setup import tf


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
