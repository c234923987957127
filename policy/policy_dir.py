"""A trained policy is a directory holding everything needed to run it, nothing pickled:

  config.yaml         the ExperimentConfig it was trained with
  model.safetensors   weights
  tokenizer.model     sentencepiece model for instructions
  action_stats.json   action tokenizer bounds and names, dataset action statistics
  policy.json         format version and the input spec (camera key, image shape, proprio size)

Saving swaps a filled staging directory `.NAME.tmp-*` in place of NAME, moving the previous one aside
as `.NAME.old-*` until the new one is in; a process killed between the two renames leaves NAME
missing and `.NAME.old-*` whole, which the next save or load puts back.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from policy.action_tokenizer import ActionTokenizer, DictActionTokenizer, action_tokenizer_from_dict
from policy.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from common.atomic import aside_path, fsync_tree, restore_set_aside, set_aside, swap_in
from policy.language import TextTokenizer

FORMAT_VERSION = 1
FILES = ("config.yaml", "model.safetensors", "tokenizer.model", "action_stats.json", "policy.json")


class PolicyDirError(ValueError):
    pass


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
    missing with the previous one at `.NAME.old-*`, which the next save or load restores)."""
    out = Path(out)
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
                "input": spec.to_dict(), **(extra or {})}
        (staging / "policy.json").write_text(json.dumps(meta, indent=2))
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


def load_policy_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedPolicy:
    """Every file is checked as it is read: errors name the directory, the file, what was expected and
    what was found (PolicyDirError)."""
    from policy.model import PolicyModel

    path = Path(path)
    if not path.is_dir() and set_aside(path):
        time.sleep(0.2)  # a save in progress renames the new directory in right after moving the old aside
        if not path.is_dir() and not restore_set_aside(path) and not path.is_dir():
            old = set_aside(path)[-1]
            raise PolicyDirError(f"--policy {str(path)!r}: expected a policy directory, found none; an "
                                 f"interrupted save left the previous one at {str(old)!r}: rename it to {path.name!r}")
    if not path.is_dir():
        raise PolicyDirError(f"--policy {str(path)!r}: expected a policy directory written by `train`, found no directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise PolicyDirError(f"--policy {str(path)!r}: not a policy directory: missing {', '.join(missing)}")
    meta, spec, stats = read_spec_and_stats(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PolicyDirError(f"--policy {str(path)!r}: policy.json format_version: expected {FORMAT_VERSION}, got "
                             f"{version!r} (written by an incompatible version of this stack; retrain or convert it)")
    cfg = _read_config(path)
    try:
        action_tok = action_tokenizer_from_dict(stats["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: action_stats.json 'tokenizer' is invalid: {exc}") from None
    _check_spec(path, spec, cfg, action_tok)
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
    model = PolicyModel(cfg.model, vocab_size=text.vocab_size, num_action_dims=action_tok.num_tokens,
                        proprio_dim=spec.proprio_dim)
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) or (lines[0] if lines else type(exc).__name__)
        raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors does not match config.yaml (and the "
                             f"{action_tok.num_tokens} action dims of action_stats.json): {detail}") from None
    model.to(device).eval()
    return LoadedPolicy(cfg, model, text, action_tok, spec, meta)
