"""Durable writes: a rename is only atomic across a crash or power loss once the renamed data and the
directory entry are on disk, so writers fsync the files, then the directory that holds the new name."""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms without directory fds: nothing more we can do
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # filesystems that refuse directory fsync
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file below `root`, then every directory (deepest first), `root` last."""
    dirs = []
    for d, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(d, f))
        dirs.append(d)
    for d in reversed(dirs):
        fsync_dir(d)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a crash leaves the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
