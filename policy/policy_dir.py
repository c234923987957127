"""A trained policy is a directory holding everything needed to run it, nothing pickled:

  config.yaml         the ExperimentConfig it was trained with
  model.safetensors   weights
  tokenizer.model     sentencepiece model for instructions
  action_stats.json   action tokenizer bounds and names, dataset action statistics
  policy.json         format version and the input spec (camera key, image shape, proprio size)
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from policy.action_tokenizer import ActionTokenizer, DictActionTokenizer, action_tokenizer_from_dict
from policy.config import ExperimentConfig, config_from_dict, config_to_dict
from policy.language import TextTokenizer

FORMAT_VERSION = 1
FILES = ("config.yaml", "model.safetensors", "tokenizer.model", "action_stats.json", "policy.json")


class PolicyDirError(ValueError):
    pass


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
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(d["camera_key"], tuple(d["image_shape"]), d.get("proprio_key"), int(d["proprio_dim"]),
                   int(d["action_dim"]), dict(d.get("env") or {}))


def save_policy_dir(out: str | Path, cfg: ExperimentConfig, model: torch.nn.Module, tokenizer_model: str | Path,
                    action_tokenizer: ActionTokenizer | DictActionTokenizer, action_stats: dict, spec: InputSpec,
                    extra: dict | None = None) -> Path:
    """Write atomically: a staging directory is filled, then swapped in place of `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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


def load_policy_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedPolicy:
    from policy.model import PolicyModel

    path = Path(path)
    if not path.is_dir():
        raise PolicyDirError(f"--policy {str(path)!r}: expected a policy directory written by `train`, found no directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise PolicyDirError(f"--policy {str(path)!r}: not a policy directory: missing {', '.join(missing)}")
    meta = json.loads((path / "policy.json").read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PolicyDirError(f"--policy {str(path)!r}: policy.json format_version: expected {FORMAT_VERSION}, got "
                             f"{version!r} (written by an incompatible version of this stack; retrain or convert it)")
    cfg = config_from_dict(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))  # type: ignore[arg-type]
    spec = InputSpec.from_dict(meta["input"])
    text = TextTokenizer(path / "tokenizer.model", cfg.model.language.max_tokens)
    stats = json.loads((path / "action_stats.json").read_text())
    try:
        action_tok = action_tokenizer_from_dict(stats["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: action_stats.json 'tokenizer' is invalid: {exc}") from None
    model = PolicyModel(cfg.model, vocab_size=text.vocab_size, num_action_dims=action_tok.num_tokens,
                        proprio_dim=spec.proprio_dim)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise PolicyDirError(f"--policy {str(path)!r}: model.safetensors does not match config.yaml: "
                             f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedPolicy(cfg, model, text, action_tok, spec, meta)
