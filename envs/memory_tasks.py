"""The memory benchmark: four memory tasks of different kinds, each with a control variant.

Perception is made easy so that the tasks measure memory: the cue is a whole object or pad painted in a
vivid colour (scene.PAINT_RGB) on dark-grey (scene.NEUTRAL) objects and pads, and the go signal is the lamp
and a bar along the table's front edge (scene.GO_BAR_POS, which the arm cannot hide) turning white. In a
memory task the cue is gone before the decision: at the decision every object and pad looks alike, the
arm has stood still (or held over the tray) for at least 6 steps, so neither the current frame nor a
6-frame window tells the answer. Each control shows the needed information at decision time
and is otherwise the same episode; a policy that fails a control fails its memory task for other reasons.

| task (kind) | what must be carried | chance without memory |
| --- | --- | --- |
| `which_object` (which object) | the object painted red in observations 0-2 | 1/3 |
| `touch_order` (order) | which object lit first (obs 0-2) and which second (obs 3-5) | 1/6 |
| `which_pad` (where) | which of two pads the object started on, over its pick-up and hold | 1/2 |
| `press_again` (which one was done) | which of two pads the policy itself pressed | 1/2 |

Every first decision is final: a wrong touch, press or set-down fails the episode for good, so a
memoryless policy cannot reach more than chance by trying every answer in turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from envs import experts
from envs.scene import GO_STEP, LAMP_DARK, OBJECTS, PAD_HALF, PADS, TRAY_INNER_HALF
from envs.task_spec import CUE_STEPS, LAMP_WHITE, Episode, Task, cue_touch_success, go_lamp, hold_for_go
from envs.task_spec import on_table, over_tray, touched

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

LIT = "red"  # the cue: what to touch, press or remember
DONE = "blue"  # controls: the pad that was pressed, or the pad the object came from
PRESS_Z = 0.03  # press_again: the fingertips this low over a pad press it ...
RELEASE_Z = 0.05  # ... and the press lasts until they rise this high (a jitter at the pad is one press)
TRAY_HOLD_Z = 0.06  # press_again: the tcp this high over the tray counts as waiting there


def _timed_go_lamp(env: "TabletopEnv") -> tuple[float, float, float]:
    return LAMP_WHITE if env.step_count >= GO_STEP else LAMP_DARK


def _choose_object(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    return Episode(target=OBJECTS[rng.integers(len(OBJECTS))])


def _choose_two_objects(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    first, second = rng.permutation(len(OBJECTS))[:2]
    return Episode(target=OBJECTS[first], other=OBJECTS[second])


def _choose_object_and_pad(rng: np.random.Generator, colors: dict[str, str]) -> Episode:
    return Episode(target=OBJECTS[rng.integers(len(OBJECTS))], pad=PADS[rng.integers(len(PADS))])


def _fail(env: "TabletopEnv", why: str) -> bool:
    env.task_state.setdefault("failed", why)
    return False


# ---- which_object: touch the object that was lit ------------------------------------------------


def _which_object_paint(env: "TabletopEnv") -> dict[str, str]:
    return {env.target: LIT} if env.step_count < CUE_STEPS else {}


def _which_object_shown_paint(env: "TabletopEnv") -> dict[str, str]:
    return {env.target: LIT}


# ---- touch_order: touch the two lit objects in the order they lit --------------------------------


def _touch_order_success(env: "TabletopEnv") -> bool:
    state = env.task_state
    order = [env.target, env.episode.other]
    seq = state.setdefault("touches", [])
    if "failed" in state:
        return False
    now = touched(env)
    if now:
        if env.step_count < GO_STEP or len(now) > 1:
            return _fail(env, "early" if env.step_count < GO_STEP else "two at once")
        if not seq or seq[-1] != now[0]:
            seq.append(now[0])
        if seq != order[: len(seq)]:
            return _fail(env, "wrong order")
    return seq == order


def _touch_order_paint(env: "TabletopEnv") -> dict[str, str]:
    if env.step_count < CUE_STEPS:
        return {env.target: LIT}
    if env.step_count < 2 * CUE_STEPS:
        return {env.episode.other: LIT}
    return {}


def _touch_order_shown_paint(env: "TabletopEnv") -> dict[str, str]:
    # The one to touch next is lit: the first until it was touched, then the second.
    return {env.episode.other if env.task_state.get("touches") else env.target: LIT}


# ---- which_pad: put the object back on the pad it came from --------------------------------------


def pad_under(env: "TabletopEnv", xy: np.ndarray) -> str | None:
    """The pad whose square contains the point xy, if any."""
    return next((p for p in PADS if np.all(np.abs(xy[:2] - env.pad_pos(p)[:2]) < PAD_HALF)), None)


def _which_pad_success(env: "TabletopEnv") -> bool:
    state, t = env.task_state, env.target
    if not state.get("go", False):
        hold_for_go(env, over_tray(env, t))
        return False
    if "placed_on" not in state and on_table(env, t) and not env.touching_fingers(t):
        # The first set-down after the go light decides: on a pad, or elsewhere on the table.
        state["placed_on"] = pad_under(env, env.object_pos(t)) or "table"
    return state.get("placed_on") == env.episode.pad


def _which_pad_paint(env: "TabletopEnv") -> dict[str, str]:
    return {env.target: LIT}


def _which_pad_shown_paint(env: "TabletopEnv") -> dict[str, str]:
    return {env.target: LIT, env.episode.pad: DONE}


# ---- press_again: press the pad pressed before, after waiting over the tray ----------------------


def _over_tray_tcp(env: "TabletopEnv") -> bool:
    rel = env.gripper_pos() - env.tray_pos()
    return bool(np.all(np.abs(rel[:2]) < TRAY_INNER_HALF) and rel[2] > TRAY_HOLD_Z)


def _press_again_success(env: "TabletopEnv") -> bool:
    state, pad = env.task_state, env.episode.pad
    tcp = env.gripper_pos()
    over, down = pad_under(env, tcp), state.get("down")
    if down is not None and (tcp[2] > RELEASE_Z or over != down):
        down = None  # released: the fingertips rose well clear of the pad, or left it
    pressed = down is None and over is not None and tcp[2] < PRESS_Z  # a press starts when the fingertips arrive
    if pressed:
        down = over
    state["down"] = down
    if "failed" in state or state.get("pressed_again"):
        return bool(state.get("pressed_again"))
    if "first_press" not in state:
        if pressed:
            if down != pad:
                return _fail(env, "pressed the unlit pad")
            state["first_press"] = env.step_count
        return False
    if not state.get("go", False):
        if pressed:
            return _fail(env, "pressed before the go light")
        hold_for_go(env, _over_tray_tcp(env))
        return False
    if pressed:
        if down != pad:
            return _fail(env, "pressed the other pad")
        state["pressed_again"] = True
    return bool(state.get("pressed_again"))


def _press_again_paint(env: "TabletopEnv") -> dict[str, str]:
    return {} if "first_press" in env.task_state else {env.episode.pad: LIT}


def _press_again_shown_paint(env: "TabletopEnv") -> dict[str, str]:
    return {env.episode.pad: DONE if "first_press" in env.task_state else LIT}


_TOUCH_LIT = (
    "touch the object that lights up, once the lamp turns white",
    "remember which object lit up, wait for the white light, then touch it",
    "when the light goes white, touch the object that was lit",
    "watch which object lights, wait for white, then go to that object",
)
_TOUCH_ORDER = (
    "touch the objects in the order they light up, once the lamp turns white",
    "remember which object lit first and which second, then on white touch them in that order",
    "when the light goes white, touch the first lit object and then the second",
    "watch the objects light one after the other, wait for white, then touch them in the same order",
)
_WHICH_PAD = (
    "pick up the red object, hold it over the tray until the light turns white, then put it back on its pad",
    "lift the red object above the tray, wait for the white light, and return it to the pad it came from",
    "hold the red object over the tray until the lamp is white, then set it down on the pad where it started",
    "take the red object over the tray, and when the light turns white put it back on its own pad",
)
_PRESS_AGAIN = (
    "press the lit pad, wait over the tray until the light turns white, then press the same pad again",
    "touch the pad that lights up, hold over the tray for the white light, and press that pad once more",
    "press the red pad, go and wait above the tray, and on white press the pad you pressed before",
    "push down on the lit pad, then wait over the tray, then when the lamp is white press it again",
)


def _pair(name: str, kind_templates: tuple[str, ...], control_templates: tuple[str, ...], chance: float,
          paint, shown_paint, **common) -> tuple[Task, Task]:
    """A memory task and its control: the same episodes, success check, expert and timing."""
    return (Task(name, kind_templates, memory=True, chance=chance, paint=paint, go_bar=True, **common),
            Task(f"{name}_shown", control_templates, control_of=name, paint=shown_paint, go_bar=True, **common))


MEMORY_BENCHMARK: dict[str, Task] = {
    t.name: t
    for pair in (
        _pair("which_object", _TOUCH_LIT,
              ("touch the red object once the lamp turns white", "wait for the white light, then touch the red object",
               "when the light goes white, touch the red one", "on the white light, go to the red object"),
              1 / 3, _which_object_paint, _which_object_shown_paint, success=cue_touch_success,
              expert=experts.CueTouchExpert, max_steps=50, choose=_choose_object, lamp=_timed_go_lamp),
        _pair("touch_order", _TOUCH_ORDER,
              ("once the lamp turns white, touch the red object, then the one that turns red next",
               "wait for white, then touch whichever object is red, and then the next red one",
               "on the white light touch the red object and then the newly red one",
               "when the light goes white, touch the red object, then touch the object that becomes red"),
              1 / 6, _touch_order_paint, _touch_order_shown_paint, success=_touch_order_success,
              expert=experts.TouchOrderExpert, max_steps=60, choose=_choose_two_objects, lamp=_timed_go_lamp),
        _pair("which_pad", _WHICH_PAD,
              ("pick up the red object, hold it over the tray until the light turns white, then put it on the blue pad",
               "lift the red object above the tray, wait for the white light, and set it on the blue pad",
               "hold the red object over the tray until the lamp is white, then set it down on the blue pad",
               "take the red object over the tray, and when the light turns white put it on the blue pad"),
              1 / 2, _which_pad_paint, _which_pad_shown_paint, success=_which_pad_success,
              expert=experts.PutBackExpert, max_steps=100, choose=_choose_object_and_pad, lamp=go_lamp,
              uses_pads=True, target_on_pad=True),
        _pair("press_again", _PRESS_AGAIN,
              ("press the red pad, wait over the tray until the light turns white, then press the blue pad",
               "touch the red pad, hold over the tray for the white light, and then press the blue pad",
               "press the red pad, go and wait above the tray, and on white press the blue pad",
               "push down on the red pad, wait over the tray, and when the lamp is white press the blue one"),
              1 / 2, _press_again_paint, _press_again_shown_paint, success=_press_again_success,
              expert=experts.PressAgainExpert, max_steps=80, choose=_choose_object_and_pad, lamp=go_lamp,
              uses_pads=True),
    )
    for t in pair
}
