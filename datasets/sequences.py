"""Stage 3 of the data path: episodes -> fixed-length training sequences with a validity mask.

Decode + resize in parallel maps (after the DDP shard and the seeded shuffle of episodes), an optional
in-memory cache, then whole-episode unrolls or sliding windows, then RT-1's pad-and-random-crop
(data.crop_pad, datasets/augment.py) on the shuffled training stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from datasets.augment import random_crop
from datasets.tf_setup import tf

if TYPE_CHECKING:
    from datasets.rlds_dataset import RLDSDataset


@dataclass
class SequenceSpec:
    """How episodes become training sequences."""
    mode: str  # "episode" | "window"
    length: int  # T
    image_size: int  # frames resized to image_size x image_size (0 = keep)
    crop_pad: int = 0  # RT-1 augmentation: pad by this many pixels, random-crop back (0 = off)
    parallel_calls: int = -1  # tf.data map parallelism (-1 = AUTOTUNE)
    # model.image.resize: "bilinear" = RT-1's tf.image.resize (no antialiasing), "antialias" = antialiased;
    # the same method the model applies at inference, so training frames are resized as served ones.
    resize: str = "bilinear"

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
            img = tf.image.resize(img, [size, size], antialias=spec.resize == "antialias")
            img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)  # frames stay uint8 (cache memory)
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
