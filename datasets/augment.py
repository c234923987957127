"""Image augmentation, one home for both shift augmentations (at most one is on: policy/config.py).

- data.crop_pad -> `random_crop`: RT-1's pad-and-random-crop inside tf.data (reflected borders, one
  stateless seeded offset per sequence), applied by datasets/sequences.py to the shuffled training stream.
- data.random_shift -> `random_shift`: the torch-side twin, applied by the trainer to each micro-batch
  (replicated borders, offsets drawn from the step's seeded generator, so it resumes exactly).

TensorFlow is imported inside `random_crop` only, so that the torch side stays light to import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import tensorflow as tf


def random_crop(ds: tf.data.Dataset, pad: int, seed: int, calls: int) -> tf.data.Dataset:
    """RT-1's augmentation: pad each sequence's frames by `pad` pixels (edge-reflected), then crop back to
    the original size at one random offset per sequence (a steady camera moves as a whole). Stateless
    seeds make it reproducible; the seed stream is drawn afresh each epoch of a repeated dataset (a replayed
    one would crop the n-th sequence of every epoch at the same offset)."""
    from datasets.tf_setup import tf

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


def random_shift(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,T,H,W,C] -> the same frames shifted by up to `pad` pixels (one shift per sequence):
    edge-pad by `pad`, then crop H x W at a random offset."""
    if pad <= 0:
        return images
    b, t, h, w, c = images.shape
    x = images.permute(0, 1, 4, 2, 3).reshape(b, t * c, h, w).float()
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=gen)).tolist()
    out = torch.stack([x[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return out.reshape(b, t, c, h, w).permute(0, 1, 3, 4, 2).to(images.dtype)
