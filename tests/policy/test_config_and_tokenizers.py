"""Typed config loading, RT-1's action tokenizer, and the sentencepiece instruction tokenizer."""
import numpy as np
import pytest
import torch

from policy.action_tokenizer import ActionTokenizer
from policy.config import ConfigError, config_from_dict, config_to_dict, load_config
from policy.language import TextTokenizer, train_sentencepiece
from tests.helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_apply_and_unknown_keys_are_named():
    assert load_config(None, ["train.steps=7", "model.controller.memory_tokens=4"]).train.steps == 7
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(None, ["train.stepz=5"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  controler:\n    type: ttm\n")
    with pytest.raises(ConfigError, match="controler"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected an existing YAML file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override,field", [
    ("model.controller.memory_tokens=0", "model.controller.memory_tokens"),
    ("model.image.backbone=resnet", "model.image.backbone"),
    ("model.controller.memory_mode=LSTM", "model.controller.memory_mode"),
    ("data.sequence=random", "data.sequence"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, error", [
    (["train.grad_clip=0"], r"train\.grad_clip: expected a gradient-norm bound > 0, got 0\.0"),
    (["train.grad_clip=-1"], r"train\.grad_clip: expected a gradient-norm bound > 0, got -1\.0"),
    (["data.action_bounds=spec", "data.action_low=[0,1,0]", "data.action_high=[1,1,1]"],
     r"data\.action_low\[1\] / data\.action_high\[1\]: expected finite bounds with low < high, got \(1\.0, 1\.0\)"),
    (["data.action_bounds=spec", "data.action_low=[0,2]", "data.action_high=[1,1]"], r"data\.action_low\[1\]"),
    (["data.action_low=[0,0]", "data.action_high=[1,1]"],
     r"data\.action_low/action_high: expected empty unless data\.action_bounds is 'spec'"),
    (["train.log_every=0"], r"train\.log_every: expected >= 1 steps, got 0"),
    (["data.shuffle_buffer=0"], r"data\.shuffle_buffer: expected >= 1 episodes, got 0"),
    (["train.num_threads=-2"], r"train\.num_threads: expected >= 0"),
    (["train.processes=0"], r"train\.processes: expected >= 1, got 0"),
    (["train.processes=2", "train.device=cuda"], r"train\.processes: expected 1 with train\.device 'cuda' \(one "
     r"process per GPU: start them with torchrun\), got 2"),
    (["train.processes=3"], r"train\.batch_size: expected a multiple of train\.processes x train\.grad_accum "
     r"\(3 x 1\), got 64"),
    (["train.weight_decay=-0.1"], r"train\.weight_decay: expected >= 0, got -0\.1"),
    (["data.mixture=[{path: a}, {path: b, weight: .inf}]"], r"data\.mixture\[1\]\.weight: expected a finite number, got inf"),
    (["data.mixture=[{path: a, weight: .nan}]"], r"data\.mixture\[0\]\.weight: expected a finite number, got nan"),
    (["data.mixture=[{path: a, weight: 0}]"], r"data\.mixture\[0\]\.weight"),
    (["data.mixture=[{path: a, standardization: brige}]"], r"data\.mixture\[0\]\.standardization: expected 'auto'"),
    (["data.crop_pad=-1"], r"data\.crop_pad: expected >= 0 pixels, got -1"),
    (["data.crop_pad=4", "data.random_shift=4"], r"data\.crop_pad: expected 0 when data\.random_shift is on"),
    # model names that used to fail only after the dataset scan
    (["model.image.variant=b9"], r"model\.image\.variant: expected one of \[.*'b7'.*\], got 'b9'"),
    (["model.language.heads=3"], r"model\.language\.heads: expected a divisor of model\.language\.width \(64\), got 3"),
    (["train.init_modules=[backbone,controler]"], r"train\.init_modules: expected names from \[.*\], got \['controler'\]"),
    (["data.standardization=bridg"], r"data\.standardization: expected 'auto', one of \[.*'bridge'.*\] or a YAML file"),
])
def test_values_that_fail_later_or_train_wrongly_are_refused_at_load(overrides, error):
    with pytest.raises(ConfigError, match=error):
        load_config(ROOT / "configs" / "quickstart.yaml", overrides)


def test_valid_edge_values_still_load():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["train.weight_decay=0", "data.shuffle_buffer=1", "data.random_shift=4", "data.crop_pad=0",
                       "data.action_bounds=spec", "data.action_low=[-1,0]", "data.action_high=[1,0.5]",
                       "data.mixture=[{path: a, weight: 2}, {path: b.yaml, standardization: my.yaml}]",
                       "data.standardization=bridge", "train.init_modules=[controller,head,text]"])
    assert cfg.data.random_shift == 4 and cfg.data.mixture[0].weight == 2.0


def test_config_imports_no_model_module():
    import subprocess
    import sys

    code = "import sys, policy.config; print(sorted(m for m in sys.modules if m.startswith('policy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "['policy', 'policy.config']"


def test_policy_model_top_level_names_are_the_init_modules_names():
    from policy.config import MODULE_NAMES
    from policy.model import PolicyModel

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model.instruction_token=true"])
    model = PolicyModel(cfg.model, vocab_size=64, num_action_dims=5, proprio_dim=4)
    assert {k.split(".")[0] for k in model.state_dict()} == set(MODULE_NAMES)


def test_rt1_reference_vectors():
    tok = ActionTokenizer([-1.0] * 3, [1.0] * 3, bins=10)
    assert tok.tokenize(torch.tensor([0.1, 0.5, -0.8])).tolist() == [4, 6, 0]
    assert tok.tokenize(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])).tolist() == [[0, 0, 0], [9, 9, 9]]
    assert tok.tokenize(torch.tensor([5.0, -5.0, 0.0])).tolist()[:2] == [9, 0]  # clipped to the bounds


def test_round_trip_within_one_bin():
    low, high = np.array([-1.0, -np.pi / 2, 0.0]), np.array([1.0, np.pi / 2, 1.0])
    tok = ActionTokenizer(low, high, bins=256)
    a = torch.from_numpy(np.random.default_rng(0).uniform(low, high, size=(1000, 3))).float()
    back = tok.detokenize(tok.tokenize(a))
    width = torch.from_numpy((high - low) / 255).float()
    assert torch.all(back <= a + 1e-6) and torch.all(a - back <= width + 1e-6)
    # RT-1's truncation (the default) sends some bin edges one token down (tests/policy/test_fidelity_rt1.py);
    # the edge_safe option keeps every edge in its own bin.
    assert set((tok.tokenize(back) - tok.tokenize(a)).unique().tolist()) <= {-1, 0}
    safe = ActionTokenizer(low, high, bins=256, tokenization="edge_safe")
    assert torch.equal(safe.tokenize(safe.detokenize(safe.tokenize(a))), safe.tokenize(a))
    assert ActionTokenizer.from_dict(tok.to_dict()).to_dict() == tok.to_dict()


def test_action_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="equal non-zero length"):
        ActionTokenizer([0, 0], [1])
    with pytest.raises(ValueError, match="last dimension 2"):
        ActionTokenizer([0, 0], [1, 1]).tokenize(torch.zeros(3))


def test_sentencepiece_trained_from_instructions(tmp_path):
    instructions = ["pick up the red block", "touch the blue cube", "push the green block forward"]
    path = train_sentencepiece(instructions, tmp_path / "tok.model", vocab_size=48)
    tok = TextTokenizer(path, max_tokens=16)
    ids, mask = tok.encode(instructions + ["PICK UP the red block"])
    assert ids.shape == (4, 16) and mask[:, 0].all()
    assert np.array_equal(ids[0], ids[3])  # case-insensitive
    assert not np.array_equal(ids[0], ids[1])
    with pytest.raises(ValueError, match="at least one"):
        train_sentencepiece(["", "  "], tmp_path / "x.model", 16)
    # Too long for max_tokens: cut (training read the same ids) with one warning per instruction.
    long = "pick up the red block then push the green block forward and touch the blue cube"
    with pytest.warns(UserWarning, match=r"tokens, the policy reads the first 15 \(model.language.max_tokens=16"):
        a, _ = tok.encode([long])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b, _ = tok.encode([long])  # the same instruction warns once
    assert np.array_equal(a, b) and a[0, -1] == tok.sp.eos_id()


def test_random_shift_moves_whole_sequences_within_the_pad():
    from datasets.augment import random_shift

    g = torch.Generator().manual_seed(0)
    frames = torch.zeros(3, 2, 16, 16, 3, dtype=torch.uint8)
    frames[:, :, 8, 8] = 255  # one bright pixel per frame
    assert torch.equal(random_shift(frames, 0, g), frames)
    shifted = random_shift(frames, 2, g)
    assert shifted.shape == frames.shape and shifted.dtype == torch.uint8
    moved = set()
    for b in range(3):
        where = [tuple(torch.nonzero(shifted[b, t, :, :, 0] == 255)[0].tolist()) for t in range(2)]
        assert where[0] == where[1]  # one shift per sequence
        dy, dx = where[0][0] - 8, where[0][1] - 8
        assert abs(dy) <= 2 and abs(dx) <= 2
        moved.add((dy, dx))
    assert len(moved) > 1  # sequences get different shifts
