"""Task registry (`TASKS`): the reactive tasks and the first two memory tasks defined here, then the memory
benchmark (envs/memory_tasks.py). Per task: what it picks per episode, its instruction templates, success
check, layout constraint, episode limit and what the cue lamp shows (`Task` in envs/task_spec.py).

A task only reads the scene through the env's privileged accessors (object_pos, gripper_pos,
...), so adding a task means adding one `Task` entry plus its expert in experts.py.

Instruction templates use the slots {obj} ("red cube"), {other} (a second object), {pad}
(a pad colour) and {direction}; memory tasks use none that would give the answer away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from envs import experts
from envs.memory_tasks import MEMORY_BENCHMARK
from envs.scene import (
    BLOCK_HALF,
    DIRECTIONS,
    DRAWER_KEEPOUT_HIGH,
    DRAWER_KEEPOUT_LOW,
    GO_STEP,
    LAMP_DARK,
    OBJECTS,
    PAD_HALF,
    PADS,
    RGB,
    TRAY_FLOOR_TOP,
    TRAY_INNER_HALF,
)
from envs.task_spec import CUE_STEPS, LAMP_WHITE, Episode, Task, cue_touch_success, go_lamp, hold_for_go
from envs.task_spec import on_table, over_tray

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

REACH_RADIUS = 0.03
LIFT_HEIGHT = 0.05
PUSH_DISTANCE = 0.08
PUT_BACK_RADIUS = 0.03
DRAWER_OPEN = 0.08  # open_drawer: pulled out at least this far (m); travel is 0.12
DRAWER_CLOSED = 0.01  # close_drawer: pushed back to within this (starts 0.08-0.11 open)


# ---- success checks -------------------------------------------------------------------------


def _reach_success(env: "TabletopEnv") -> bool:
    return bool(np.linalg.norm(env.gripper_pos() - env.object_pos(env.target)) < REACH_RADIUS)


def _lift_success(env: "TabletopEnv") -> bool:
    t = env.target
    return bool(env.object_pos(t)[2] >= BLOCK_HALF + LIFT_HEIGHT and env.grasped(t))


def _push_success(env: "TabletopEnv") -> bool:
    t = env.target
    moved = (env.object_pos(t) - env.object_start_pos(t))[:2] @ DIRECTIONS[env.episode.direction or "forward"]
    return bool(moved >= PUSH_DISTANCE and on_table(env, t))


def _place_success(env: "TabletopEnv") -> bool:
    t = env.target
    rel = env.object_pos(t) - env.tray_pos()
    inside = bool(np.all(np.abs(rel[:2]) < TRAY_INNER_HALF - BLOCK_HALF * 0.5))
    resting = rel[2] < TRAY_FLOOR_TOP + BLOCK_HALF + 0.012
    return inside and resting and not env.touching_fingers(t)


def _pad_success(env: "TabletopEnv") -> bool:
    t = env.target
    rel = env.object_pos(t)[:2] - env.pad_pos(env.episode.pad)[:2]
    return bool(np.all(np.abs(rel) < PAD_HALF) and on_table(env, t) and not env.touching_fingers(t))


def _stack_success(env: "TabletopEnv") -> bool:
    t, base = env.target, env.episode.other
    top, bottom = env.object_pos(t), env.object_pos(base)
    aligned = np.linalg.norm(top[:2] - bottom[:2]) < BLOCK_HALF
    on_top = abs(top[2] - bottom[2] - 2 * BLOCK_HALF) < 0.01
    return bool(aligned and on_top and on_table(env, base) and not env.touching_fingers(t))


def _cue_lamp(env: "TabletopEnv") -> tuple[float, float, float]:
    if env.step_count < CUE_STEPS:
        return RGB[env.episode.cue]
    return LAMP_WHITE if env.step_count >= GO_STEP else LAMP_DARK


def _cue_lit_lamp(env: "TabletopEnv") -> tuple[float, float, float]:
    # cue_touch_lit, the control without the memory demand: the cue stays lit until the go light, so
    # the last frames before the decision (and any 6-frame window at it) show it.
    return LAMP_WHITE if env.step_count >= GO_STEP else RGB[env.episode.cue]


def _put_back_success(env: "TabletopEnv") -> bool:
    state, t = env.task_state, env.target
    if not state.get("go", False):
        hold_for_go(env, over_tray(env, t))
        return False
    offset = float(np.linalg.norm(env.object_pos(t)[:2] - env.object_start_pos(t)[:2]))
    # Kept for the eval record: how far from its start the object is at the episode's end.
    state["distance_from_start"] = round(offset, 4)
    return bool(offset < PUT_BACK_RADIUS and on_table(env, t) and not env.touching_fingers(t))


def _drawer_open_success(env: "TabletopEnv") -> bool:
    return env.drawer_opening() >= DRAWER_OPEN


def _drawer_closed_success(env: "TabletopEnv") -> bool:
    return env.drawer_opening() <= DRAWER_CLOSED


# ---- episode choices and layout constraints ---------------------------------------------------


def _choose_stack(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    base = ("cube_a", "cube_b")[rng.integers(2)]  # only cubes have a flat top to stack on
    others = [s for s in OBJECTS if s != base]
    return Episode(target=others[rng.integers(len(others))], other=base)


def _choose_direction(names: tuple[str, ...]) -> Callable[[np.random.Generator, dict[str, str]], Episode]:
    def choose(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
        return Episode(target=OBJECTS[rng.integers(len(OBJECTS))], direction=names[rng.integers(len(names))])

    return choose


def _choose_pad(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    return Episode(target=OBJECTS[rng.integers(len(OBJECTS))], pad=PADS[rng.integers(len(PADS))])


def _choose_cylinder(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    return Episode(target="cylinder")


def _choose_cue(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    target = OBJECTS[rng.integers(len(OBJECTS))]
    return Episode(target=target, cue=colors[target])


def _lane_clear(objects: dict[str, np.ndarray], tray: np.ndarray, pads: dict[str, np.ndarray], ep: Episode) -> bool:
    """Nothing else within the strip the gripper sweeps (from behind the object to past its goal)."""
    d = DIRECTIONS[ep.direction or "forward"]
    side = np.array([-d[1], d[0]])
    start = objects[ep.target]
    # (centre, half-width across the lane, how far it reaches along it): the tray is 16 cm wide.
    others = [(xy, 0.085, 0.0) for s, xy in objects.items() if s != ep.target] + [(tray, 0.15, 0.08)]
    for xy, half_width, extent in others:
        rel = xy - start
        if abs(rel @ side) < half_width and -0.12 - extent < rel @ d < 0.20 + extent:
            return False
    goal = start + d * 0.13
    in_drawer_zone = bool(np.all(goal > DRAWER_KEEPOUT_LOW - 0.03) and np.all(goal < DRAWER_KEEPOUT_HIGH + 0.03))
    return bool(-0.26 < goal[0] < 0.26 and goal[1] < 0.22) and not in_drawer_zone  # room ahead on the table


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "reach",
            (
                "touch the {obj}",
                "reach for the {obj}",
                "move the gripper to the {obj}",
                "go to the {obj}",
                "put your gripper on the {obj}",
            ),
            _reach_success,
            experts.ReachExpert,
        ),
        Task(
            "lift",
            (
                "pick up the {obj}",
                "lift the {obj}",
                "grab the {obj} and raise it",
                "take the {obj} off the table",
                "raise the {obj}",
            ),
            _lift_success,
            experts.LiftExpert,
        ),
        Task(
            "push",
            (
                "push the {obj} forward",
                "slide the {obj} away from you",
                "push the {obj} away from the camera",
                "shove the {obj} forward",
                "nudge the {obj} forward",
            ),
            _push_success,
            experts.PushExpert,
            choose=_choose_direction(("forward",)),
            layout_ok=_lane_clear,
        ),
        Task(
            "place",
            (
                "put the {obj} in the tray",
                "place the {obj} into the tray",
                "drop the {obj} in the tray",
                "move the {obj} to the tray",
                "pick up the {obj} and put it in the tray",
            ),
            _place_success,
            experts.PlaceExpert,
            max_steps=80,
        ),
        Task(
            "slide",
            (
                "push the {obj} to the {direction}",
                "slide the {obj} {direction}",
                "to the {direction}, push the {obj}",
                "move the {obj} to the {direction} by pushing it",
                "nudge the {obj} toward the {direction}",
            ),
            _push_success,
            experts.PushExpert,
            choose=_choose_direction(("left", "right")),
            layout_ok=_lane_clear,
        ),
        Task(
            "stack",
            (
                "stack the {obj} on the {other}",
                "put the {obj} on top of the {other}",
                "place the {obj} onto the {other}",
                "on the {other}, stack the {obj}",
                "pick up the {obj} and set it on the {other}",
            ),
            _stack_success,
            experts.StackExpert,
            max_steps=80,
            choose=_choose_stack,
        ),
        Task(
            "place_on_pad",
            (
                "put the {obj} on the {pad} pad",
                "place the {obj} onto the {pad} square",
                "move the {obj} to the {pad} pad",
                "on the {pad} pad, put the {obj}",
                "pick up the {obj} and set it down on the {pad} pad",
            ),
            _pad_success,
            experts.PadExpert,
            max_steps=80,
            choose=_choose_pad,
            uses_pads=True,
        ),
        Task(
            "pick_shape",
            (
                "pick up the cylinder",
                "lift the round one",
                "grab the cylinder and raise it",
                "raise the cylinder off the table",
            ),
            _lift_success,
            experts.LiftExpert,
            choose=_choose_cylinder,
        ),
        Task(
            "place_shape",
            (
                "put the cylinder in the tray",
                "place the round object into the tray",
                "drop the cylinder into the tray",
                "move the cylinder to the tray",
            ),
            _place_success,
            experts.PlaceExpert,
            max_steps=80,
            choose=_choose_cylinder,
        ),
        Task(
            "open_drawer",
            (
                "open the drawer",
                "pull the drawer open",
                "pull out the drawer",
                "slide the drawer open by its handle",
            ),
            _drawer_open_success,
            experts.OpenDrawerExpert,
        ),
        Task(
            "close_drawer",
            (
                "close the drawer",
                "push the drawer shut",
                "slide the drawer closed",
                "push the open drawer back in",
            ),
            _drawer_closed_success,
            experts.CloseDrawerExpert,
            drawer_start=lambda rng: float(rng.uniform(0.08, 0.11)),
        ),
        Task(
            "cue_touch",
            (
                "remember the colour of the light, and when it turns white touch the object of that colour",
                "watch the lamp, wait for it to turn white, then touch the object that had its colour",
                "when the light goes white, touch the object whose colour the light showed first",
                "note the lamp colour, wait for white, then go to the object of that colour",
            ),
            cue_touch_success,
            experts.CueTouchExpert,
            max_steps=50,
            choose=_choose_cue,
            distinct_colors=True,
            memory=True,
            lamp=_cue_lamp,
        ),
        # The same task with the cue lit until the go light: what a policy achieves on cue_touch when
        # remembering is not needed (the colour-matching and reaching alone), for comparison.
        Task(
            "cue_touch_lit",
            (
                "when the coloured light turns white, touch the object of the colour it showed",
                "wait for the lamp to go from its colour to white, then touch the object of that colour",
                "touch the object matching the lamp's colour once the lamp turns white",
                "the light shows a colour, then white, and on white you go to the object of its colour",
            ),
            cue_touch_success,
            experts.CueTouchExpert,
            max_steps=50,
            choose=_choose_cue,
            distinct_colors=True,
            lamp=_cue_lit_lamp,
        ),
        Task(
            "put_back",
            (
                "pick up the {obj}, hold it over the tray until the light turns white, then put it back where it was",
                "lift the {obj} above the tray, wait for the white light, and return it to its spot",
                "hold the {obj} over the tray until the lamp is white, then set it down where it started",
                "take the {obj} over the tray, and when the light turns white put it back in its place",
            ),
            _put_back_success,
            experts.PutBackExpert,
            max_steps=100,
            memory=True,
            lamp=go_lamp,
        ),
    )
}
TASKS.update(MEMORY_BENCHMARK)  # the memory benchmark: envs/memory_tasks.py
