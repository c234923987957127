"""Durable writes: a rename is only atomic across a crash or power loss once the renamed data and the
directory entry are on disk, so writers fsync the files, then the directory that holds the new name."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


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


def temp_sibling(path: str | Path, suffix: str = "") -> Path:
    """A fresh hidden name beside `path` (same directory, so the final rename stays on one filesystem).
    `suffix` keeps an extension for writers that pick the format from it (matplotlib, imageio)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


class WriteError(OSError):
    """A write that failed, naming what was being written (a bare `[Errno 28]` names nothing)."""

    def __str__(self) -> str:
        return str(self.strerror)


def free_mib(path: str | Path) -> int | None:
    """Free space in MiB on the filesystem of `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free >> 20
        except OSError:
            continue
    return None


def write_error(exc: OSError, path: str | Path) -> WriteError:
    """`exc` restated for the output `path`: a full disk says so, with the free space left there."""
    path = Path(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_mib(path.parent)
        message = (f"disk full while writing {str(path)!r}: {exc.strerror or 'no space left on device'} "
                   f"({'unknown space' if free is None else f'{free} MiB'} free there); free some space or "
                   "write elsewhere")
    else:
        message = f"could not write {str(path)!r}: {exc.strerror or exc}"
    return WriteError(exc.errno, message, str(path))


@contextlib.contextmanager
def naming_write_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError of the block as a WriteError naming `path` (unless one is already named)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(exc, path) from exc


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer to fill; on a clean exit the file is fsynced,
    renamed over `path` and the directory fsynced, so a crash leaves the old content or the new, never a
    torn file. On an error the temporary file is removed and `path` is untouched; an OSError comes out
    as a WriteError naming `path`."""
    path = Path(path)
    tmp = temp_sibling(path, suffix)
    try:
        with naming_write_errors(path):
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably (see atomic_output)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a crash leaves the old content or the new, never a torn file."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """`data` as indented, key-sorted JSON at `path`, atomically; missing parent directories are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def copy_file_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy `src` to `dst` atomically and durably."""
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def swap_in(staging: str | Path, out: str | Path, aside: str | Path) -> None:
    """Rename the filled, fsynced directory `staging` to `out`. A previous `out` is renamed to `aside`
    first and removed once the new one is in. Interrupted between the two renames, the previous `out`
    is put back; if even that fails it stays whole at `aside`, for the caller's next run to restore."""
    staging, out, aside = Path(staging), Path(out), Path(aside)
    moved = False
    try:
        if out.exists():
            os.replace(out, aside)
            moved = True
        os.replace(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        if moved and not out.exists():
            try:
                os.replace(aside, out)
            except OSError:
                pass
        raise
    if moved:
        shutil.rmtree(aside, ignore_errors=True)


def aside_path(out: str | Path) -> Path:
    """A fresh `.NAME.old-*` sibling of `out` for swap_in to move the previous copy to (what set_aside finds)."""
    out = Path(out)
    return out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"


def set_aside(out: str | Path) -> list[Path]:
    """The `.NAME.old-*` siblings of `out` (previous copies moved aside by swap_in), oldest first."""
    out = Path(out)
    prefix = f".{out.name}.old-"
    try:
        found = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    return sorted(found, key=mtime)


def restore_set_aside(out: str | Path) -> bool:
    """A swap killed between its two renames leaves `out` missing and the previous copy whole at
    `.NAME.old-*`: rename the newest back. True if `out` was restored."""
    out = Path(out)
    if out.exists():
        return False
    olds = set_aside(out)
    if not olds:
        return False
    try:
        os.rename(olds[-1], out)
    except OSError:
        return False
    fsync_dir(out.parent)
    return True
