"""Training checkpoints: everything needed to continue a run exactly.

    RUN_DIR/
      run.json                      how the run was started (config, dataset path); `--resume` reads it
      policy/                       the newest policy directory (what the step runner loads)
      checkpoints/step-00000500/
        policy/                     the policy directory at that step (EMA weights when train.ema_decay > 0)
        train_state.pt              raw weights, optimizer, scheduler, step, RNG states, data position,
                                    EMA weights, bad-step count (tensors and plain containers only:
                                    loadable with torch.load(weights_only=True))

A checkpoint is written into a hidden staging directory, fsynced and renamed into place, so a process
killed at any moment (or a power loss) leaves either the previous set of checkpoints or the new one,
never a half-written one.
Only the newest `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.atomic import fsync_dir, swap_in, write_text_atomic

STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be resumed (names the path and what is wrong)."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any],
                    write_policy: Callable[[Path], Any], keep: int) -> Path:
    """Write checkpoints/step-N atomically (staging dir, fsync, rename), then drop all but the newest `keep`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(run_dir)
    final = root / f"step-{step:08d}"
    staging = root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write_policy(staging / "policy")  # save_policy_dir fsyncs its own files
        with open(staging / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
        # The same step saved again (e.g. a resumed run re-reaching it) is set aside until the new one is in.
        swap_in(staging, final, root / f".old-step-{step:08d}-{uuid.uuid4().hex[:8]}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for _, gone in list_checkpoints(run_dir)[:-keep]:
        _remove(gone)
    return final


def _remove(ckpt: Path) -> None:
    # Renamed out of sight first: a half-deleted step-N that still has its train_state.pt would
    # otherwise count as a complete checkpoint.
    hidden = ckpt.parent / f".del-{ckpt.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(ckpt, hidden)
    except OSError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def remove_stale_staging(run_dir: str | Path) -> None:
    """Staging directories left by a process killed mid-write are garbage; a step-N set aside by a save
    killed between its renames is put back."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for d in sorted(root.glob(".old-step-*")):
        m = re.match(r"^\.old-(step-\d{8})-", d.name)
        final = root / m.group(1) if m else None
        if final is not None and not final.exists():
            os.replace(d, final)
            fsync_dir(root)
        else:
            shutil.rmtree(d, ignore_errors=True)
    for pattern in (".tmp-step-*", ".del-step-*"):
        for d in root.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)


def _previous(ckpt: Path) -> str:
    """The newest complete checkpoint before `ckpt`, for messages about a bad one."""
    m = _STEP_DIR.match(ckpt.name)
    earlier = [d for s, d in list_checkpoints(ckpt.parent.parent) if m is None or s < int(m.group(1))]
    if not earlier:
        return "there is no earlier checkpoint to resume from"
    return (f"the previous checkpoint is {str(earlier[-1])!r}: move {str(ckpt)!r} out of "
            f"{str(ckpt.parent)!r} to resume from it")


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    """checkpoints/step-N/train_state.pt -> the state dict. Missing, empty, truncated or garbage files
    raise CheckpointError naming the file and the previous checkpoint (torch's own errors would suggest
    weights_only=False, i.e. unpickling an untrusted file)."""
    ckpt = Path(ckpt)
    path = ckpt / STATE_FILE
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where}: expected the training state, found no file (an incomplete "
                              f"checkpoint?); {_previous(ckpt)}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{where}: corrupt: expected the training state, got an empty file; {_previous(ckpt)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{where}: could not be read: {exc.strerror or exc}; {_previous(ckpt)}") from None
    except Exception as exc:  # noqa: BLE001  garbage raises UnpicklingError, UnicodeDecodeError, KeyError, ...
        text = " ".join(str(exc).split())
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's archive; anything else is not a checkpoint
        if not is_zip:
            cause = f"not a torch checkpoint ({size} bytes, no torch.save archive header)"
        elif "Unsupported global" in text:
            cause = ("it holds objects other than tensors and plain containers (written by another version of "
                     "this stack?)")
        else:
            cause = f"truncated or damaged ({size} bytes; {type(exc).__name__}: {text.split('. ')[0][:100]})"
        raise CheckpointError(f"{where}: corrupt: expected the training state saved by `train`, {cause}; "
                              f"{_previous(ckpt)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: corrupt: expected the training state as a dict, got "
                              f"{type(state).__name__}; {_previous(ckpt)}")
    return state


# -- run metadata ------------------------------------------------------------------------------
def write_run_meta(run_dir: str | Path, meta: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(meta, indent=2))


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume {str(run_dir)!r}: expected a run directory written by `train` "
                              f"(with {RUN_FILE}), found none")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"--resume {str(run_dir)!r}: {RUN_FILE}: expected the run's metadata as a JSON "
                              f"object, could not read it (truncated or corrupt?): {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        got = f"a JSON {type(meta).__name__}" if not isinstance(meta, dict) else \
            f"config = {type(meta.get('config')).__name__}"
        raise CheckpointError(f"--resume {str(run_dir)!r}: {RUN_FILE}: expected a JSON object with the run's "
                              f"config (a mapping under \"config\"), got {got}")
    return meta


# -- random number generators --------------------------------------------------------------------
def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG that training draws from, as tensors and plain containers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from datasets.tf_setup import tf

        state["tf"] = torch.from_numpy(tf.random.get_global_generator().state.numpy().astype(np.int64))
    except Exception:  # noqa: BLE001  (TF missing or without a global generator: nothing to restore)
        pass
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(state["python"]))
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise CheckpointError(f"checkpoint RNG states: expected a generator {k!r}, found {sorted(state['generators'])}")
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tf" in state:
        from datasets.tf_setup import tf

        tf.random.get_global_generator().reset(state["tf"].numpy())


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
