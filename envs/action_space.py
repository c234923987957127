"""The 5-d action every env of ours takes (tabletop and Meta-World alike), and its validation.

[dx, dy, dz] end-effector displacement in [-1, 1], gripper in [-1, 1] (> 0 closes), terminate in [0, 1]
(> 0.5 ends the episode). Out-of-bounds values are clipped; a wrong shape or a NaN/Inf is an error.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ACTION_MIN = np.array([-1, -1, -1, -1, 0], dtype=np.float32)
ACTION_MAX = np.ones(5, dtype=np.float32)
ACTION_FIELDS = "[dx, dy, dz, gripper, terminate]"
ACTION_SPEC_TEXT = f"{ACTION_FIELDS} (float32, bounds [-1, -1, -1, -1, 0]..[1, 1, 1, 1, 1])"


def validate_action(action: Any, spec: str = ACTION_FIELDS) -> np.ndarray:
    """The action as float64, clipped to [ACTION_MIN, ACTION_MAX]. `spec` is how the shape error
    describes the expected action."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (5,):
        raise ValueError(f"action must have shape (5,) = {spec}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action must be finite (5,) floats {ACTION_FIELDS}, got {a.tolist()}")
    return np.clip(a, ACTION_MIN, ACTION_MAX)
