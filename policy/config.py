"""Typed configuration: the single source of truth for models, data and training.

Configs are dataclasses. YAML files in configs/ and `key=value` overrides from the command line are
merged onto them with OmegaConf structured configs, so an unknown key or a wrongly typed value fails
at load time with the key named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field, what was expected and what came."""


@dataclass
class ImageEncoderConfig:
    # "efficientnet": FiLM-conditioned EfficientNet (RT-1's image tokenizer).
    backbone: str = "efficientnet"
    # EfficientNet compound scaling; b0..b7 are the published variants. "quickstart" is a narrow,
    # shallow member of the same family for CPU training.
    variant: str = "quickstart"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    image_size: int = 64  # frames are resized to image_size x image_size before the backbone
    token_dim: int = 128  # 1x1 conv output width = controller token width
    num_tokens: int = 8  # TokenLearner output tokens per frame
    tokenlearner_hidden: int = 64
    # Learned position embedding added to the feature-map tokens before TokenLearner, so pooled tokens
    # keep where a feature was (RT-1 has none; small-data policies localise objects much better with it).
    position_embedding: bool = False


@dataclass
class LanguageConfig:
    # "sentencepiece": train a tokenizer on the dataset's instructions and encode with a small
    # transformer. "embedding": take a precomputed embedding from the dataset (OXE datasets ship one).
    source: str = "sentencepiece"
    vocab_size: int = 64
    max_tokens: int = 16
    width: int = 64
    layers: int = 1
    heads: int = 4
    context_dim: int = 128  # the FiLM context width (RT-1 uses 512)


@dataclass
class ControllerConfig:
    # "ttm": Token Turing Machine memory controller.
    type: str = "ttm"
    memory_tokens: int = 16  # m
    read_tokens: int = 8  # r
    memory_mode: str = "TL"  # TL | TL-MHA | TL-AddErase
    process_unit: str = "transformer"  # transformer | mixer | mlp
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    use_position_embedding: bool = True
    window: int = 6  # history length for windowed controllers (RT-1)


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    use_proprio: bool = True  # add the proprioceptive state as one extra token per step
    action_bins: int = 256
    # How a step's action is read from the bin logits: "argmax" (RT-1) or "expectation" (the mean bin
    # under the softmax; smoother when the distribution is trained with label smoothing).
    action_decoding: str = "argmax"


@dataclass
class DataConfig:
    camera: str = "observation/image"  # path of the camera frame inside a step
    proprio_key: str = "observation/state"
    instruction_key: str = "observation/instruction"
    # "episode": unroll whole episodes from their first step (what a memory controller sees at
    # inference); "window": sliding windows of `window` steps padded at the episode start.
    sequence: str = "episode"
    sequence_length: int = 80  # T: steps per training sequence
    shuffle_buffer: int = 256  # episodes (bounded memory)
    cache_in_memory: bool = True  # cache decoded episodes (small datasets only)
    # "dataset": min/max from the dataset's action statistics; "spec": the bounds listed below.
    action_bounds: str = "dataset"
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Cross-entropy against a Gaussian over neighbouring bins (sigma in bins; 0 = one-hot, as RT-1).
    # Bins are ordinal; smoothing shares evidence between neighbours, which matters on small datasets.
    label_sigma: float = 0.0


@dataclass
class ExperimentConfig:
    name: str = "quickstart"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _structured(cfg: Any) -> Any:
    return OmegaConf.structured(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config onto the dataclass defaults and apply `key=value` overrides."""
    base = _structured(ExperimentConfig)
    try:
        layers = [base]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r}: expected an existing YAML file, found nothing there")
            layers.append(OmegaConf.load(path))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=100)")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        raise ConfigError(f"config key {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}".split("\n")[0]) from None
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def config_from_dict(data: dict) -> ExperimentConfig:
    """Rebuild a config saved with `config_to_dict` (e.g. from a policy directory)."""
    try:
        merged = OmegaConf.merge(_structured(ExperimentConfig), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        raise ConfigError(f"config key {key!r}: {exc}".split("\n")[0]) from None
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _require(cond: bool, field_name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}")


def validate_config(cfg: ExperimentConfig) -> None:
    """Semantic checks that types alone cannot express."""
    m = cfg.model
    _require(m.image.backbone in ("efficientnet",), "model.image.backbone", "one of ['efficientnet']", m.image.backbone)
    _require(m.image.image_size >= 16, "model.image.image_size", ">= 16", m.image.image_size)
    _require(m.image.num_tokens >= 1, "model.image.num_tokens", ">= 1", m.image.num_tokens)
    _require(m.image.token_dim >= 8, "model.image.token_dim", ">= 8", m.image.token_dim)
    _require(m.language.source in ("sentencepiece", "embedding"), "model.language.source",
             "'sentencepiece' or 'embedding'", m.language.source)
    _require(m.language.vocab_size >= 8, "model.language.vocab_size", ">= 8", m.language.vocab_size)
    c = m.controller
    _require(c.type in ("ttm",), "model.controller.type", "one of ['ttm']", c.type)
    _require(c.memory_tokens >= 1, "model.controller.memory_tokens", ">= 1", c.memory_tokens)
    _require(c.read_tokens >= 1, "model.controller.read_tokens", ">= 1", c.read_tokens)
    _require(c.memory_mode in ("TL", "TL-MHA", "TL-AddErase"), "model.controller.memory_mode",
             "one of ['TL', 'TL-MHA', 'TL-AddErase']", c.memory_mode)
    _require(c.process_unit in ("transformer", "mixer", "mlp"), "model.controller.process_unit",
             "one of ['transformer', 'mixer', 'mlp']", c.process_unit)
    _require(c.layers >= 1, "model.controller.layers", ">= 1", c.layers)
    _require(m.action_bins >= 2, "model.action_bins", ">= 2", m.action_bins)
    _require(m.action_decoding in ("argmax", "expectation"), "model.action_decoding",
             "'argmax' or 'expectation'", m.action_decoding)
    d = cfg.data
    _require(d.sequence in ("episode", "window"), "data.sequence", "'episode' or 'window'", d.sequence)
    _require(d.sequence_length >= 1, "data.sequence_length", ">= 1", d.sequence_length)
    _require(d.action_bounds in ("dataset", "spec"), "data.action_bounds", "'dataset' or 'spec'", d.action_bounds)
    if d.action_bounds == "spec":
        _require(len(d.action_low) == len(d.action_high) > 0, "data.action_low/action_high",
                 "two lists of equal, non-zero length", (d.action_low, d.action_high))
    t = cfg.train
    _require(t.steps >= 1, "train.steps", ">= 1", t.steps)
    _require(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    _require(t.lr > 0, "train.lr", "> 0", t.lr)
    _require(t.label_sigma >= 0, "train.label_sigma", ">= 0", t.label_sigma)
