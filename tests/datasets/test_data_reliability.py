"""Reliability of the data layer (issue 19), on real RLDS files: content-keyed scan caches, corrupt shards
named by file, YAML alias bombs refused, a full disk during collection named with nothing left behind."""
import json
import os
import shutil
import struct
import time
from dataclasses import replace

import numpy as np
import pytest

from datasets.rlds_dataset import RLDSDataset
from datasets.rlds_writer import DATASET_NAME, AtomicRLDSWriter, DiskFullError, write_episodes
from datasets.source import CorruptDatasetError
from datasets.standardize import StandardizationError, load_registry
from tests.helpers import ACT_SPEC, OBS_SPEC, ROOT, write_dataset

SIDECAR = {"env": "tabletop", "action_names": list("abcde")}


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTM_POLICY_CACHE", str(tmp_path / "cache"))


def _shards(path):
    return sorted(path.glob("*.tfrecord*"))


def _sizes(path):
    return [p.stat().st_size for p in _shards(path)]


def _rewrite_with_other_actions(path, eps):
    """The same episodes (same images, so the same shard names, sizes and counts) with other actions, copied
    over the files at `path` (as `cp -r new/* path/` would; a scan cache beside them stays): only the files'
    mtimes and bytes tell the two datasets apart."""
    halved = [replace(e, actions=[np.float32(0.5) * a for a in e.actions]) for e in eps]
    new = write_episodes(path.parent / "new", halved, OBS_SPEC, ACT_SPEC, SIDECAR, episodes_per_shard=2)
    for f in new.iterdir():
        shutil.copyfile(f, path / f.name)
    shutil.rmtree(new)
    return np.concatenate([np.stack(e.actions) for e in halved])


def _flip_payload_bytes(shard, keep_mtime=False):
    """Flip 8 bytes in the middle of the last record's payload; the size (and the record headers, which
    opening checks) stay as they were."""
    data = bytearray(shard.read_bytes())
    pos, last = 0, None
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        last = (pos + 12, length)
        pos += 12 + length + 4
    mid = last[0] + last[1] // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    st = shard.stat()
    shard.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: the bytes change, the file's size and mtime do not
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- 1. a scan cache is keyed on the content it summarises ----------------------------------------------
def test_a_dataset_replaced_at_the_same_path_is_rescanned(tmp_path):
    path, eps = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    first = RLDSDataset(path)
    old_max = first.scan()["action_stats"]["max"]
    (cache,) = path.glob("scan-train-*.json")  # written beside the (writable) dataset
    sizes = _sizes(path)

    acts = _rewrite_with_other_actions(path, eps)
    assert _sizes(path) == sizes  # same names, sizes and episode count: only the content differs
    again = RLDSDataset(path)
    scan = again.scan()
    np.testing.assert_allclose(scan["action_stats"]["max"], acts.max(0), rtol=1e-6)
    assert not np.allclose(scan["action_stats"]["max"], old_max)
    assert again.scan_source.startswith("scan computed now (the scan cache") and "was stale" in again.scan_source
    assert list(path.glob("scan-train-*.json")) == [cache]  # rebuilt in place, not a second file
    third = RLDSDataset(path)
    assert third.scan()["action_stats"] == scan["action_stats"] and third.scan_source.startswith("scan cache")


def test_a_read_only_dataset_replaced_at_the_same_path_is_rescanned(tmp_path):
    path, eps = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    try:
        path.chmod(0o555)  # read-only: the scan is cached in the user cache ($TTM_POLICY_CACHE)
        RLDSDataset(path).scan()
        assert not list(path.glob("scan-*.json"))
        (cache,) = (tmp_path / "cache").glob("*/scan-train-*.json")
        path.chmod(0o755)  # replaced by its owner, then read-only again
        acts = _rewrite_with_other_actions(path, eps)
        path.chmod(0o555)
        ds = RLDSDataset(path)
        np.testing.assert_allclose(ds.scan()["action_stats"]["max"], acts.max(0), rtol=1e-6)
        assert "was stale" in ds.scan_source and not list(path.glob("scan-*.json"))
        assert json.loads(cache.read_text())["scan"]["action_stats"] == ds.scan()["action_stats"]  # rewritten
    finally:
        path.chmod(0o755)


def test_an_old_format_cache_is_not_trusted(tmp_path):
    path, _ = write_dataset(tmp_path / "ds", [3, 4], ["touch the red block"])
    ds = RLDSDataset(path)
    good = ds.scan()
    (cache,) = path.glob("scan-train-*.json")
    bogus = dict(good, action_stats={**good["action_stats"], "max": [9.0] * 5})
    cache.write_text(json.dumps(bogus))  # format 1: a bare scan, keyed by path and episode count only
    again = RLDSDataset(path)
    assert again.scan()["action_stats"]["max"] == good["action_stats"]["max"]
    assert "older format" in again.scan_source


# -- 2. a corrupt shard names its file ---------------------------------------------------------------
@pytest.mark.parametrize("cached_before", [False, True])
def test_a_corrupt_shard_is_named_by_the_scan(tmp_path, cached_before):
    path, _ = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    if cached_before:
        RLDSDataset(path).scan()
        assert list(path.glob("scan-train-*.json"))
    victim = _shards(path)[-1]
    size = victim.stat().st_size
    _flip_payload_bytes(victim)
    assert victim.stat().st_size == size
    ds = RLDSDataset(path)  # opening checks record headers and the first episode (another shard): fine
    with pytest.raises(CorruptDatasetError, match=rf"dataset '{path}': shard file '{victim.name}' is corrupt: "
                                                  r"corrupted record at \d+ \(record 2 of 2\): a TFRecord checksum"):
        ds.scan()


def test_a_corrupt_first_episode_is_named_at_open(tmp_path):
    path, _ = write_dataset(tmp_path / "ds", [3], ["touch the red block"])
    (victim,) = _shards(path)
    _flip_payload_bytes(victim)
    with pytest.raises(CorruptDatasetError, match=rf"shard file '{victim.name}' is corrupt"):
        RLDSDataset(path)


def test_inspect_data_on_a_corrupt_shard_fails_naming_it_despite_an_old_cache(tmp_path, capsys):
    import run_policy

    path, _ = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    assert run_policy.main(["inspect-data", str(path)]) == 0  # the scan is cached
    victim = _shards(path)[-1]
    _flip_payload_bytes(victim)
    capsys.readouterr()
    assert run_policy.main(["inspect-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"shard file '{victim.name}' is corrupt" in err and "Traceback" not in err


def test_a_corrupt_shard_met_while_training_is_named(tmp_path):
    from policy.config import load_config
    from datasets.training_inputs import open_training_inputs

    path, _ = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    RLDSDataset(path).scan()
    victim = _shards(path)[-1]
    _flip_payload_bytes(victim, keep_mtime=True)  # the cache still matches: only reading the bytes can tell
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        "model.image.image_size=16", "train.batch_size=2", "data.sequence=window", "data.sequence_length=1",
        "model.controller.memory_horizon=1"])
    inputs = open_training_inputs(cfg, path, repeat=False)
    assert inputs.dataset.scan_source.startswith("scan cache")
    with pytest.raises(CorruptDatasetError, match=rf"dataset '{path}': shard file '{victim.name}' is corrupt"):
        for _ in inputs.batches():
            pass


# -- 3. YAML alias bombs -------------------------------------------------------------------------------
def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"my_robot: {{cameras: *a{levels - 1}, instruction: x}}"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_up_front(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb(9))  # 9**9 strings once expanded
    assert len(f.read_bytes()) < 600
    start = time.perf_counter()
    with pytest.raises(StandardizationError, match=rf"data.standardization '{f}': expected at most \d+ YAML nodes "
                                                   r"once aliases are expanded, got \d+") as err:
        load_registry(str(f))
    assert len(str(err.value)) < 300 and time.perf_counter() - start < 30  # generous: a bound, not a benchmark
    f.write_text("a: &a [1, *a]\n")
    with pytest.raises(StandardizationError, match="YAML alias that refers to its own anchor"):
        load_registry(str(f))


def test_error_messages_quote_bounded_reprs(tmp_path):
    f = tmp_path / "entries.yaml"
    f.write_text(_alias_bomb(4))  # 9**4 strings: allowed, but the wrong type for cameras
    with pytest.raises(StandardizationError, match=r"entry 'a0', key '<entry>': expected a mapping") as err:
        load_registry(str(f))
    assert len(str(err.value)) < 600
    f.write_text("my_robot:\n  cameras: [" + ", ".join(["1"] * 50_000) + "]\n  instruction: x\n")
    with pytest.raises(StandardizationError, match=r"entry 'my_robot', key 'cameras': expected a non-empty list "
                                                   r"of strings, got \[1, 1, .*\.\.\.") as err:
        load_registry(str(f))
    assert len(str(err.value)) < 400
    anchors_ok = tmp_path / "anchors.yaml"  # aliases themselves are fine in a small file
    anchors_ok.write_text("r1: &r {cameras: [observation/image], instruction: observation/instruction}\nr2: *r\n")
    assert load_registry(str(anchors_ok))["r2"].cameras == ("observation/image",)


# -- 4. a full disk while writing ----------------------------------------------------------------------
def _episodes(n, seed=0):
    from tests.helpers import make_episode

    rng = np.random.default_rng(seed)
    return [make_episode(rng, 3, "touch the red block", i) for i in range(n)]


def test_a_full_disk_while_writing_shards_is_named_and_leaves_nothing(tmp_path):
    # The first shard's path in the staging directory points at /dev/full: TensorFlow's TFRecordWriter gets
    # ENOSPC from the kernel, as on a full disk, and raises its ResourceExhaustedError.
    out = tmp_path / "ds"
    writer = AtomicRLDSWriter(out, OBS_SPEC, ACT_SPEC, SIDECAR, episodes_per_shard=1)
    (writer.staging / f"{DATASET_NAME}-train.tfrecord-00000").symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=rf"--out '{out}': the disk is full: .*No space left on device.*"
                                            r"the partial dataset was removed") as err:
        for ep in _episodes(3):
            writer.add(ep)
        writer.commit()
    assert err.value.errno == 28 and isinstance(err.value, OSError)  # run_policy prints OSErrors as `error: ...`
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # no dataset, no staging


def test_a_full_disk_at_commit_keeps_the_old_dataset_under_overwrite(tmp_path):
    out = tmp_path / "ds"
    write_episodes(out, _episodes(2), OBS_SPEC, ACT_SPEC, SIDECAR)
    writer = AtomicRLDSWriter(out, OBS_SPEC, ACT_SPEC, SIDECAR, overwrite=True)
    for ep in _episodes(3, seed=1):
        writer.add(ep)
    (writer.staging / "policy_stack.json").symlink_to("/dev/full")  # Python's own write: OSError(ENOSPC)
    with pytest.raises(DiskFullError, match=r"the disk is full.*the dataset already at --out is untouched"):
        writer.commit()
    assert RLDSDataset(out).num_episodes == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["ds"]  # no staging left


def test_collect_onto_a_full_disk_is_named(tmp_path, monkeypatch):
    from datasets.collect import collect
    from datasets.tf_setup import tf

    real = tf.io.TFRecordWriter
    monkeypatch.setattr(tf.io, "TFRecordWriter", lambda path, *a, **k: real("/dev/full", *a, **k))
    out = tmp_path / "demos"
    with pytest.raises(DiskFullError, match=rf"--out '{out}': the disk is full"):
        collect("tabletop", ["reach"], 2, out, image_size=32, workers=1, progress=False, episodes_per_shard=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []
