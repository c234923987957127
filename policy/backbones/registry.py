"""The image backbone registry: FiLM-conditioned backbones by name, with what each supports.

A backbone class registers under its model.image.backbone name with `@register_backbone(name,
**capabilities)`; callers ask `backbone_info(name)` instead of comparing names and build one with
`make_backbone`. Every backbone maps [N,3,H,W] normalised images + [N,C] context ->
[N, num_output_tokens(image_size), token_dim] tokens, and has `num_output_tokens(image_size)`.

Adding a backbone:
  1. one new file in policy/backbones/ with the class, decorated with `@register_backbone("name", ...)`,
     imported from policy/backbones/__init__.py;
  2. its name and the rules of its model.image fields in policy/config.py (`_BACKBONE_RULES`): config
     validates model.image.backbone without importing the registry, so the allowed names live there.
Registration refuses a name config does not allow; `check_registry_complete` (run when policy.backbones
is imported) refuses a config name that no class registered. The tests over `backbone_names()` then
pick the new backbone up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from policy.config import BACKBONES, ConfigError, ImageEncoderConfig


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    cls: type[nn.Module]
    # Output tokens are patch grids, so their count follows from the config alone
    # (ImageEncoderConfig.output_tokens(), checked at load); otherwise it is known once built.
    patch_tokens: bool = False
    # Keeps BatchNorm running statistics (train/eval mode changes the output; Keras-style parameter
    # counts include them).
    batch_norm: bool = False


_BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, **capabilities: bool) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register `cls(img_cfg, context_dim)` as backbone `name`."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name not in BACKBONES:
            raise ValueError(f"register_backbone: {name!r} is not an allowed model.image.backbone; add it and its "
                             f"rules to _BACKBONE_RULES in policy/config.py (allowed: {list(BACKBONES)})")
        if name in _BACKBONES:
            raise ValueError(f"register_backbone: {name!r} is already registered ({_BACKBONES[name].cls.__name__})")
        _BACKBONES[name] = BackboneInfo(name, cls, **capabilities)
        return cls

    return register


def check_registry_complete() -> None:
    """Every allowed model.image.backbone has a registered class."""
    missing = [n for n in BACKBONES if n not in _BACKBONES]
    if missing:
        raise ImportError(f"policy.backbones: no class registered for model.image.backbone {missing} "
                          "(allowed in policy/config.py)")


def backbone_names() -> tuple[str, ...]:
    """The registered backbones, in config's order."""
    return tuple(n for n in BACKBONES if n in _BACKBONES)


def backbone_info(name: str) -> BackboneInfo:
    if name not in _BACKBONES:
        raise ConfigError(f"model.image.backbone: expected one of {list(backbone_names())}, got {name!r}")
    return _BACKBONES[name]


def make_backbone(img_cfg: ImageEncoderConfig, context_dim: int) -> nn.Module:
    """The FiLM-conditioned image backbone named by model.image.backbone:
    [N,3,H,W] normalised images + [N,C] context -> [N, num_output_tokens(image_size), token_dim] tokens."""
    img_cfg.validate()
    return backbone_info(img_cfg.backbone).cls(img_cfg, context_dim)
