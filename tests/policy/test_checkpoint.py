"""Checkpoint writing (policy/checkpoint.py) under interruption, without training: a dummy policy
writer and a tiny state stand in for the trainer's."""
import json
import os
import random
import shutil

import pytest
import torch

from policy import checkpoint as ckpt


def _writer(text):
    def write(p):
        p.mkdir()
        (p / "weights").write_text(text)
    return write


def _save(run, step, text, keep=3):
    return ckpt.save_checkpoint(run, step, {"step": step, "x": torch.ones(2)}, _writer(text), keep)


def _hidden(run):
    return sorted(p.name for p in ckpt.checkpoints_dir(run).iterdir() if p.name.startswith("."))


def test_resave_interrupted_between_renames_keeps_the_previous_step(tmp_path, monkeypatch):
    final = _save(tmp_path, 5, "v1")
    real = os.replace

    def interrupted(src, dst):
        if ".tmp-step-" in str(src):  # staging -> step-N, after step-N was moved aside
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 5, "v2")
    monkeypatch.undo()
    assert (final / "policy" / "weights").read_text() == "v1"
    assert ckpt.load_train_state(final)["step"] == 5 and _hidden(tmp_path) == []


def test_leftovers_of_a_killed_save_are_restored_or_removed(tmp_path):
    final = _save(tmp_path, 5, "v1")
    root = ckpt.checkpoints_dir(tmp_path)
    # SIGKILL between the renames of a re-save: step-5 set aside, a staging dir beside it.
    final.rename(root / ".old-step-00000005-0badf00d")
    (root / ".tmp-step-00000005-0badf00d").mkdir()
    ckpt.remove_stale_staging(tmp_path)  # what --resume runs first
    assert ckpt.latest_checkpoint(tmp_path) == final and _hidden(tmp_path) == []
    assert (final / "policy" / "weights").read_text() == "v1"
    (root / ".old-step-00000005-1badf00d").mkdir()  # killed while deleting it: step-5 is whole
    _save(tmp_path, 6, "v2")  # the next save clears it
    assert _hidden(tmp_path) == [] and (final / "policy" / "weights").read_text() == "v1"


def test_a_pruned_checkpoint_never_looks_complete(tmp_path, monkeypatch):
    _save(tmp_path, 1, "a", keep=1)
    real = shutil.rmtree

    def killed(path, *a, **k):
        if ".tmp-" not in str(path):
            raise KeyboardInterrupt  # killed before deleting anything
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, "b", keep=1)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    ckpt.remove_stale_staging(tmp_path)
    assert _hidden(tmp_path) == []


def test_checkpoint_and_run_meta_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    _save(tmp_path, 3, "v1")
    root = str(ckpt.checkpoints_dir(tmp_path))
    assert any(p.endswith(ckpt.STATE_FILE) for p in synced)
    assert any(os.path.basename(p).startswith(".tmp-step-00000003") for p in synced)  # the dir's entries
    assert synced[-1] == root  # step-3's new name is durable
    synced.clear()
    ckpt.write_run_meta(tmp_path, {"a": 1})
    monkeypatch.undo()
    assert synced[-1] == str(tmp_path) and len(synced) == 2  # the file's data, then its name
    assert json.loads((tmp_path / ckpt.RUN_FILE).read_text()) == {"a": 1}


# ---- corrupt train_state.pt ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage, cause", [
    (lambda f: f.write_bytes(random.Random(0).randbytes(4096)), "corrupt: expected the training state saved by "
                                                                 "`train`, not a torch checkpoint (4096 bytes"),
    (lambda f: f.write_bytes(b"not a checkpoint at all\n" * 10), "not a torch checkpoint"),
    (lambda f: f.write_bytes(b""), "corrupt: expected the training state, got an empty file"),
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "corrupt: expected the training state saved "
                                                                       "by `train`, truncated or damaged"),
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "truncated or damaged"),
    (lambda f: f.unlink(), "expected the training state, found no file"),
])
def test_a_damaged_train_state_names_the_file_and_the_previous_checkpoint(tmp_path, damage, cause):
    first, second = _save(tmp_path, 1, "a"), _save(tmp_path, 2, "b")
    for ckpt_dir, previous in ((second, f"the previous checkpoint is {str(first)!r}: move {str(second)!r} out"),
                               (first, "there is no earlier checkpoint to resume from")):
        damage(ckpt_dir / ckpt.STATE_FILE)
        with pytest.raises(ckpt.CheckpointError) as exc:
            ckpt.load_train_state(ckpt_dir)
        msg = str(exc.value)
        for n in (repr(str(ckpt_dir / ckpt.STATE_FILE)), cause, previous):
            assert n in msg, (n, msg)
        assert "weights_only" not in msg  # torch's advice to unpickle an untrusted file is not passed on


def test_a_train_state_that_is_not_a_dict_is_refused(tmp_path):
    final = _save(tmp_path, 1, "a")
    torch.save([1, 2], final / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="corrupt: expected the training state as a dict, got list"):
        ckpt.load_train_state(final)
