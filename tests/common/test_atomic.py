"""common.atomic: every file the project writes goes through it, so its promises are tested here."""
from __future__ import annotations

import errno
import json
import os

import pytest

from common import atomic


def test_a_write_replaces_the_file_whole_and_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "out.json"
    path.write_text("old")
    atomic.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert len(synced) >= 2  # the file, then its directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_an_interrupted_writer_leaves_the_old_content_and_no_temp_file(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic.atomic_output(path, suffix=".png") as tmp:
            assert tmp.parent == path.parent and tmp.name.endswith(".png") and tmp.name.startswith(".")
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_json_writes_make_missing_parents_and_copies_are_atomic(tmp_path):
    out = atomic.write_json_atomic(tmp_path / "a" / "b" / "r.json", [1])
    assert json.loads(out.read_text()) == [1]
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)))
    assert atomic.copy_file_atomic(src, tmp_path / "dst.bin").read_bytes() == bytes(range(256))
    assert atomic.write_text_atomic(tmp_path / "t.txt", "é").read_text() == "é"


def test_swap_in_replaces_a_directory_and_restore_puts_an_interrupted_swap_back(tmp_path):
    out, staging = tmp_path / "data", tmp_path / ".data.tmp"
    out.mkdir()
    (out / "v").write_text("1")
    staging.mkdir()
    (staging / "v").write_text("2")
    atomic.swap_in(staging, out, atomic.aside_path(out))
    assert (out / "v").read_text() == "2" and not staging.exists() and atomic.set_aside(out) == []
    # A swap killed between its two renames: `out` gone, the previous copy whole beside it.
    aside = atomic.aside_path(out)
    os.replace(out, aside)
    assert atomic.restore_set_aside(out) and (out / "v").read_text() == "2"
    assert not atomic.restore_set_aside(out)  # nothing to restore once `out` exists


def test_a_full_disk_is_a_named_error_and_leaves_the_old_file(tmp_path):
    # /dev/full answers every write with ENOSPC: a real full disk, without filling one.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this platform")
    path = tmp_path / "train_result.json"
    path.write_text("old")
    with pytest.raises(atomic.WriteError) as err:
        with atomic.atomic_output(path) as tmp:
            tmp.write_bytes(b"new")
            with open("/dev/full", "wb") as full:
                full.write(b"x" * 10)
    assert str(err.value).startswith(f"disk full while writing '{path}': No space left on device (")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["train_result.json"]


def test_other_write_errors_name_the_path_too(tmp_path):
    path = tmp_path / "missing-dir" / "out.json"
    with pytest.raises(atomic.WriteError, match=rf"could not write '{path}': No such file or directory"):
        atomic.write_text_atomic(path, "x")
