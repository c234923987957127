"""The action every env of ours takes, tabletop and Meta-World alike, and its validation: one home for
its names and bounds (envs build their action specs from it, the dataset standardisation entries and
the random-policy builder read it from here).

[dx, dy, dz] end-effector displacement in [-1, 1], gripper in [-1, 1] (> 0 closes), terminate in [0, 1]
(> 0.5 ends the episode). Out-of-bounds values are clipped; a wrong shape or a NaN/Inf is an error.
Meta-World's own 4-d action is the first four; our adapter adds the terminate dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ACTION_NAMES: tuple[str, ...] = (
    "world_vector_x",
    "world_vector_y",
    "world_vector_z",
    "gripper_closedness",
    "terminate_episode",
)
ACTION_LOW: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0, 0.0)
ACTION_HIGH: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
ACTION_MIN = np.array(ACTION_LOW, dtype=np.float32)
ACTION_MAX = np.array(ACTION_HIGH, dtype=np.float32)
ACTION_FIELDS = "[dx, dy, dz, gripper, terminate]"
ACTION_SPEC_TEXT = f"{ACTION_FIELDS} (float32, bounds [-1, -1, -1, -1, 0]..[1, 1, 1, 1, 1])"


@dataclass(frozen=True)
class ActionInterface:
    """An env family's action: names, bounds (float lists, JSON-ready), and its size."""
    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.names)


_FIVE_D = ActionInterface(ACTION_NAMES, ACTION_LOW, ACTION_HIGH)
# Keyed by env family ("tabletop", "metaworld"): both take the same 5-d action.
ACTION_INTERFACES: dict[str, ActionInterface] = {"tabletop": _FIVE_D, "metaworld": _FIVE_D}


def action_interface(family: str) -> ActionInterface:
    if family not in ACTION_INTERFACES:
        raise ValueError(f"env family: expected one of {sorted(ACTION_INTERFACES)}, got {family!r}")
    return ACTION_INTERFACES[family]


def validate_action(action: Any, spec: str = ACTION_FIELDS) -> np.ndarray:
    """The action as float64, clipped to [ACTION_MIN, ACTION_MAX]. `spec` is how the shape error
    describes the expected action."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (5,):
        raise ValueError(f"action must have shape (5,) = {spec}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action must be finite (5,) floats {ACTION_FIELDS}, got {a.tolist()}")
    return np.clip(a, ACTION_MIN, ACTION_MAX)
