"""Tampered or corrupted policy directories are refused at load, naming the file and field; a policy
never steps out a non-finite action. All on real directories written by save_policy_dir (through
rollout/random_policy.py, as `train` writes them)."""
import json
import shutil
import struct
import warnings

import numpy as np
import pytest
import torch

from policy.policy_dir import (FILES, MANIFEST, LegacyPolicyDirWarning, NonFiniteWeightsError, PolicyDirError,
                               check_finite_state_dict, load_policy_dir, save_policy_dir, write_manifest)
from policy.runner import NonFiniteActionError, PolicyRunner
from rollout.random_policy import build_random_policy

INSTR = "pick up the red block"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("integrity") / "policy", seed=3)


@pytest.fixture
def copy(policy_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(policy_dir, d)
    return d


def _obs(seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "state": rng.normal(size=4).astype(np.float32)}


def _load_strict(d):
    """Load with warnings as errors: a directory saved now must not look legacy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyPolicyDirWarning)
        return PolicyRunner.load(d)


def _refused(d, needles, cls=PolicyDirError):
    with pytest.raises(cls) as exc:
        PolicyRunner.load(d)
    msg = str(exc.value)
    for n in [repr(str(d))] + needles:
        assert n in msg, (n, msg)
    return msg


# ---- safetensors surgery ----------------------------------------------------------------------------
def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _tensor_span(path, name):
    n, header = _header(path)
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _set_bytes(path, start, end, value):
    raw = bytearray(path.read_bytes())
    raw[start:end] = bytes([value]) * (end - start)
    path.write_bytes(bytes(raw))


def _set_dtype(path, name, dtype):
    raw = path.read_bytes()
    n, header = _header(path)
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])  # the format allows space padding


def _edit_json(d, name, change):
    data = json.loads((d / name).read_text())
    change(data)
    (d / name).write_text(json.dumps(data, indent=2))


def _swap_bounds(t):
    t["tokenizer"]["low"], t["tokenizer"]["high"] = t["tokenizer"]["high"], t["tokenizer"]["low"]


def _bins_2(t):
    t["tokenizer"]["bins"] = 2


def _image_1x1(m):
    m["input"]["image_shape"] = [1, 1, 3]


def _six_action_dims(d):
    # Consistent between action_stats.json and policy.json, but not with the 5-dim head in the weights.
    def add(t):
        tok = t["tokenizer"]
        tok["low"].append(-1.0), tok["high"].append(1.0), tok["names"].append("extra")
    _edit_json(d, "action_stats.json", add)
    _edit_json(d, "policy.json", lambda m: m["input"].update(action_dim=6))


# ---- the manifest -------------------------------------------------------------------------------------
def test_saved_policy_carries_a_manifest_of_every_other_file(policy_dir):
    import hashlib

    manifest = json.loads((policy_dir / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == set(FILES) - {MANIFEST} and MANIFEST in FILES
    for name, entry in manifest["files"].items():
        data = (policy_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((policy_dir / "policy.json").read_text())["manifest"] == MANIFEST
    _load_strict(policy_dir)


# Each breaks one invariant. Refused with the manifest as saved (the note names the changed file too) and
# with a regenerated manifest (the invariant holds on its own, e.g. after a careless re-save).
TAMPER = {
    "swapped bounds": (lambda d: _edit_json(d, "action_stats.json", _swap_bounds), "action_stats.json",
                       ["action_stats.json tokenizer.low/high", "expected low <= high", "low > high in 5 of 5",
                        "world_vector_x (low 1.0, high -1.0)", "swapped"], PolicyDirError),
    "bins mismatch": (lambda d: _edit_json(d, "action_stats.json", _bins_2), "action_stats.json",
                      ["action_stats.json tokenizer.bins", "expected 256", "action head's output size", "got 2"],
                      PolicyDirError),
    "dtype header F32 -> I32": (lambda d: _set_dtype(d / "model.safetensors", "head.bias", "I32"), "model.safetensors",
                                ["model.safetensors tensor 'head.bias' dtype", "expected F32", "got I32"],
                                PolicyDirError),
    "image shape 1x1": (lambda d: _edit_json(d, "policy.json", _image_1x1), "policy.json",
                        ["policy.json input.image_shape", "at least 64x64", "model.image.image_size",
                         "got [1, 1, 3]"], PolicyDirError),
    "action dims vs head": (_six_action_dims, "action_stats.json",
                            ["model.safetensors tensor 'head.", "shape: expected", "6 action dims"], PolicyDirError),
    "head bias bytes 0xFF (NaN)": (lambda d: _set_bytes(d / "model.safetensors",
                                                        *_tensor_span(d / "model.safetensors", "head.bias"), 0xFF),
                                   "model.safetensors",
                                   ["model.safetensors", "expected finite weights", "head.bias (1280 NaN)"],
                                   NonFiniteWeightsError),
}


@pytest.mark.parametrize("regenerate", [False, True], ids=["manifest as saved", "manifest regenerated"])
@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_policy_is_refused_naming_file_and_field(copy, case, regenerate):
    change, changed_file, needles, cls = TAMPER[case]
    change(copy)
    if regenerate:
        write_manifest(copy)
    msg = _refused(copy, needles, cls)
    assert (f"{changed_file}: sha256 expected" in msg) != regenerate, msg


def test_flipped_weight_bytes_are_refused_by_the_checksum(copy):
    weights = copy / "model.safetensors"
    start = 8 + _header(weights)[0]  # the data, after the header
    raw = bytearray(weights.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(start, len(raw)), size=200, replace=False):
        raw[i] ^= 0x01  # low mantissa bits: every value stays finite and plausible
    weights.write_bytes(bytes(raw))
    msg = _refused(copy, ["do not match manifest.json", "model.safetensors: sha256 expected"])
    assert "config.yaml:" not in msg and "policy.json:" not in msg  # only the changed file is named


@pytest.mark.parametrize("change, needles", [
    (lambda d: (d / MANIFEST).unlink(), ["manifest.json", "policy.json names", "got no such file"]),
    (lambda d: (d / MANIFEST).write_text('{"format": 1, "alg'), ["manifest.json", "could not read it",
                                                                   "JSONDecodeError"]),
    (lambda d: (d / MANIFEST).write_text("[]"), ["manifest.json: expected", "got a JSON list"]),
    (lambda d: _edit_json(d, MANIFEST, lambda m: m["files"].pop("tokenizer.model")),
     ["manifest.json files: expected an entry for tokenizer.model, got none"]),
    (lambda d: _edit_json(d, MANIFEST, lambda m: m["files"].update(
        {"notes.txt": {"size": 3, "sha256": "0" * 64}})), ["notes.txt: expected a file of 3 bytes", "got none"]),
    (lambda d: _edit_json(d, MANIFEST, lambda m: m["files"].update(
        {"../x": {"size": 3, "sha256": "0" * 64}})), ["expected plain file names", "'../x'"]),
    (lambda d: _edit_json(d, MANIFEST, lambda m: m["files"]["config.yaml"].update(sha256="abc")),
     ["manifest.json files.config.yaml", "64 hex digits"]),
    (lambda d: _edit_json(d, "policy.json", lambda m: m["input"]["env"].update(env="metaworld-mt10")),
     ["policy.json: sha256 expected"]),
    (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text() + "\n"),
     ["config.yaml: sha256 expected", "(size expected"]),
])
def test_manifest_missing_extra_or_mismatched_is_refused(copy, change, needles):
    change(copy)
    _refused(copy, needles)


def test_files_the_manifest_does_not_list_are_ignored_and_write_manifest_blesses_an_edit(copy):
    (copy / "README.txt").write_text("notes")  # loading never reads it
    _load_strict(copy)
    _edit_json(copy, "policy.json", lambda m: m["input"]["env"].update(env="metaworld-mt10"))
    with pytest.raises(PolicyDirError, match="policy.json: sha256 expected"):
        PolicyRunner.load(copy)
    write_manifest(copy)  # a deliberate edit, re-blessed
    assert _load_strict(copy).spec.env["env"] == "metaworld-mt10"


def test_legacy_dir_without_manifest_loads_with_a_warning_after_the_invariants(copy):
    (copy / MANIFEST).unlink()
    _edit_json(copy, "policy.json", lambda m: m.pop("manifest"))  # as saved before manifests existed
    with pytest.warns(LegacyPolicyDirWarning, match=r"no manifest.json .*changed bytes cannot be detected.*"
                                                    r"write_manifest"):
        r = PolicyRunner.load(copy)
    r.reset(INSTR)
    assert np.all(np.isfinite(r.step(_obs())))
    _edit_json(copy, "action_stats.json", _swap_bounds)
    with pytest.raises(PolicyDirError, match="low > high"):  # the invariants still apply
        PolicyRunner.load(copy)
    _edit_json(copy, "action_stats.json", _swap_bounds)
    write_manifest(copy)  # upgrades it: now deleting the manifest is detected
    _load_strict(copy)
    assert json.loads((copy / "policy.json").read_text())["manifest"] == MANIFEST


def test_constant_action_dims_still_load(copy):
    # A dimension the data never moves: the tokenizer widens high == low; that is not a swap.
    def constant(t):
        t["tokenizer"]["low"][4] = t["tokenizer"]["high"][4] = 0.5
    _edit_json(copy, "action_stats.json", constant)
    write_manifest(copy)
    r = _load_strict(copy)
    r.reset(INSTR)
    assert r.step(_obs())[4] == pytest.approx(0.5, abs=1e-5)


# ---- non-finite weights ---------------------------------------------------------------------------------
def test_nan_weights_are_refused_at_save_and_by_the_check(policy_dir, tmp_path):
    lp = load_policy_dir(policy_dir)
    stats = json.loads((policy_dir / "action_stats.json").read_text())["dataset_stats"]
    args = (lp.cfg, lp.model, policy_dir / "tokenizer.model", lp.action_tokenizer, stats, lp.spec)
    load_policy_dir(save_policy_dir(tmp_path / "resaved", *args))  # the round trip loads
    with torch.no_grad():
        lp.model.head.bias[0, :3] = float("nan")
        lp.model.head.weight[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to save a policy: expected finite weights, got NaN "
                                                    r"or inf in 2 tensors: ") as exc:
        save_policy_dir(tmp_path / "bad", *args)
    assert "head.bias (3 NaN)" in str(exc.value) and "head.weight (1 inf)" in str(exc.value)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(NonFiniteWeightsError, match=r"^trainer: expected finite weights.*head.bias \(3 NaN\)"):
        check_finite_state_dict(lp.model.state_dict(), "trainer")
    check_finite_state_dict({"n": torch.tensor([1, 2])}, "ints are skipped")


# ---- non-finite outputs at step -------------------------------------------------------------------------
def _poison(runner, value=float("nan")):
    with torch.no_grad():
        runner.model.head.bias.fill_(value)


def test_nan_output_at_step_raises_naming_outputs_and_cause(policy_dir):
    r = PolicyRunner.load(policy_dir)
    _poison(r)
    r.reset(INSTR)
    with pytest.raises(NonFiniteActionError) as exc:
        r.step(_obs())
    msg = str(exc.value)
    for n in ["the robot: NaN in 5 of 5 action entries", "world_vector_x", "terminate_episode",
              "from non-finite logits", "weights hold NaN or inf: head.bias (1280 NaN)", "reset"]:
        assert n in msg, (n, msg)
    with pytest.raises(RuntimeError, match="before reset"):  # the episode ended with the bad step
        r.step(_obs())
    r.reset_batch([INSTR, INSTR])
    with pytest.raises(NonFiniteActionError, match="robot 0: NaN.*; robot 1: NaN"):
        r.step_batch([_obs(1), _obs(2)])
    r.reset(INSTR)
    with pytest.raises(NonFiniteActionError):
        r.step_named(_obs())


def test_argmax_policy_with_nan_logits_raises_too(tmp_path):
    # argmax over NaN logits picks a bin and decodes to a finite, meaningless action: the logits count.
    r = PolicyRunner.load(build_random_policy(tmp_path / "argmax", overrides=["model.action_decoding=argmax"]))
    with torch.no_grad():
        r.model.head.bias[2, 7] = float("nan")
    r.reset(INSTR)
    with pytest.raises(NonFiniteActionError, match=r"NaN in 1 of 5 action entries \(world_vector_z\)"):
        r.step(_obs())


def test_overflow_with_finite_weights_is_named_as_such(policy_dir):
    r = PolicyRunner.load(policy_dir)
    with torch.no_grad():
        r.model.head.weight.fill_(3e38)  # finite, but the head's sums overflow
    r.reset(INSTR)
    with pytest.raises(NonFiniteActionError, match="the weights are finite: activations overflowed"):
        r.step(_obs())


def test_step_group_hands_the_error_to_the_bad_runner_only(policy_dir):
    good, bad = PolicyRunner.load(policy_dir), PolicyRunner.load(policy_dir)
    _poison(bad, float("inf"))
    group = [good, good.fork(), bad, bad.fork()]  # two batched groups: one per policy
    for g in group:
        g.reset(INSTR)
    out = PolicyRunner.step_group(group, [_obs(i) for i in range(4)])
    assert all(isinstance(a, np.ndarray) and np.all(np.isfinite(a)) for a in out[:2])
    assert all(isinstance(e, NonFiniteActionError) and "inf" in str(e) and "head.bias" in str(e) for e in out[2:])
    assert [g.steps for g in group] == [1, 1, 0, 0] and bad.instruction is None  # episodes over
    solo = bad.fork()
    solo.reset(INSTR)
    assert isinstance(PolicyRunner.step_group([solo], [_obs()])[0], NonFiniteActionError)  # the one-runner path


def test_save_refuses_what_load_would_refuse(policy_dir, tmp_path):
    from policy.action_tokenizer import ActionTokenizer
    from policy.policy_dir import InputSpec

    lp = load_policy_dir(policy_dir)
    tok = lp.action_tokenizer
    args = (lp.cfg, lp.model, policy_dir / "tokenizer.model")
    with pytest.raises(PolicyDirError, match=r"refusing to save a policy: action tokenizer bins: expected 256 .*got 2"):
        save_policy_dir(tmp_path / "bins", *args, ActionTokenizer(tok.low, tok.high, 2, tok.names), {}, lp.spec)
    small = InputSpec(**{**lp.spec.__dict__, "image_shape": (32, 64, 3)})
    with pytest.raises(PolicyDirError, match=r"image_shape: expected frames of at least 64x64 .*got \[32, 64, 3\]"):
        save_policy_dir(tmp_path / "small", *args, tok, {}, small)
    assert not (tmp_path / "bins").exists() and not (tmp_path / "small").exists()
