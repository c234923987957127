"""A trained policy is a directory holding everything needed to run it, nothing pickled:

  config.yaml         the ExperimentConfig it was trained with
  model.safetensors   weights
  tokenizer.model     sentencepiece model for instructions
  action_stats.json   action tokenizer bounds and names, dataset action statistics
  policy.json         format version and the input spec (camera key, image shape, proprio size)
  manifest.json       size and sha256 of every other file, written last

Loading checks every file as it reads it (errors name the file, the field, what was expected and what
was found), then the invariants between them (action bounds and bins against the head, tensor dtypes
and shapes against the model config.yaml builds, frame size against the training image size, finite
weights), then the manifest: a file changed after saving is refused even where it still parses. A
directory saved before manifests existed (no manifest.json, and policy.json does not name one) loads
after the same invariants, with a LegacyPolicyDirWarning: changed bytes cannot be detected there.

Saving swaps a filled staging directory `.NAME.tmp-*` in place of NAME, moving the previous one aside
as `.NAME.old-*` until the new one is in; a process killed between the two renames leaves NAME
missing and `.NAME.old-*` whole, which the next save or load puts back.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from policy.action_tokenizer import ActionTokenizer, DictActionTokenizer, action_tokenizer_from_dict
from policy.backbones.pretrained import no_pretrained_load
from policy.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from common.atomic import aside_path, fsync_tree, restore_set_aside, set_aside, swap_in, write_text_atomic
from policy.language import TextTokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("config.yaml", "model.safetensors", "tokenizer.model", "action_stats.json", "policy.json", MANIFEST)
MANIFEST_FORMAT = 1


class PolicyDirError(ValueError):
    pass


class NonFiniteWeightsError(PolicyDirError):
    """Weights holding NaN or inf (names the tensors): refused at save and at load."""


class LegacyPolicyDirWarning(UserWarning):
    """A policy directory saved before manifest.json existed: loaded, but without checksums."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _spec_error(d: dict, field: str, expected: str) -> PolicyDirError:
    got = repr(d[field]) if field in d else "no such field"
    return PolicyDirError(f"policy.json input.{field}: expected {expected}, got {got}")


@dataclass
class InputSpec:
    """What the policy expects per step; the step runner validates observations against it."""
    camera_key: str  # key in the observation dict (last part of the dataset path)
    image_shape: tuple[int, int, int]
    proprio_key: str | None
    proprio_dim: int
    action_dim: int
    env: dict[str, Any]  # how the training data was produced (env name, camera, image size), if known

    def to_dict(self) -> dict:
        return {"camera_key": self.camera_key, "image_shape": list(self.image_shape),
                "proprio_key": self.proprio_key, "proprio_dim": self.proprio_dim,
                "action_dim": self.action_dim, "env": self.env}

    @classmethod
    def from_dict(cls, d: Any) -> "InputSpec":
        """Validated here: a bad spec would otherwise load fine, then fail every step or be blamed on
        another file. Errors name `policy.json input.<field>`, what was expected and what was found."""
        if not isinstance(d, dict):
            raise PolicyDirError("policy.json input: expected an object with camera_key, image_shape, proprio_key, "
                                 f"proprio_dim, action_dim, got {'nothing' if d is None else type(d).__name__}")
        cam = d.get("camera_key")
        if not isinstance(cam, str) or not cam:
            raise _spec_error(d, "camera_key", "a non-empty string (the observation's image key)")
        shape = d.get("image_shape")
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(v) and v > 0 for v in shape)
                or shape[2] != 3):
            raise _spec_error(d, "image_shape", "[H, W, 3] with positive integers H, W (RGB frames)")
        pkey = d.get("proprio_key")
        if pkey is not None and (not isinstance(pkey, str) or not pkey):
            raise _spec_error(d, "proprio_key", "null or a non-empty string")
        pdim = d.get("proprio_dim")
        if not _is_int(pdim) or pdim < 0:
            raise _spec_error(d, "proprio_dim", "an integer >= 0")
        if pkey is None and pdim != 0:
            raise _spec_error(d, "proprio_dim", "0 (proprio_key is null: the policy takes no proprio)")
        if pkey is not None and pdim < 1:
            raise _spec_error(d, "proprio_dim", f"an integer >= 1 (the size of {pkey!r})")
        adim = d.get("action_dim")
        if not _is_int(adim) or adim < 1:
            raise _spec_error(d, "action_dim", "an integer >= 1")
        env = d.get("env")
        if env is not None and not isinstance(env, dict):
            raise _spec_error(d, "env", "an object or null")
        return cls(cam, tuple(shape), pkey, pdim, adim, dict(env or {}))  # type: ignore[arg-type]


# -- finite weights ----------------------------------------------------------------------------------
def non_finite_tensors(state: torch.nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, NaN count, inf count) of every floating-point tensor that is not all finite."""
    items = state.state_dict().items() if isinstance(state, torch.nn.Module) else state.items()
    bad = []
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            bad.append((name, nan, int(t.numel() - int(torch.isfinite(t).sum())) - nan))
    return bad


def describe_non_finite(bad: list[tuple[str, int, int]], limit: int = 5) -> str:
    """'head.bias (1280 NaN), ...': what non_finite_tensors found, for messages."""
    parts = []
    for name, nan, inf in bad[:limit]:
        kinds = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
        parts.append(f"{name} ({', '.join(k for k in kinds if k)})")
    return ", ".join(parts) + (f", and {len(bad) - limit} more" if len(bad) > limit else "")


def check_finite_state_dict(model: torch.nn.Module | Mapping[str, torch.Tensor], where: str = "model") -> None:
    """Raise NonFiniteWeightsError listing the tensors (parameters and buffers, e.g. BatchNorm statistics)
    that hold NaN or inf; such a policy returns NaN actions. Integer tensors are skipped."""
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteWeightsError(f"{where}: expected finite weights, got NaN or inf in {len(bad)} tensor"
                                    f"{'s' if len(bad) > 1 else ''}: {describe_non_finite(bad)}")


# -- manifest ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_dict(directory: Path) -> dict:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    return {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}


def write_manifest(path: str | Path) -> Path:
    """(Re)write manifest.json for the files a policy directory holds now, and mark policy.json as having
    one (so that deleting manifest.json is detected). save_policy_dir calls it; by hand it blesses
    whatever the files hold, e.g. to add a manifest to a directory saved before manifests existed."""
    path = Path(path)
    meta_file = path / "policy.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if isinstance(meta, dict) and meta.get("manifest") != MANIFEST:
            meta["manifest"] = MANIFEST
            write_text_atomic(meta_file, json.dumps(meta, indent=2))
    write_text_atomic(path / MANIFEST, json.dumps(_manifest_dict(path), indent=2))
    return path / MANIFEST


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def manifest_problems(path: str | Path) -> list[str] | None:
    """What differs between a policy directory and its manifest.json ([] = nothing); None when there is
    no manifest.json. Each problem names the file: "model.safetensors: sha256 expected ..., got ...".
    Files the manifest does not list are not read by loading and are not checked."""
    path = Path(path)
    mfile = path / MANIFEST
    if not mfile.is_file():
        return None
    try:
        data = json.loads(mfile.read_text())
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST}: expected the other files' sizes and sha256 as a JSON object, could not read it "
                f"(truncated or corrupt?): {type(exc).__name__}: {_one_line(exc)}"]
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("algorithm") != "sha256" \
            or not isinstance(files, dict):
        got = (f"a JSON {type(data).__name__}" if not isinstance(data, dict) else
               f"format {data.get('format')!r}, algorithm {data.get('algorithm')!r}, files "
               f"{type(data.get('files')).__name__}")
        return [f"{MANIFEST}: expected {{\"format\": {MANIFEST_FORMAT}, \"algorithm\": \"sha256\", \"files\": "
                f"{{name: {{\"size\", \"sha256\"}}}}}}, got {got}"]
    problems = [f"{MANIFEST} files: expected an entry for {name}, got none"
                for name in FILES if name != MANIFEST and name not in files]
    for name, entry in sorted(files.items()):
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            problems.append(f"{MANIFEST} files: expected plain file names of this directory, got {name!r}")
            continue
        if not isinstance(entry, dict) or not _is_int(entry.get("size")) or not _is_sha256(entry.get("sha256")):
            problems.append(f"{MANIFEST} files.{name}: expected {{\"size\": bytes, \"sha256\": 64 hex digits}}, "
                            f"got {entry!r}")
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: expected a file of {entry['size']} bytes (listed in {MANIFEST}), got none")
            continue
        size, digest = f.stat().st_size, _sha256(f)
        if digest != entry["sha256"] or size != entry["size"]:
            sizes = f" (size expected {entry['size']} bytes, got {size})" if size != entry["size"] else ""
            problems.append(f"{name}: sha256 expected {entry['sha256']}, got {digest}{sizes}")
    return problems


def _manifest_status(path: Path) -> tuple[list[str], bool]:
    """-> (problems, legacy). Legacy: no manifest.json and policy.json does not say it has one."""
    problems = manifest_problems(path)
    if problems is not None:
        return problems, False
    try:
        meta = json.loads((path / "policy.json").read_text())
    except (OSError, ValueError):
        meta = None  # reported by the spec check, which runs before this matters
    if isinstance(meta, dict) and meta.get("manifest") is not None:
        return [f"{MANIFEST}: expected the checksums policy.json names ({meta.get('manifest')!r}), got no such "
                "file (deleted after saving?)"], False
    return [], True


def verify_manifest(path: str | Path, field: str = "--policy") -> None:
    """Raise PolicyDirError if the directory's files differ from its manifest.json (a directory without
    one, saved before manifests existed, passes): for readers that do not go through load_policy_dir,
    e.g. fine-tuning from a policy (train.init_from)."""
    problems, _ = _manifest_status(Path(path))
    if problems:
        raise PolicyDirError(_manifest_message(Path(path), problems, field))


def _manifest_message(path: Path, problems: list[str], field: str = "--policy") -> str:
    return (f"{field} {str(path)!r}: the files do not match {MANIFEST} (changed or corrupted after saving): "
            f"{'; '.join(problems)}; restore the directory from a good copy or save it again")


# -- interrupted saves -----------------------------------------------------------------------------
def _remove_leftovers(out: Path) -> None:
    restore_set_aside(out)
    for p in list(out.parent.glob(f".{out.name}.tmp-*")) + set_aside(out):
        shutil.rmtree(p, ignore_errors=True)


def save_policy_dir(out: str | Path, cfg: ExperimentConfig, model: torch.nn.Module, tokenizer_model: str | Path,
                    action_tokenizer: ActionTokenizer | DictActionTokenizer, action_stats: dict, spec: InputSpec,
                    extra: dict | None = None) -> Path:
    """Write atomically: a staging directory is filled and fsynced, then swapped in place of `out`.
    Killed at any point, `out` is the previous policy or the new one (or, between the two renames,
    missing with the previous one at `.NAME.old-*`, which the next save or load restores).
    What loading would refuse is refused before anything is written: weights holding NaN or inf
    (NonFiniteWeightsError), action bins other than the head's, frames smaller than the model's input."""
    out = Path(out)
    where = f"{str(out)!r}: refusing to save a policy"
    check_finite_state_dict(model, where)
    if action_tokenizer.bins != cfg.model.action_bins:
        raise PolicyDirError(f"{where}: action tokenizer bins: expected {cfg.model.action_bins} (model.action_bins, "
                             f"the head's output size), got {action_tokenizer.bins}")
    size = cfg.model.image.image_size
    if min(spec.image_shape[:2]) < size:
        raise PolicyDirError(f"{where}: input image_shape: expected frames of at least {size}x{size} "
                             f"(model.image.image_size), got {list(spec.image_shape)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)  # from a save that was killed: training rewrites RUN_DIR/policy every checkpoint
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))
        save_model(model, str(staging / "model.safetensors"))
        shutil.copyfile(tokenizer_model, staging / "tokenizer.model")
        (staging / "action_stats.json").write_text(json.dumps(
            {"tokenizer": action_tokenizer.to_dict(), "dataset_stats": action_stats}, indent=2))
        meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "input": spec.to_dict(), **(extra or {}), "manifest": MANIFEST}
        (staging / "policy.json").write_text(json.dumps(meta, indent=2))
        (staging / MANIFEST).write_text(json.dumps(_manifest_dict(staging), indent=2))  # last: covers the rest
        fsync_tree(staging)  # the data must be on disk before the rename makes it `out`
        swap_in(staging, out, aside_path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedPolicy:
    cfg: ExperimentConfig
    model: torch.nn.Module
    text_tokenizer: TextTokenizer
    action_tokenizer: ActionTokenizer | DictActionTokenizer
    spec: InputSpec
    meta: dict


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: Path, name: str, expected: str, field: str = "--policy") -> dict:
    try:
        data = json.loads((path / name).read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise PolicyDirError(f"{field} {str(path)!r}: {name}: expected {expected} as a JSON object, could not "
                             f"read it (truncated or corrupt?): {type(exc).__name__}: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise PolicyDirError(f"{field} {str(path)!r}: {name}: expected {expected} as a JSON object, "
                             f"got a JSON {type(data).__name__}")
    return data


def read_spec_and_stats(path: str | Path, field: str = "--policy") -> tuple[dict, InputSpec, dict]:
    """A policy directory's policy.json (with its input spec checked) and action_stats.json, without the
    weights: what loading, and fine-tuning (train.init_from) before it builds its own model, read first."""
    path = Path(path)
    meta = _read_json(path, "policy.json", "the format version and input spec", field)
    try:
        spec = InputSpec.from_dict(meta.get("input"))
    except PolicyDirError as exc:
        raise PolicyDirError(f"{field} {str(path)!r}: {exc}") from None
    return meta, spec, _read_json(path, "action_stats.json", "the action tokenizer and dataset statistics", field)


def _read_config(path: Path) -> ExperimentConfig:
    where = f"--policy {str(path)!r}: config.yaml"
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise PolicyDirError(f"{where}: expected the training config as YAML, could not read it (truncated or "
                             f"corrupt?): {type(exc).__name__}: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise PolicyDirError(f"{where}: expected a mapping of config sections, got a {type(raw).__name__}")
    try:
        return config_from_dict(raw)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise PolicyDirError(f"{where}: incompatible policy directory (written by another version of this "
                             f"stack?): {exc}") from None


def _check_spec(path: Path, spec: InputSpec, cfg: ExperimentConfig,
                action_tok: ActionTokenizer | DictActionTokenizer) -> None:
    """The input spec against the other files: a mismatch would fail every step, or blame the weights."""
    where = f"--policy {str(path)!r}: policy.json input"
    if spec.action_dim != action_tok.num_tokens:
        raise PolicyDirError(f"{where}.action_dim: expected {action_tok.num_tokens} (the action tokenizer in "
                             f"action_stats.json: {', '.join(action_tok.names)}), got {spec.action_dim}")
    if cfg.model.use_proprio and spec.proprio_key is None:
        raise PolicyDirError(f"{where}.proprio_key: expected the proprio observation key (config.yaml "
                             "model.use_proprio is true), got null")
    if not cfg.model.use_proprio and spec.proprio_key is not None:
        raise PolicyDirError(f"{where}.proprio_key: expected null (config.yaml model.use_proprio is false), "
                             f"got {spec.proprio_key!r}")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _check_action_stats(path: Path, tok: dict, cfg: ExperimentConfig) -> None:
    """The action tokenizer's raw fields, before ActionTokenizer widens a constant dimension (high <= low
    becomes low + 1e-6): swapped bounds would otherwise load and turn every action into one constant."""
    where = f"--policy {str(path)!r}: action_stats.json tokenizer"
    bins = tok.get("bins")
    if _is_int(bins) and bins != cfg.model.action_bins:
        raise PolicyDirError(f"{where}.bins: expected {cfg.model.action_bins} (the action head's output size, "
                             f"config.yaml model.action_bins), got {bins}")
    if tok.get("kind", "vector") != "vector":
        return  # dict fields check their own bounds (ActionField: finite, low <= high)
    low, high = tok.get("low"), tok.get("high")
    for name, v in (("low", low), ("high", high)):
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        and math.isfinite(x) for x in v):
            raise PolicyDirError(f"{where}.{name}: expected a non-empty list of finite numbers, got {v!r}")
    if len(low) != len(high):
        raise PolicyDirError(f"{where}.high: expected {len(low)} values (as tokenizer.low), got {len(high)}")
    names = tok.get("names") or [f"action_{i}" for i in range(len(low))]
    # low == high is a constant dimension (kept as saved: the tokenizer widens it); low > high is not.
    bad = [i for i, (lo, hi) in enumerate(zip(low, high)) if lo > hi]
    if bad:
        shown = ", ".join(f"{names[i] if i < len(names) else i} (low {low[i]}, high {high[i]})" for i in bad[:3])
        raise PolicyDirError(f"{where}.low/high: expected low <= high in every dimension, got low > high in "
                             f"{len(bad)} of {len(low)}: {shown}{', ...' if len(bad) > 3 else ''} (swapped?)")


def _check_image_shape(path: Path, spec: InputSpec, cfg: ExperimentConfig) -> None:
    # Training refuses frames smaller than the model's input (train.check_fits_dataset); the model
    # resizes larger ones, so only a lower bound holds (a 256x320 dataset trains a 224 model).
    size = cfg.model.image.image_size
    h, w, _ = spec.image_shape
    if h < size or w < size:
        raise PolicyDirError(f"--policy {str(path)!r}: policy.json input.image_shape: expected frames of at least "
                             f"{size}x{size} (config.yaml model.image.image_size, the training image size), "
                             f"got {list(spec.image_shape)}")


def _check_tensors(path: Path, weights: Path, model: torch.nn.Module, what: str) -> None:
    """Every tensor of the file has the dtype and shape of the model's own: a header dtype changed from
    F32 to I32 keeps the byte count, and load_state_dict would cast the reinterpreted bits silently."""
    expected = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors: expected the model weights in safetensors "
                             f"format, could not read them (truncated or corrupt?): {_one_line(exc)}") from None
    for name, (dtype, shape) in sorted(header.items()):
        ref = expected.get(name)
        if ref is None:
            continue  # an unknown tensor: load_model's strict check names it with the missing ones
        want = _ST_DTYPES.get(ref.dtype, str(ref.dtype))
        if dtype != want:
            raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors tensor {name!r} dtype: expected {want} "
                                 f"(the model's {ref.dtype}), got {dtype}")
        if shape != tuple(ref.shape):
            raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors tensor {name!r} shape: expected "
                                 f"{tuple(ref.shape)} ({what}), got {shape}")


def load_policy_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedPolicy:
    """Every file is checked as it is read, then the invariants between the files, then the manifest:
    errors name the directory, the file and field, what was expected and what was found (PolicyDirError;
    NonFiniteWeightsError for NaN/inf weights). The specific checks run first because they say what is
    wrong; a file that also differs from manifest.json says so too."""
    path = Path(path)
    if not path.is_dir() and set_aside(path):
        time.sleep(0.2)  # a save in progress renames the new directory in right after moving the old aside
        if not path.is_dir() and not restore_set_aside(path) and not path.is_dir():
            old = set_aside(path)[-1]
            raise PolicyDirError(f"--policy {str(path)!r}: expected a policy directory, found none; an "
                                 f"interrupted save left the previous one at {str(old)!r}: rename it to {path.name!r}")
    if not path.is_dir():
        raise PolicyDirError(f"--policy {str(path)!r}: expected a policy directory written by `train`, found no directory")
    missing = [f for f in FILES if f != MANIFEST and not (path / f).is_file()]
    if missing:
        raise PolicyDirError(f"--policy {str(path)!r}: not a policy directory: missing {', '.join(missing)}")
    problems, legacy = _manifest_status(path)
    try:
        policy = _load_checked(path, device)
    except PolicyDirError as exc:
        if problems:
            raise type(exc)(f"{exc}; and the files do not match {MANIFEST} (changed after saving): "
                            f"{'; '.join(problems)}") from None
        raise
    if problems:
        raise PolicyDirError(_manifest_message(path, problems))
    if legacy:
        warnings.warn(LegacyPolicyDirWarning(
            f"--policy {str(path)!r}: no {MANIFEST} (saved before policy directories carried checksums): loaded "
            f"after checking its invariants, but changed bytes cannot be detected; add one with "
            f"`python -c \"from policy.policy_dir import write_manifest; write_manifest({str(path)!r})\"` "
            "once the directory is known good, or save it again"), stacklevel=2)
    return policy


def _load_checked(path: Path, device: str | torch.device) -> LoadedPolicy:
    from policy.model import PolicyModel

    meta, spec, stats = read_spec_and_stats(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PolicyDirError(f"--policy {str(path)!r}: policy.json format_version: expected {FORMAT_VERSION}, got "
                             f"{version!r} (written by an incompatible version of this stack; retrain or convert it)")
    cfg = _read_config(path)
    if isinstance(stats.get("tokenizer"), dict):
        _check_action_stats(path, stats["tokenizer"], cfg)
    try:
        action_tok = action_tokenizer_from_dict(stats["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: action_stats.json 'tokenizer' is invalid: {exc}") from None
    _check_spec(path, spec, cfg, action_tok)
    _check_image_shape(path, spec, cfg)
    try:
        text = TextTokenizer(path / "tokenizer.model", cfg.model.language.max_tokens)
    except (OSError, RuntimeError) as exc:  # sentencepiece raises RuntimeError for an unparsable model
        raise PolicyDirError(f"--policy {str(path)!r}: tokenizer.model: expected a sentencepiece model, could not "
                             f"load it (truncated or corrupt?): {_one_line(exc)}") from None
    weights = path / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors: expected the model weights in safetensors "
                             f"format, could not read them (truncated or corrupt?): {_one_line(exc)}") from None
    prop = shapes.get("proprio.weight")
    if prop is not None and len(prop) == 2 and prop[1] != spec.proprio_dim:
        raise PolicyDirError(f"--policy {str(path)!r}: policy.json input.proprio_dim: expected {prop[1]} (the "
                             f"input size of the proprio layer in model.safetensors), got {spec.proprio_dim}")
    with no_pretrained_load():  # the weights come from model.safetensors: no ImageNet file needed here
        model = PolicyModel(cfg.model, vocab_size=text.vocab_size, num_action_dims=action_tok.num_tokens,
                            proprio_dim=spec.proprio_dim)
    built = f"as config.yaml and the {action_tok.num_tokens} action dims of action_stats.json build it"
    _check_tensors(path, weights, model, built)
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) or (lines[0] if lines else type(exc).__name__)
        raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors does not match config.yaml (and the "
                             f"{action_tok.num_tokens} action dims of action_stats.json): {detail}") from None
    try:
        check_finite_state_dict(model, f"--policy {str(path)!r}: model.safetensors")
    except NonFiniteWeightsError as exc:
        raise NonFiniteWeightsError(f"{exc} (such a policy returns NaN actions)") from None
    model.to(device).eval()
    return LoadedPolicy(cfg, model, text, action_tok, spec, meta)
