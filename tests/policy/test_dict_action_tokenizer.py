"""DictActionTokenizer: RT-1's action tokenizer for Open X-Embodiment dict actions."""
import json
import math

import numpy as np
import pytest
import torch

from policy.action_tokenizer import RT1_FRACTAL_FIELDS, ActionField, ActionTokenizer, DictActionTokenizer

WORLD = ActionField("world_vector", 3, -1.0, 1.0)
TERMINATE3 = ActionField("terminate_episode", 3, 0, 1, discrete=True)


def _fractal_action(rng, batch=()):
    def u(lo, hi, n):
        return rng.uniform(lo, hi, size=batch + (n,)).astype(np.float32)
    idx = rng.integers(0, 3, size=batch)
    return {
        "terminate_episode": np.eye(3, dtype=np.int32)[idx],
        "world_vector": u(-1, 1, 3),
        "rotation_delta": u(-math.pi / 2, math.pi / 2, 3),
        "gripper_closedness_action": u(-1, 1, 1),
        "base_displacement_vertical_rotation": u(-math.pi, math.pi, 1),
        "base_displacement_vector": u(-1, 1, 2),
    }


def test_rt1_float_vectors():
    tok = DictActionTokenizer([WORLD], bins=10)
    assert tok.num_tokens == 3
    assert tok.tokenize({"world_vector": [0.1, 0.5, -0.8]}).tolist() == [4, 6, 0]
    t = tok.tokenize({"world_vector": torch.tensor([-1.0, 1.0, 5.0])})  # bounds and a clipped value
    assert t.dtype == torch.int64 and t.tolist() == [0, 9, 9]
    # Same formula as ActionTokenizer.
    x = torch.rand(4, 5, 3) * 2.4 - 1.2
    assert torch.equal(tok.tokenize({"world_vector": x}), ActionTokenizer([-1.0] * 3, [1.0] * 3, 10).tokenize(x))
    assert tok.tokenize({"world_vector": x}).shape == (4, 5, 3)


def test_rt1_terminate_one_hot():
    tok = DictActionTokenizer([TERMINATE3], bins=10)
    assert tok.num_tokens == 1 and tok.names == ("terminate_episode",)
    assert tok.tokenize({"terminate_episode": [0, 1, 0]}).tolist() == [1]
    back = tok.detokenize(torch.tensor([1]))["terminate_episode"]
    assert back.dtype == torch.int32 and back.tolist() == [0, 1, 0]
    # As RT-1: an out-of-range token becomes the default one-hot [1, 0, 0].
    assert tok.detokenize(torch.tensor([7]))["terminate_episode"].tolist() == [1, 0, 0]
    # A float one-hot is accepted too.
    assert tok.tokenize({"terminate_episode": np.array([[0.0, 0.0, 1.0]])}).tolist() == [[2]]


def test_fractal_fields_and_names():
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS)
    assert tok.num_tokens == 11 and len(tok.names) == 11
    assert [f.name for f in RT1_FRACTAL_FIELDS] == [
        "terminate_episode", "world_vector", "rotation_delta", "gripper_closedness_action",
        "base_displacement_vertical_rotation", "base_displacement_vector"]
    assert tok.names[:5] == ("terminate_episode", "world_vector_0", "world_vector_1", "world_vector_2",
                             "rotation_delta_0")
    assert tok.names[-1] == "base_displacement_vector_1"


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_fractal_round_trip(batch):
    rng = np.random.default_rng(0)
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS, bins=256)
    x = _fractal_action(rng, batch)
    t = tok.tokenize(x)
    assert t.shape == batch + (11,) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) <= 255
    y = tok.detokenize(t)
    assert set(y) == set(x)
    for f in RT1_FRACTAL_FIELDS:
        if f.discrete:
            assert y[f.name].dtype == torch.int32
            assert np.array_equal(y[f.name].numpy(), x[f.name])
        else:
            width = (f.high - f.low) / 255
            assert y[f.name].shape == x[f.name].shape
            assert np.all(np.abs(y[f.name].numpy() - x[f.name]) <= width + 1e-6)
    # Detokenised values are bin edges: RT-1's truncation (the default) gives their own token or, for some
    # edges, the one below (tests/policy/test_fidelity_rt1.py); the discrete token always round-trips.
    assert set((tok.tokenize(y) - t).unique().tolist()) <= {-1, 0}
    assert torch.equal(tok.tokenize(y)[..., 0], t[..., 0])
    # With tokenization="edge_safe" all tokens also round-trip the other way.
    all_t = torch.randint(0, 256, batch + (11,))
    all_t[..., 0] = torch.randint(0, 3, batch)
    safe = DictActionTokenizer(RT1_FRACTAL_FIELDS, bins=256, tokenization="edge_safe")
    assert torch.equal(safe.tokenize(safe.detokenize(all_t)), all_t)
    assert set((tok.tokenize(tok.detokenize(all_t)) - all_t).unique().tolist()) <= {-1, 0}


def test_flatten_unflatten():
    rng = np.random.default_rng(1)
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS)
    x = _fractal_action(rng, (4,))
    flat = tok.flatten(x)
    assert flat.shape == (4, 11) and flat.dtype == torch.float32
    assert np.array_equal(flat[:, 0].numpy(), x["terminate_episode"].argmax(-1).astype(np.float32))
    assert np.allclose(flat[:, 1:4].numpy(), x["world_vector"])
    y = tok.unflatten(flat)
    for k in x:
        assert np.allclose(y[k].numpy(), x[k])
    assert y["terminate_episode"].dtype == torch.int32


def test_to_dict_from_dict_json():
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS + (ActionField("per_dim", 2, [0.0, -2.0], [1.0, 2.0]),), bins=64)
    d = json.loads(json.dumps(tok.to_dict()))
    tok2 = DictActionTokenizer.from_dict(d)
    assert tok2.to_dict() == tok.to_dict()
    assert tok2.fields == tok.fields and tok2.names == tok.names and tok2.bins == 64
    t = torch.randint(0, 64, (5, tok.num_tokens))
    t[:, 0] = torch.randint(0, 3, (5,))
    a, b = tok.detokenize(t), tok2.detokenize(t)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fractal_single():
    return {k: v for k, v in _fractal_action(np.random.default_rng(2)).items()}


@pytest.mark.parametrize("mutate, pattern", [
    (lambda x: x.pop("rotation_delta"), r"'rotation_delta'.*missing"),
    (lambda x: x.__setitem__("world_vector", np.zeros(2, np.float32)), r"'world_vector'.*expected last dimension 3.*\(2,\)"),
    (lambda x: x.__setitem__("gripper_closedness_action", np.float32(0.5)), r"'gripper_closedness_action'.*expected last dimension 1"),
    (lambda x: x.__setitem__("base_displacement_vector", np.array([0.1, np.nan])), r"'base_displacement_vector'.*finite.*nan"),
    (lambda x: x.__setitem__("rotation_delta", np.array([0.1, np.inf, 0.0])), r"'rotation_delta'.*finite.*inf"),
    (lambda x: x.__setitem__("terminate_episode", np.array([1, 8, 0])), r"'terminate_episode'.*one-hot.*size 3.*\[1, 8, 0\]"),
    (lambda x: x.__setitem__("terminate_episode", np.array([1, 1, 0])), r"'terminate_episode'.*one-hot.*\[1, 1, 0\]"),
    (lambda x: x.__setitem__("terminate_episode", np.array([0, 0, 0])), r"'terminate_episode'.*one-hot"),
    (lambda x: x.__setitem__("world_vector", np.zeros((2, 3), np.float32)), r"'world_vector'.*leading dims \(\)"),
])
def test_tokenize_validation_names_field(mutate, pattern):
    tok = DictActionTokenizer(RT1_FRACTAL_FIELDS)
    x = _fractal_single()
    tok.tokenize(x)  # valid as given
    mutate(x)
    with pytest.raises(ValueError, match=pattern):
        tok.tokenize(x)
    with pytest.raises(ValueError, match=pattern):
        tok.flatten(x)


def test_construction_validation():
    with pytest.raises(ValueError, match=r"'terminate_episode'.*bins >= 3.*bins=2"):
        DictActionTokenizer([TERMINATE3], bins=2)
    DictActionTokenizer([TERMINATE3], bins=3)
    with pytest.raises(ValueError, match=r"'world_vector'.*unique"):
        DictActionTokenizer([WORLD, WORLD])
    with pytest.raises(ValueError, match="at least one"):
        DictActionTokenizer([])
    with pytest.raises(ValueError, match=r"'x'.*low <= high"):
        ActionField("x", 1, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"'x'.*size >= 1"):
        ActionField("x", 0, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"'x'.*low of length 2, got 3"):
        ActionField("x", 2, [0, 0, 0], 1.0)
    with pytest.raises(ValueError, match=r"'x'.*finite"):
        ActionField("x", 1, -math.inf, 1.0)
    with pytest.raises(ValueError, match=r"expected last dimension 11"):
        DictActionTokenizer(RT1_FRACTAL_FIELDS).detokenize(torch.zeros(10, dtype=torch.int64))
    f = ActionField("x", 2, [0, 1], [1, 2])
    assert f.low == (0.0, 1.0) and hash(f) == hash(ActionField("x", 2, (0.0, 1.0), (1.0, 2.0)))


def test_policy_dir_stores_and_restores_either_tokenizer(tmp_path):
    """A policy trained on dict actions keeps its DictActionTokenizer (and 11 action tokens) on disk."""
    from policy.action_tokenizer import action_tokenizer_from_dict
    from policy.config import ControllerConfig, ExperimentConfig, ModelConfig
    from policy.language import train_sentencepiece
    from policy.model import PolicyModel
    from policy.policy_dir import InputSpec, PolicyDirError, load_policy_dir, save_policy_dir

    tok_model = train_sentencepiece(["pick up the can", "open the drawer"], tmp_path / "tok.model", vocab_size=40)
    cfg = ExperimentConfig(model=ModelConfig(controller=ControllerConfig(type="lstm", layers=1), use_proprio=False))
    dict_tok = DictActionTokenizer(RT1_FRACTAL_FIELDS, bins=256)
    vec_tok = ActionTokenizer([-1.0] * 3, [1.0] * 3, 256, ["x", "y", "z"])
    for name, tok in (("dict", dict_tok), ("vector", vec_tok)):
        model = PolicyModel(cfg.model, vocab_size=40, num_action_dims=tok.num_tokens, proprio_dim=0)
        spec = InputSpec("image", (64, 64, 3), None, 0, tok.num_tokens, {})
        loaded = load_policy_dir(save_policy_dir(tmp_path / name, cfg, model, tok_model, tok, {}, spec))
        assert type(loaded.action_tokenizer) is type(tok)
        assert loaded.action_tokenizer.to_dict() == tok.to_dict()
        assert loaded.action_tokenizer.num_tokens == (11 if name == "dict" else 3)
    assert isinstance(action_tokenizer_from_dict({"low": [0.0], "high": [1.0], "bins": 4}), ActionTokenizer)  # old files
    stats = json.loads((tmp_path / "dict" / "action_stats.json").read_text())
    stats["tokenizer"]["kind"] = "banana"
    (tmp_path / "dict" / "action_stats.json").write_text(json.dumps(stats))
    with pytest.raises(PolicyDirError, match="kind: expected 'vector' or 'dict', got 'banana'"):
        load_policy_dir(tmp_path / "dict")
