"""What a tabletop task is (`Task`, `Episode`) and the scene queries and memory-task timing that several
task modules share (envs/tasks.py: the registry and the reactive tasks; envs/memory_tasks.py: the memory
benchmark)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from envs import experts
from envs.scene import BLOCK_HALF, GO_STEP, LAMP_DARK, OBJECTS, SHAPES, TRAY_INNER_HALF

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

TOUCH_RADIUS = 0.035  # cue_touch: tcp this close to an object centre (or a finger contact) touches it
LAMP_WHITE = (1.0, 1.0, 1.0)
# Memory-task timing (control steps). cue_touch: the cue is lit in observations 0..CUE_STEPS-1,
# dark until GO_STEP, then white ("go"); touching anything before GO_STEP fails the episode.
# At GO_STEP the newest 6 frames (GO_STEP-5..GO_STEP) all show a dark or white lamp and a still arm.
CUE_STEPS = 3
# GO_STEP lives in envs/scene.py: the experts need it, and the task modules import the experts.
# put_back: the lamp turns white once the object was held over the tray for HOLD_STEPS steps.
HOLD_STEPS = 8


@dataclass(frozen=True)
class Episode:
    """What a task chose for one episode (object slots, pad name, push direction, cue colour)."""

    target: str
    other: str | None = None
    pad: str | None = None
    direction: str | None = None
    cue: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    templates: tuple[str, ...]
    success: Callable[["TabletopEnv"], bool]  # called once per step; may update env.task_state
    expert: type[experts.WaypointExpert]
    max_steps: int = 60
    # Picks the episode's objects given the slot colours.
    choose: Callable[[np.random.Generator, dict[str, str]], Episode] = field(
        default=lambda rng, colors: Episode(target=OBJECTS[rng.integers(len(OBJECTS))])
    )
    # Extra layout constraint on (object xy by slot, tray xy, pad xy by name, episode).
    layout_ok: Callable[[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], Episode], bool] = (
        lambda objects, tray, pads, episode: True
    )
    distinct_colors: bool = False  # all three objects get different colours
    uses_pads: bool = False
    memory: bool = False
    lamp: Callable[["TabletopEnv"], tuple[float, float, float]] = lambda env: LAMP_DARK
    drawer_start: Callable[[np.random.Generator], float] = lambda rng: 0.0  # drawer opening at reset (m)
    # Memory benchmark (envs/memory_tasks.py): the colour names (scene.PAINT_RGB) objects and pads show at
    # this step, recomputed every step like the lamp; slots and pads it leaves out show scene.NEUTRAL.
    paint: Callable[["TabletopEnv"], dict[str, str]] | None = None
    target_on_pad: bool = False  # the target starts centred on the episode's pad
    go_bar: bool = False  # the go bar on the table's front edge shows the lamp's colour (scene.GO_BAR_POS)
    chance: float | None = None  # memory tasks: success rate of a policy that cannot remember (stated, not fitted)
    control_of: str | None = None  # a control variant: the memory task whose information it shows at decision time


def describe(slot: str, colors: dict[str, str]) -> str:
    return f"{colors[slot]} {SHAPES[slot]}"


# ---- scene queries and detectors shared by task modules --------------------------------------


def on_table(env: "TabletopEnv", slot: str) -> bool:
    return bool(env.object_pos(slot)[2] < BLOCK_HALF + 0.01)


def touched(env: "TabletopEnv") -> list[str]:
    tcp = env.gripper_pos()
    return [s for s in OBJECTS if np.linalg.norm(tcp - env.object_pos(s)) < TOUCH_RADIUS or env.touching_fingers(s)]


def cue_touch_success(env: "TabletopEnv") -> bool:
    state = env.task_state
    if "first_touch" not in state:
        now = touched(env)
        if now:
            # Too early or the wrong object: the episode cannot succeed any more.
            state["first_touch"] = now[0] if env.step_count >= GO_STEP and len(now) == 1 else "invalid"
    return state.get("first_touch") == env.target


def over_tray(env: "TabletopEnv", slot: str) -> bool:
    rel = env.object_pos(slot) - env.tray_pos()
    return bool(np.all(np.abs(rel[:2]) < TRAY_INNER_HALF) and rel[2] > 0.06 and env.grasped(slot))


def hold_for_go(env: "TabletopEnv", holding: bool) -> None:
    """The go light of the hold-then-act tasks: on once `holding` was true for HOLD_STEPS steps in a row."""
    state = env.task_state
    if state.get("go", False):
        return
    state["held"] = state.get("held", 0) + 1 if holding else 0
    state["go"] = state["held"] >= HOLD_STEPS
    if state["go"]:
        state["go_step"] = env.step_count


def go_lamp(env: "TabletopEnv") -> tuple[float, float, float]:
    return LAMP_WHITE if env.task_state.get("go", False) else LAMP_DARK
