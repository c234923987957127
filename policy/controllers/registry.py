"""The controller registry: controller types by name, with what each supports.

A controller class registers under its model.controller.type name with `@register_controller(name,
**capabilities)`; callers ask `controller_info(name)` what a type supports instead of comparing type
strings, and build one with `make_controller`.

Adding a controller:
  1. one new file in policy/controllers/ with the class, decorated with `@register_controller("name", ...)`
     and its capability flags, imported from policy/controllers/__init__.py;
  2. its name and its config rules in policy/config.py (`CONTROLLER_RULES`): config validates
     model.controller.type without importing the registry, so the allowed names live there.
Registration refuses a name config does not allow, or a carried_memory flag that disagrees with
config's memory_horizon rule; `check_registry_complete` (run when policy.controllers is imported)
refuses a config name that no class registered. The tests over `controller_names()` then pick the new
controller up.

Every controller has the interface of `policy.controllers.ttm.TokenTuringMachine`:

    forward(tokens [B,T,N,D], step_mask [B,T] bool | None) -> out [B,T,r,out_dim]   training unroll
    init_memory(batch) -> state                                                       inference state
    step(tokens [B,N,D], state) -> (out [B,r,out_dim], new state)                     one inference step

Stepping through an episode gives the same outputs as the unroll (up to float rounding), the output at
step t never depends on inputs after t, and steps where `step_mask` is False (padding) do not affect
any valid step: the valid steps' outputs equal those of an unroll over the valid steps alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from policy.config import CONTROLLER_RULES, CONTROLLER_TYPES, ConfigError, ControllerConfig


@dataclass(frozen=True)
class ControllerInfo:
    name: str
    cls: type[nn.Module]
    # The state is carried across steps (built up over the episode); model.controller.memory_horizon applies.
    carried_memory: bool = False
    # A fixed window of the last model.controller.window frames is the whole history (rt1).
    windowed_history: bool = False
    # One output token per action dimension (built with num_action_dims; PolicyModel reads it with TokenHead).
    token_per_action_dim: bool = False
    # forward / step take return_attention=True and return memory read/write weights (ttm).
    attention_maps: bool = False
    # The inference state stays the same size however long the episode (not a growing KV cache).
    bounded_state: bool = True


_CONTROLLERS: dict[str, ControllerInfo] = {}


def register_controller(name: str, **capabilities: bool) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register `cls(cfg, dim, num_input_tokens[, num_action_dims])` as controller `name`."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name not in CONTROLLER_TYPES:
            raise ValueError(f"register_controller: {name!r} is not an allowed model.controller.type; add it and "
                             f"its rules to CONTROLLER_RULES in policy/config.py (allowed: {list(CONTROLLER_TYPES)})")
        if name in _CONTROLLERS:
            raise ValueError(f"register_controller: {name!r} is already registered ({_CONTROLLERS[name].cls.__name__})")
        info = ControllerInfo(name, cls, **capabilities)
        if info.carried_memory != CONTROLLER_RULES[name].memory_horizon:
            raise ValueError(f"register_controller: {name!r} has carried_memory={info.carried_memory}, but "
                             f"policy/config.py says memory_horizon applies: {CONTROLLER_RULES[name].memory_horizon}")
        _CONTROLLERS[name] = info
        return cls

    return register


def check_registry_complete() -> None:
    """Every allowed model.controller.type has a registered class."""
    missing = [n for n in CONTROLLER_TYPES if n not in _CONTROLLERS]
    if missing:
        raise ImportError(f"policy.controllers: no class registered for model.controller.type {missing} "
                          "(allowed in policy/config.py)")


def controller_names(**capabilities: bool) -> tuple[str, ...]:
    """The registered controller types, in config's order; with e.g. attention_maps=True, only those
    whose capabilities have these values."""
    return tuple(n for n in CONTROLLER_TYPES if n in _CONTROLLERS
                 and all(getattr(_CONTROLLERS[n], k) == v for k, v in capabilities.items()))


def controller_info(name: str) -> ControllerInfo:
    if name not in _CONTROLLERS:
        raise ConfigError(f"model.controller.type: expected one of {list(controller_names())}, got {name!r}")
    return _CONTROLLERS[name]


def make_controller(cfg: ControllerConfig, dim: int, num_input_tokens: int,
                    num_action_dims: int | None = None) -> nn.Module:
    """The controller named by model.controller.type, for `num_input_tokens` tokens of width `dim` per
    step. Controllers with one output token per action dimension also need num_action_dims."""
    cfg.validate(dim)
    info = controller_info(cfg.type)
    if not info.token_per_action_dim:
        return info.cls(cfg, dim, num_input_tokens)
    if num_action_dims is None or num_action_dims < 1:
        raise ValueError(f"num_action_dims: the {cfg.type} controller needs the number of action dimensions "
                         f"(one action token each), got {num_action_dims}")
    return info.cls(cfg, dim, num_input_tokens, num_action_dims)
