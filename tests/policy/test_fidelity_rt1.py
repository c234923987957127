"""RT-1 fidelity: the numeric choices where we follow google-research/robotics_transformer exactly.

- Frame resize: RT-1's encoder calls `tf.image.resize(image, (300, 300))` (bilinear, half-pixel centres, no
  antialiasing; film_efficientnet/pretrained_efficientnet_encoder.py). The expected values are computed
  with TensorFlow here (a project dependency), not copied.
- Action tokenizer: RT-1's RT1ActionTokenizer (tokenizers/action_tokenizer.py), restated from its
  equations in float32: clip to [minimum, maximum], (a - minimum) / (maximum - minimum), times
  vocab_size - 1, cast to int32 (truncation); detokenize token / (vocab_size - 1) * (maximum - minimum)
  + minimum. Checked on every bin edge (computed as the reference detokenizes) and on the reference's own
  test vectors (tokenizers/action_tokenizer_test.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import torch

from policy.action_tokenizer import RT1_FRACTAL_FIELDS, ActionField, ActionTokenizer, DictActionTokenizer
from policy.config import ConfigError, ImageEncoderConfig, ModelConfig
from policy.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocess_frames, resize_frames

tf.config.set_visible_devices([], "GPU")


# --- frame resize ------------------------------------------------------------------------------

RESIZE_CASES = [
    (256, 320, 300),  # fractal / RT-1 frames -> the B3 input: up in height, down in width
    (512, 640, 300),  # down by more than 2x (aliases, as the reference does)
    (96, 128, 64),
    (64, 64, 300),  # up
    (300, 300, 224),
    (37, 53, 64),
    (300, 320, 300),  # one side already at size
]


def _frames(h: int, w: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w, size", RESIZE_CASES)
def test_default_resize_is_tf_image_resize_bit_for_bit(h, w, size):
    frames = _frames(h, w)
    expected = tf.image.resize(frames, (size, size)).numpy()  # TF2: bilinear, antialias=False
    got = resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size).permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_default_preprocessing_is_rt1s_input():
    """RT-1: convert_image_dtype (x / 255), tf.image.resize to 300, ImageNet mean / std (the EfficientNet's
    Rescaling and Normalization layers)."""
    frames = _frames(256, 320)
    img = tf.image.resize(tf.image.convert_image_dtype(frames, tf.float32), (300, 300)).numpy()
    expected = (img - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    got = preprocess_frames(torch.from_numpy(frames), 300).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_antialias_option_is_tf_antialiased_resize_and_differs_from_rt1():
    frames = _frames(256, 320)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    aa = resize_frames(x, 300, "antialias").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(aa, tf.image.resize(frames, (300, 300), antialias=True).numpy(), rtol=0, atol=1e-3)
    # The measured deviation of the option from RT-1's input, in normalised pixel units.
    dev = np.abs(aa - tf.image.resize(frames, (300, 300)).numpy()).max() / (255 * min(IMAGENET_STD))
    assert 0.2 < dev < 0.5


def test_frames_at_size_are_not_resampled():
    frames = torch.from_numpy(_frames(64, 64))
    x = frames.permute(0, 3, 1, 2).float()
    assert torch.equal(resize_frames(x, 64), x) and torch.equal(resize_frames(x, 64, "antialias"), x)


def test_resize_option_defaults_to_rt1_and_is_checked():
    assert ImageEncoderConfig().resize == "bilinear"
    with pytest.raises(ConfigError, match=r"model\.image\.resize: expected one of \['bilinear', 'antialias'\]"):
        ImageEncoderConfig(resize="bicubic").validate()
    with pytest.raises(ValueError, match="model.image.resize"):
        preprocess_frames(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), 16, "nearest")


# --- action tokenizer: RT-1's formula, restated -------------------------------------------------

def _ref_tokenize(a: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """RT1ActionTokenizer.tokenize for a float32 spec, in numpy float32."""
    low, high = np.float32(low), np.float32(high)
    a = np.clip(np.asarray(a, np.float32), low, high)
    return ((a - low) / (high - low) * np.float32(bins - 1)).astype(np.int32)


def _ref_tokenize_tf(a: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """The same with TensorFlow ops, as the reference writes it."""
    low, high = np.float32(low), np.float32(high)
    a = tf.clip_by_value(tf.constant(a, tf.float32), low, high)
    return tf.cast((a - low) / (high - low) * (bins - 1), tf.int32).numpy()


def _ref_detokenize(tokens: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """RT1ActionTokenizer.detokenize: float32 token / (vocab_size - 1) * (maximum - minimum) + minimum."""
    low, high = np.float32(low), np.float32(high)
    return np.asarray(tokens).astype(np.float32) / np.float32(bins - 1) * (high - low) + low


# RT-1's bounds (world_vector, gripper, base displacement: [-1, 1]; rotation_delta [-pi/2, pi/2]; base
# vertical rotation [-pi, pi]) and dataset-statistics-like ones.
BOUNDS = [(-1.0, 1.0), (-math.pi / 2, math.pi / 2), (-math.pi, math.pi), (0.0, 1.0), (-0.0523, 0.0711),
          (-2.5, 0.3)]


@pytest.mark.parametrize("low, high", BOUNDS)
def test_tokenizer_gives_rt1s_token_on_every_bin_edge(low, high):
    bins = 256
    lo, hi = np.float32(low), np.float32(high)  # the spec's float32 minimum / maximum
    edges = _ref_detokenize(np.arange(bins), lo, hi, bins)
    # The edges and their float32 neighbours on both sides.
    values = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)), np.nextafter(edges, np.float32(np.inf))])
    expected = _ref_tokenize(values, lo, hi, bins)
    np.testing.assert_array_equal(expected, _ref_tokenize_tf(values, lo, hi, bins))  # the restatement is RT-1's
    tok = ActionTokenizer([low], [high], bins)
    assert tok.tokenization == "rt1"
    np.testing.assert_array_equal(tok.tokenize(torch.from_numpy(values)[:, None])[:, 0].numpy(), expected)
    # Our detokenize is the reference's, bit for bit.
    np.testing.assert_array_equal(tok.detokenize(torch.arange(bins)[:, None])[:, 0].numpy(), edges)
    # RT-1 sends an edge to its own token or, where rounding puts it just below, to the one before.
    back = expected[:bins] - np.arange(bins)
    assert set(np.unique(back)) <= {-1, 0}


def test_edge_behaviour_counts_and_the_edge_safe_option():
    """How many edges of [-1, 1] RT-1 sends one token down, and what "edge_safe" (our earlier default) does."""
    bins = 256
    edges = _ref_detokenize(np.arange(bins), -1.0, 1.0, bins)
    ref = _ref_tokenize(edges, -1.0, 1.0, bins)
    assert int((ref != np.arange(bins)).sum()) == 63
    safe = ActionTokenizer([-1.0], [1.0], bins, tokenization="edge_safe")
    np.testing.assert_array_equal(safe.tokenize(torch.from_numpy(edges)[:, None])[:, 0].numpy(), np.arange(bins))
    # Away from the edges the two agree.
    mid = _ref_detokenize(np.arange(bins - 1) + 0.5, -1.0, 1.0, bins)
    np.testing.assert_array_equal(safe.tokenize(torch.from_numpy(mid)[:, None])[:, 0].numpy(),
                                  _ref_tokenize(mid, -1.0, 1.0, bins))
    with pytest.raises(ValueError, match="action tokenization: expected one of"):
        ActionTokenizer([-1.0], [1.0], bins, tokenization="round")


def test_tokenizer_matches_rt1_on_dense_random_values():
    rng = np.random.default_rng(0)
    low = np.array([b[0] for b in BOUNDS])
    high = np.array([b[1] for b in BOUNDS])
    a = rng.uniform(low - 0.2 * (high - low), high + 0.2 * (high - low), size=(20000, len(BOUNDS))).astype(np.float32)
    tok = ActionTokenizer(low, high, 256)
    expected = np.stack([_ref_tokenize(a[:, i], low[i], high[i], 256) for i in range(len(BOUNDS))], axis=1)
    np.testing.assert_array_equal(tok.tokenize(torch.from_numpy(a)).numpy(), expected)


def test_dict_tokenizer_gives_rt1s_token_on_every_bin_edge_of_the_fractal_fields():
    bins = 256
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS, bins)
    assert tok.tokenization == "rt1"
    k = np.arange(bins)
    action, expected = {}, []
    for f in RT1_FRACTAL_FIELDS:
        if f.discrete:
            action[f.name] = np.eye(f.size, dtype=np.int32)[k % f.size]
            expected.append((k % f.size)[:, None])
        else:
            lo, hi = np.float32(f.low), np.float32(f.high)
            edges = _ref_detokenize(k, lo, hi, bins)
            action[f.name] = np.repeat(edges[:, None], f.size, axis=1)
            expected.append(np.repeat(_ref_tokenize(edges, lo, hi, bins)[:, None], f.size, axis=1))
    np.testing.assert_array_equal(tok.tokenize(action).numpy(), np.concatenate(expected, axis=1))


def test_tokenization_option_is_saved_and_old_files_keep_theirs():
    tok = ActionTokenizer([-1.0], [1.0], 256, tokenization="edge_safe")
    assert ActionTokenizer.from_dict(tok.to_dict()).tokenization == "edge_safe"
    assert ActionTokenizer.from_dict(ActionTokenizer([-1.0], [1.0]).to_dict()).tokenization == "rt1"
    # Files written before the option existed were tokenized with the 1e-4 offset.
    old = {"kind": "vector", "low": [-1.0], "high": [1.0], "bins": 256, "names": ["a"]}
    assert ActionTokenizer.from_dict(old).tokenization == "edge_safe"
    d = DictActionTokenizer(RT1_FRACTAL_FIELDS, tokenization="edge_safe").to_dict()
    assert DictActionTokenizer.from_dict(d).tokenization == "edge_safe"
    assert ModelConfig().action_tokenization == "rt1"
    with pytest.raises(ConfigError, match=r"model\.action_tokenization: expected one of \['rt1', 'edge_safe'\]"):
        ModelConfig(action_tokenization="nearest").validate()


# --- the reference's own test vectors (tokenizers/action_tokenizer_test.py) ---------------------

def _terminate(size: int = 2) -> ActionField:
    return ActionField("terminate_episode", size, 0, 1, discrete=True)


def test_rt1_vectors_int32():
    tok = DictActionTokenizer([_terminate()], bins=10)
    assert tok.num_tokens == 1
    assert tok.tokenize({"terminate_episode": [0, 1]}).tolist() == [1]  # testTokenize_int32
    with pytest.raises(ValueError, match="one-hot"):  # testTokenize_int32_not_one_hot
        tok.tokenize({"terminate_episode": [1, 8]})
    # testDetokenize_int32: 0 -> [1, 0], 1 -> [0, 1], out of range 3 -> the default [1, 0]
    for t, hot in ((0, [1, 0]), (1, [0, 1]), (3, [1, 0])):
        assert tok.detokenize(torch.tensor([t]))["terminate_episode"].tolist() == hot


def test_rt1_vectors_float():
    tok = DictActionTokenizer([ActionField("world_vector", 3, -1.0, 1.0)], bins=10)
    assert tok.num_tokens == 3
    assert tok.tokenize({"world_vector": [0.1, 0.5, -0.8]}).tolist() == [4, 6, 0]  # testTokenize_float
    batched = np.tile(np.array([0.1, 0.5, -0.8], np.float32), (2, 3, 1))  # ..._with_time_dimension
    assert tuple(tok.tokenize({"world_vector": batched}).shape) == (2, 3, 3)
    limits = DictActionTokenizer([ActionField("world_vector", 2, -1.0, 1.0)], bins=10)
    assert limits.tokenize({"world_vector": [-1.0, 1.0]}).tolist() == [0, 9]  # testTokenize_float_at_limits
    with pytest.raises(ValueError):  # testTokenize_invalid_action_spec_shape (minimum 1 > maximum -1)
        ActionField("world_vector", 2, 1, -1)
    vec = ActionTokenizer([-1.0] * 3, [1.0] * 3, bins=10)  # the same vectors through the vector tokenizer
    assert vec.tokenize(torch.tensor([0.1, 0.5, -0.8])).tolist() == [4, 6, 0]
    assert vec.tokenize(torch.tensor([[-1.0] * 3, [1.0] * 3])).tolist() == [[0, 0, 0], [9, 9, 9]]


def test_rt1_vectors_tokenize_and_detokenize_is_equal():
    """testTokenizeAndDetokenizeIsEqual: vocab 1024, order terminate, world, rotation, gripper; values
    come back within 0.005 (assertSequenceAlmostEqual(places=2))."""
    fields = [_terminate(), ActionField("world_vector", 3, -1.0, 1.0),
              ActionField("rotation_delta", 3, -np.pi / 2, np.pi / 2),
              ActionField("gripper_closedness_action", 1, -1.0, 1.0)]
    tok = DictActionTokenizer(fields, bins=1024)
    assert tok.num_tokens == 8
    rng = np.random.default_rng(0)
    for _ in range(10):
        for batch in ((), (2,)):
            action = {"world_vector": rng.uniform(-1, 1, batch + (3,)),
                      "rotation_delta": rng.uniform(-np.pi / 2, np.pi / 2, batch + (3,)),
                      "gripper_closedness_action": rng.uniform(0, 1, batch + (1,)),
                      "terminate_episode": np.tile(np.array([0, 1]), batch + (1,))}
            back = tok.detokenize(tok.tokenize(action))
            for k, v in action.items():
                assert np.all(np.abs(back[k].numpy() - v) < 0.005), k
