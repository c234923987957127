"""The step API on untrained policy directories (no training needed): batch vs single steps, dict
actions, observation validation, version checks, instruction embeddings, memory attention."""
import json
import shutil

import numpy as np
import pytest
import torch

from policy.action_tokenizer import RT1_FRACTAL_FIELDS
from policy.policy_dir import PolicyDirError
from policy.runner import ObservationError, PolicyRunner
from rollout.random_policy import build_random_policy

INSTR = ["pick up the red block", "push the blue block to the left", "move the gripper to the green block"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("pol") / "policy", seed=1)


def _obs(rng, shape=(64, 64, 3)):
    return {"image": rng.integers(0, 256, shape, dtype=np.uint8), "state": rng.normal(size=4).astype(np.float32),
            "instruction": np.array("ignored", dtype=object)}


def test_batch_step_equals_single_steps(policy_dir):
    rng = np.random.default_rng(0)
    episodes = [[_obs(rng) for _ in range(4)] for _ in INSTR]
    batch = PolicyRunner.load(policy_dir)
    batch.reset_batch(INSTR)
    got = np.stack([batch.step_batch([ep[t] for ep in episodes]) for t in range(4)], axis=1)  # [B,T,A]
    for b, (text, ep) in enumerate(zip(INSTR, episodes)):
        single = batch.fork()
        single.reset(text)
        want = np.stack([single.step(o) for o in ep])
        np.testing.assert_allclose(got[b], want, atol=1e-4)
    assert got.shape == (3, 4, 5) and batch.steps == 4
    with pytest.raises(RuntimeError, match="step_batch"):
        batch.step(episodes[0][0])
    with pytest.raises(ObservationError, match="list of 3 observations"):
        batch.step_batch(episodes[0][:2])


def test_forked_runners_keep_their_own_memory(tmp_path):
    # A full-episode TTM: the memory carries state, so sharing it between runners would show.
    pdir = build_random_policy(tmp_path / "ttm", overrides=["model.controller.memory_horizon=0",
                                                             "data.sequence=episode", "data.sequence_length=60"])
    rng = np.random.default_rng(1)
    a, b = PolicyRunner.load(pdir), None
    b = a.fork()
    obs = [_obs(rng) for _ in range(3)]
    a.reset(INSTR[0])
    alone = [a.step(o) for o in obs]
    a.reset(INSTR[0])
    b.reset(INSTR[1])
    mixed = []
    for o in obs:
        mixed.append(a.step(o))
        b.step(_obs(rng))
    np.testing.assert_allclose(np.stack(alone), np.stack(mixed), atol=1e-6)
    # Recording the memory's weights on a whole-episode TTM (the controller's own step path).
    rec = a.fork(record_attention=True)
    rec.reset(INSTR[0])
    np.testing.assert_allclose(np.stack([rec.step(o) for o in obs]), np.stack(alone), atol=1e-6)
    assert len(rec.attention) == 3 and rec.attention[2]["write"].shape[1] == rec.policy.cfg.model.controller.memory_tokens


def test_named_actions_follow_action_names(policy_dir):
    r = PolicyRunner.load(policy_dir)
    r.reset(INSTR[0])
    named = r.step_named(_obs(np.random.default_rng(2)))
    assert list(named) == list(r.action_names) == ["world_vector_x", "world_vector_y", "world_vector_z",
                                                   "gripper_closedness", "terminate_episode"]
    assert all(isinstance(v, float) and np.isfinite(v) for v in named.values())


def test_dict_action_policy_decodes_to_the_right_flat_vector(tmp_path):
    pdir = build_random_policy(tmp_path / "oxe", action_fields=RT1_FRACTAL_FIELDS,
                               overrides=["model.action_decoding=argmax"])
    r = PolicyRunner.load(pdir)
    tok = r.policy.action_tokenizer
    obs = _obs(np.random.default_rng(3))
    r.reset(INSTR[0])
    flat = r.step(obs)
    # Independently: the model's argmax tokens, decoded field by field.
    ref = r.fork()
    ref.reset(INSTR[0])
    with torch.inference_mode():
        logits, _ = ref.model.step(torch.from_numpy(obs["image"])[None], ref._context,
                                   torch.from_numpy(obs["state"])[None], ref.model.init_state(1))
    tokens = logits[0].argmax(-1).numpy()
    assert flat.shape == (11,) and r.action_names == tok.names
    col = 0
    for f in RT1_FRACTAL_FIELDS:
        if f.discrete:
            want = tokens[col] if tokens[col] < f.size else 0  # RT-1: out-of-range class -> 0
            assert flat[col] == want
            col += 1
        else:
            lo = np.broadcast_to(np.asarray(f.low, np.float64), (f.size,))
            hi = np.broadcast_to(np.asarray(f.high, np.float64), (f.size,))
            want = lo + tokens[col:col + f.size] / (tok.bins - 1) * (hi - lo)
            np.testing.assert_allclose(flat[col:col + f.size], want, atol=1e-5)
            col += f.size
    named = r.named(flat)
    assert list(named) == [f.name for f in RT1_FRACTAL_FIELDS]
    assert named["terminate_episode"].tolist().count(1) == 1 and named["terminate_episode"].shape == (3,)
    np.testing.assert_allclose(named["world_vector"], flat[1:4])


@pytest.mark.parametrize("change, needles", [
    (lambda o: o.pop("image"), ["observation['image']", "missing", "(64, 64, 3)", "got keys ['instruction', 'state']"]),
    (lambda o: o.update(image=np.zeros((48, 64, 3), np.uint8)), ["observation['image']", "(64, 64, 3)", "(48, 64, 3)"]),
    (lambda o: o.update(image=np.zeros((64, 64, 3), np.float32)), ["observation['image']", "uint8", "float32"]),
    (lambda o: o.update(image=np.zeros((64, 64), np.uint8)), ["observation['image']", "(64, 64, 3)", "(64, 64)"]),
    (lambda o: o.pop("state"), ["observation['state']", "missing", "(4,)"]),
    (lambda o: o.update(state=np.zeros(7, np.float32)), ["observation['state']", "(4,)", "(7,)"]),
    (lambda o: o.update(state=np.array([0, np.nan, 0, 0], np.float32)), ["observation['state']", "finite", "nan"]),
    (lambda o: o.update(state=np.array(["a", "b", "c", "d"])), ["observation['state']", "float", "<U1"]),
])
def test_bad_observation_names_key_expected_and_received(policy_dir, change, needles):
    r = PolicyRunner.load(policy_dir)
    r.reset(INSTR[0])
    obs = _obs(np.random.default_rng(4))
    change(obs)
    with pytest.raises(ObservationError) as exc:
        r.step(obs)
    for n in needles:
        assert n in str(exc.value), (n, str(exc.value))


def test_step_before_reset_and_bad_instruction(policy_dir):
    r = PolicyRunner.load(policy_dir)
    with pytest.raises(RuntimeError, match="reset"):
        r.step(_obs(np.random.default_rng(5)))
    with pytest.raises(ObservationError, match="instruction"):
        r.reset("  ")
    with pytest.raises(ObservationError, match="embedding"):
        r.reset(INSTR[0], np.zeros(512))  # a sentencepiece policy takes no embedding


def test_incompatible_policy_dir_is_refused_clearly(policy_dir, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(policy_dir, newer)
    meta = json.loads((newer / "policy.json").read_text())
    meta["format_version"] = 99
    (newer / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyDirError, match=r"format_version: expected 1, got 99.*incompatible"):
        PolicyRunner.load(newer)
    other = tmp_path / "other"
    shutil.copytree(policy_dir, other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text() + "future_section: {x: 1}\n")
    with pytest.raises(PolicyDirError, match="incompatible policy directory.*future_section"):
        PolicyRunner.load(other)


def test_embedding_policy_takes_a_512d_embedding(tmp_path):
    pdir = build_random_policy(tmp_path / "emb", overrides=["model.language.source=embedding"])
    r = PolicyRunner.load(pdir)
    with pytest.raises(ObservationError, match=r"embedding: expected 1 float arrays of shape \(512,\).*got None"):
        r.reset(INSTR[0])
    with pytest.raises(ObservationError, match=r"shape \(300,\)"):
        r.reset(INSTR[0], np.zeros(300))
    emb = np.random.default_rng(6).normal(size=512).astype(np.float32)
    r.reset(INSTR[0], emb)
    a1 = r.step(_obs(np.random.default_rng(7)))
    r.reset(INSTR[0], -emb)
    a2 = r.step(_obs(np.random.default_rng(7)))
    assert a1.shape == (5,) and not np.allclose(a1, a2)  # the embedding conditions the policy


def test_record_attention_gives_ttm_read_and_write_weights(policy_dir, tmp_path):
    r = PolicyRunner.load(policy_dir, record_attention=True)
    plain = r.fork(record_attention=False)
    rng = np.random.default_rng(8)
    obs = [_obs(rng) for _ in range(3)]
    r.reset(INSTR[0])
    plain.reset(INSTR[0])
    for o in obs:
        np.testing.assert_allclose(r.step(o), plain.step(o), atol=1e-6)  # recording changes nothing
    c = r.policy.cfg.model.controller
    n = r.model.num_input_tokens
    assert len(r.attention) == 3
    read, write = r.attention[0]["read"], r.attention[0]["write"]
    assert read.shape == (1, c.read_tokens, c.memory_tokens + n)
    assert write.shape == (1, c.memory_tokens, c.memory_tokens + n + c.read_tokens)
    np.testing.assert_allclose(read.sum(-1), 1.0, atol=1e-5)  # TokenLearner: softmax over the sources
    np.testing.assert_allclose(write.sum(-1), 1.0, atol=1e-5)
    rt1 = build_random_policy(tmp_path / "rt1", overrides=["model.controller.type=rt1"])
    with pytest.raises(ValueError, match="record_attention: expected a TTM policy.*'rt1'"):
        PolicyRunner.load(rt1, record_attention=True)


def test_step_group_batches_runners_and_keeps_their_states(policy_dir):
    base = PolicyRunner.load(policy_dir)
    rng = np.random.default_rng(9)
    group = [base.fork() for _ in INSTR]
    alone = [base.fork() for _ in INSTR]
    for g, a, text in zip(group, alone, INSTR):
        g.reset(text)
        a.reset(text)
    not_reset = base.fork()
    for t in range(3):
        obs = [_obs(rng) for _ in INSTR]
        bad = _obs(rng, shape=(32, 64, 3))
        got = PolicyRunner.step_group(group + [not_reset, group[0].fork()], obs + [obs[0], bad])
        assert isinstance(got[3], RuntimeError) and "reset" in str(got[3])
        assert isinstance(got[4], RuntimeError)  # a fork starts un-reset
        for g, a, o, act in zip(group, alone, obs, got):
            np.testing.assert_allclose(act, a.step(o), atol=1e-4)
            assert g.steps == t + 1
    bad_obs = PolicyRunner.step_group(group[:1], [_obs(rng, shape=(32, 64, 3))])[0]
    assert isinstance(bad_obs, ObservationError) and "(32, 64, 3)" in str(bad_obs)


# ---- corrupt or inconsistent policy directories ---------------------------------------------------
def _truncate(name, keep=30):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:keep])


def _set_input(field, value):
    def change(d):
        meta = json.loads((d / "policy.json").read_text())
        meta["input"][field] = value
        (d / "policy.json").write_text(json.dumps(meta))
    return change


@pytest.mark.parametrize("corrupt, needles", [
    (_truncate("policy.json"), ["policy.json", "expected the format version", "JSONDecodeError"]),
    (lambda d: (d / "policy.json").write_text("[]"), ["policy.json", "JSON object", "got a JSON list"]),
    (_truncate("action_stats.json"), ["action_stats.json", "action tokenizer", "JSONDecodeError"]),
    (lambda d: (d / "config.yaml").write_text("model: [\n  a: b"), ["config.yaml", "YAML", "ParserError"]),
    (lambda d: (d / "config.yaml").write_text("- 1\n- 2\n"), ["config.yaml", "mapping", "got a list"]),
    (_truncate("model.safetensors", 1000), ["model.safetensors", "safetensors format", "deserializing header"]),
    (lambda d: (d / "model.safetensors").write_bytes(b""), ["model.safetensors", "safetensors format", "header"]),
    (lambda d: (d / "tokenizer.model").write_bytes(b""), ["tokenizer.model", "sentencepiece", "unk is not defined"]),
])
def test_corrupt_file_is_named_with_expected_and_cause(policy_dir, tmp_path, corrupt, needles):
    broken = tmp_path / "broken"
    shutil.copytree(policy_dir, broken)
    corrupt(broken)
    with pytest.raises(PolicyDirError) as exc:
        PolicyRunner.load(broken)
    msg = str(exc.value)
    for n in [repr(str(broken))] + needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("change, needles", [
    (_set_input("image_shape", [64, 64]), ["input.image_shape", "[H, W, 3]", "got [64, 64]"]),
    (_set_input("image_shape", "64"), ["input.image_shape", "[H, W, 3]", "got '64'"]),
    (_set_input("image_shape", [64, 64, 4]), ["input.image_shape", "got [64, 64, 4]"]),
    (_set_input("image_shape", [0, 64, 3]), ["input.image_shape", "positive", "got [0, 64, 3]"]),
    (_set_input("camera_key", ""), ["input.camera_key", "non-empty string", "got ''"]),
    (_set_input("camera_key", 3), ["input.camera_key", "got 3"]),
    (_set_input("action_dim", 99), ["input.action_dim", "expected 5", "action_stats.json", "got 99"]),
    (_set_input("action_dim", "5"), ["input.action_dim", "integer", "got '5'"]),
    (_set_input("proprio_dim", 7), ["input.proprio_dim", "expected 4", "model.safetensors", "got 7"]),
    (_set_input("proprio_dim", -1), ["input.proprio_dim", ">= 0", "got -1"]),
    (_set_input("proprio_key", None), ["input.proprio_dim", "expected 0", "proprio_key is null", "got 4"]),
    (lambda d: (_set_input("proprio_key", None)(d), _set_input("proprio_dim", 0)(d)),
     ["input.proprio_key", "model.use_proprio is true", "got null"]),
    (lambda d: (d / "policy.json").write_text(json.dumps({"format_version": 1})), ["policy.json input:", "got nothing"]),
])
def test_input_spec_is_validated_at_load(policy_dir, tmp_path, change, needles):
    bad = tmp_path / "bad"
    shutil.copytree(policy_dir, bad)
    change(bad)
    with pytest.raises(PolicyDirError) as exc:
        PolicyRunner.load(bad)
    msg = str(exc.value)
    for n in [repr(str(bad)), "policy.json"] + needles:
        assert n in msg, (n, msg)
    assert "config.yaml" not in msg.split("(")[0]  # a policy.json mistake is not blamed on the config


def test_policy_without_proprio_writes_proprio_dim_zero(tmp_path):
    r = PolicyRunner.load(build_random_policy(tmp_path / "np", overrides=["model.use_proprio=false"]))
    assert r.spec.proprio_key is None and r.spec.proprio_dim == 0


# ---- saving: interrupted swaps, fsync -------------------------------------------------------------
def _save_again(out, seed):
    return build_random_policy(out, seed=seed)  # goes through save_policy_dir like `train`


def _weights(d):
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def test_save_interrupted_between_renames_keeps_the_previous_policy(tmp_path, monkeypatch):
    import os

    out = tmp_path / "policy"
    _save_again(out, seed=1)
    before = _weights(out)
    real = os.replace

    def interrupted(src, dst):
        if ".policy.tmp-" in str(src):  # staging -> out: the second rename
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save_again(out, seed=2)
    monkeypatch.undo()
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert all(torch.equal(before[k], v) for k, v in _weights(out).items())
    PolicyRunner.load(out)


def test_leftovers_of_a_killed_save_are_restored_and_removed(tmp_path):
    out = tmp_path / "policy"
    _save_again(out, seed=1)
    before = _weights(out)
    # As SIGKILL between the two renames leaves it: out moved aside, a staging dir beside it.
    (out).rename(tmp_path / ".policy.old-0badf00d")
    (tmp_path / ".policy.tmp-0badf00d").mkdir()
    (tmp_path / ".policy.tmp-0badf00d" / "config.yaml").write_text("half")
    r = PolicyRunner.load(out)  # loading puts the previous policy back
    assert all(torch.equal(before[k], v) for k, v in r.model.state_dict().items() if k in before)
    assert out.is_dir() and not (tmp_path / ".policy.old-0badf00d").exists()
    (tmp_path / ".policy.old-1badf00d").mkdir()  # e.g. killed while deleting the previous policy
    _save_again(out, seed=2)  # the next save removes whatever is left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert not all(torch.equal(before[k], v) for k, v in _weights(out).items())


def test_missing_policy_with_an_unrestorable_old_copy_is_named(tmp_path, monkeypatch):
    import os

    out = tmp_path / "policy"
    _save_again(out, seed=1)
    out.rename(tmp_path / ".policy.old-0badf00d")
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    with pytest.raises(PolicyDirError, match=r"interrupted save left the previous one at .*\.policy\.old-0badf00d"):
        PolicyRunner.load(out)


def test_save_fsyncs_the_files_and_the_parent_after_the_rename(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    out = _save_again(tmp_path / "policy", seed=1)
    monkeypatch.undo()
    from policy.policy_dir import FILES

    assert set(FILES) <= {os.path.basename(p) for p in synced}, synced
    assert synced[-1] == str(tmp_path), synced  # the new name is durable, not just the data
