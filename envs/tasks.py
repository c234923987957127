"""Task registry: instruction templates, success checks and layout constraints per task.

A task only reads the scene through the env's privileged accessors (block_pos, gripper_pos, ...),
so adding a task means adding one `Task` entry plus its expert in experts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from envs import experts
from envs.scene import BLOCK_HALF, TRAY_FLOOR_TOP, TRAY_INNER_HALF

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

REACH_RADIUS = 0.03
LIFT_HEIGHT = 0.05
PUSH_DISTANCE = 0.08
PUSH_DIRECTION = np.array([0.0, 1.0])  # "forward": away from the front camera


@dataclass(frozen=True)
class Task:
    name: str
    templates: tuple[str, ...]  # each has a {color} slot
    success: Callable[["TabletopEnv"], bool]
    expert: type[experts.WaypointExpert]
    # Extra layout constraint on (block xy (3, 2), target index, tray xy (2,)): e.g. a clear push lane.
    layout_ok: Callable[[np.ndarray, int, np.ndarray], bool] = lambda blocks, target, tray: True


def _reach_success(env: "TabletopEnv") -> bool:
    return bool(np.linalg.norm(env.gripper_pos() - env.block_pos(env.target_color)) < REACH_RADIUS)


def _lift_success(env: "TabletopEnv") -> bool:
    c = env.target_color
    return bool(env.block_pos(c)[2] >= BLOCK_HALF + LIFT_HEIGHT and env.grasped(c))


def _push_success(env: "TabletopEnv") -> bool:
    c = env.target_color
    moved = (env.block_pos(c) - env.block_start_pos(c))[:2] @ PUSH_DIRECTION
    on_table = env.block_pos(c)[2] < BLOCK_HALF + 0.01
    return bool(moved >= PUSH_DISTANCE and on_table)


def _push_lane_clear(blocks: np.ndarray, target: int, tray: np.ndarray) -> bool:
    """Nothing else within the strip the gripper sweeps (from behind the block to past its goal)."""
    lane_lo, lane_hi = blocks[target, 1] - 0.12, blocks[target, 1] + 0.20
    others = [blocks[i] for i in range(len(blocks)) if i != target]
    for xy, half_width in [(b, 0.085) for b in others] + [(tray, 0.15)]:
        if abs(xy[0] - blocks[target, 0]) < half_width and lane_lo < xy[1] < lane_hi:
            return False
    return bool(blocks[target, 1] <= 0.06)  # room ahead on the table


def _place_success(env: "TabletopEnv") -> bool:
    c = env.target_color
    rel = env.block_pos(c) - env.tray_pos()
    inside = bool(np.all(np.abs(rel[:2]) < TRAY_INNER_HALF - BLOCK_HALF * 0.5))
    resting = rel[2] < TRAY_FLOOR_TOP + BLOCK_HALF + 0.012
    return inside and resting and not env.touching_fingers(c)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "reach",
            (
                "touch the {color} block",
                "reach for the {color} cube",
                "move the gripper to the {color} block",
                "go to the {color} cube",
                "put your gripper on the {color} block",
            ),
            _reach_success,
            experts.ReachExpert,
        ),
        Task(
            "lift",
            (
                "pick up the {color} block",
                "lift the {color} cube",
                "grab the {color} block and raise it",
                "take the {color} cube off the table",
                "raise the {color} block",
            ),
            _lift_success,
            experts.LiftExpert,
        ),
        Task(
            "push",
            (
                "push the {color} block forward",
                "slide the {color} cube away from you",
                "push the {color} cube forward",
                "shove the {color} block away from the camera",
                "nudge the {color} block forward",
            ),
            _push_success,
            experts.PushExpert,
            _push_lane_clear,
        ),
        Task(
            "place",
            (
                "put the {color} block in the tray",
                "place the {color} cube into the bowl",
                "drop the {color} block in the tray",
                "move the {color} cube to the tray",
                "pick up the {color} block and put it in the bowl",
            ),
            _place_success,
            experts.PlaceExpert,
        ),
    )
}
