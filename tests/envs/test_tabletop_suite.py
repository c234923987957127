"""The arm tabletop suite: every task's specs, seeding, success detectors (negative cases), experts,
memory-task cue hiding on rendered frames, joint limits, IK accuracy and input validation."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np
import pytest

from envs.experts import make_expert
from envs.ik import DampedLeastSquaresIK
from envs.scene import ARM_JOINTS, BLOCK_HALF, COLORS, OBJECTS, PADS, RGB, SHAPES, WORKSPACE_HIGH, WORKSPACE_LOW
from envs.tabletop import GRIPPER_DOWN, TabletopEnv, task_max_steps, task_names
from envs.scene import GO_STEP
from envs.task_spec import CUE_STEPS, HOLD_STEPS
from envs.tasks import PUT_BACK_RADIUS, TASKS

ALL_TASKS = task_names()
MEMORY_TASKS = [t for t in ALL_TASKS if TASKS[t].memory]


def _rollout(env, seed, noise=0.0, on_step=None):
    expert = make_expert(env, noise=noise, seed=0)
    ts = env.reset(seed=seed)
    steps = [ts]
    while not ts.last():
        ts = env.step(expert.act(ts))
        steps.append(ts)
        if on_step is not None:
            on_step(env, ts)
    return steps


def _teleport(env, slot, xyz):
    q = env._obj_qpos[slot]
    env.data.qpos[q : q + 7] = [*xyz, 1, 0, 0, 0]
    env.data.qvel[:] = 0
    mujoco.mj_forward(env.model, env.data)


def _settle(env, steps=10):
    for _ in range(steps):
        mujoco.mj_step(env.model, env.data, nstep=20)


def test_suite_size_and_instructions():
    assert len(ALL_TASKS) >= 10 and len(MEMORY_TASKS) >= 2
    assert {"reach", "lift", "push", "place"} <= set(ALL_TASKS)
    from envs.gym_wrapper import INSTRUCTION_CHARSET

    for name, task in TASKS.items():
        assert len(task.templates) >= 4, name
        assert len(set(task.templates)) == len(task.templates), name
        # Filled-in instructions must fit the gymnasium Text space.
        for t in task.templates:
            assert set(t.replace("{", "").replace("}", "").replace("_", "")) <= set(INSTRUCTION_CHARSET), t


@pytest.mark.parametrize("task", ALL_TASKS)
def test_specs_match_observations(make_env, task):
    env = make_env(task, image_size=24, render=True, wrist_image=task == "cue_touch")
    obs_spec = env.observation_spec()
    ts = env.reset(seed=1)
    for _ in range(3):
        assert set(ts.observation) == set(obs_spec)
        for key, spec in obs_spec.items():
            spec.validate(ts.observation[key])
        ts = env.step(env.action_spec().generate_value())
    assert env.max_steps == task_max_steps(task)  # max_steps=None means the task's own limit


@pytest.mark.parametrize("task", ["stack", "cue_touch", "place_on_pad"])
def test_reset_is_a_function_of_the_seed(make_env, task):
    a, b = make_env(task, image_size=32, render=True), make_env(task, image_size=32, render=True)
    first, again = a.reset(seed=11).observation, b.reset(seed=11).observation
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["state"], again["state"])
    assert first["instruction"] == again["instruction"]
    assert all(np.array_equal(a.object_pos(s), b.object_pos(s)) for s in OBJECTS)
    layouts = set()
    for seed in range(6):
        a.reset(seed=seed)
        layouts.add(tuple(np.round(a.object_pos("cube_a"), 4)))
    assert len(layouts) == 6


def test_instructions_name_colour_and_shape_and_memory_tasks_hide_the_answer(make_env):
    for task in ("reach", "lift", "stack", "place_on_pad", "put_back"):
        env = make_env(task)
        for seed in range(8):
            text = env.reset(seed=seed).observation["instruction"].item()
            assert f"{env.target_color} {SHAPES[env.target]}" in text, (task, text)
    env = make_env("cue_touch")
    for seed in range(10):
        text = env.reset(seed=seed).observation["instruction"].item()
        assert not any(c in text for c in COLORS) and not any(s in text for s in ("cube", "cylinder")), text
        colours = [env.color_of(s) for s in OBJECTS]
        assert len(set(colours)) == 3 and env.episode.cue == env.target_color


def test_shape_matters_cylinder_can_share_a_cube_colour(make_env):
    env = make_env("lift")
    shared = 0
    for seed in range(40):
        env.reset(seed=seed)
        assert env.color_of("cube_a") != env.color_of("cube_b")
        shared += env.color_of("cylinder") in (env.color_of("cube_a"), env.color_of("cube_b"))
    assert shared >= 10


# ---- success detectors: negative (and matching positive) cases --------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_no_success_at_reset_or_when_idle(make_env, task):
    env = make_env(task)
    for seed in range(3):
        ts = env.reset(seed=seed)
        assert env.last_info["success"] is False
        for _ in range(3):
            ts = env.step(np.zeros(5, np.float32))
        assert not ts.last() and env.success is False


def test_reach_detector_needs_the_named_object(make_env):
    env = make_env("reach")
    env.reset(seed=0)
    other = next(s for s in OBJECTS if s != env.target)
    _teleport(env, other, env.gripper_pos())  # another object at the fingertips
    assert not TASKS["reach"].success(env)
    _teleport(env, env.target, env.gripper_pos())
    assert TASKS["reach"].success(env)


def test_lift_detector_needs_a_grasp(make_env):
    env = make_env("lift")
    env.reset(seed=0)
    _teleport(env, env.target, [0.0, 0.0, 0.2])  # in the air, but not held
    assert not TASKS["lift"].success(env)


def test_place_detector_rejects_held_over_tray_and_beside_tray(make_env):
    env = make_env("place", end_on_success=False)
    seen_held_over_tray = []

    def check(env, ts):
        rel = env.object_pos(env.target) - env.tray_pos()
        if env.grasped(env.target) and np.all(np.abs(rel[:2]) < 0.05):
            seen_held_over_tray.append(env.success)

    _rollout(env, seed=3, on_step=check)
    assert seen_held_over_tray and not any(seen_held_over_tray)
    env.reset(seed=3)
    _teleport(env, env.target, env.tray_pos() + [0.16, 0, BLOCK_HALF])
    assert not TASKS["place"].success(env)


def test_push_and_slide_detectors_need_the_right_direction(make_env):
    env = make_env("slide")
    for seed in range(6):
        env.reset(seed=seed)
        d = {"left": np.array([-1, 0]), "right": np.array([1, 0])}[env.episode.direction]
        start = env.object_start_pos(env.target)
        _teleport(env, env.target, [*(start[:2] - 0.1 * d), BLOCK_HALF])
        assert not TASKS["slide"].success(env)
        _teleport(env, env.target, [*(start[:2] + 0.1 * d), BLOCK_HALF])
        assert TASKS["slide"].success(env)
    env = make_env("push")
    env.reset(seed=0)
    start = env.object_start_pos(env.target)
    _teleport(env, env.target, start + [0.1, 0, 0])  # sideways is not forward
    assert not TASKS["push"].success(env)


def test_pad_detector_needs_the_named_pad(make_env):
    env = make_env("place_on_pad")
    env.reset(seed=2)
    wrong = next(p for p in PADS if p != env.episode.pad)
    _teleport(env, env.target, [*env.pad_pos(wrong)[:2], BLOCK_HALF])
    assert not TASKS["place_on_pad"].success(env)
    _teleport(env, env.target, [*env.pad_pos(env.episode.pad)[:2], BLOCK_HALF])
    assert TASKS["place_on_pad"].success(env)


def test_stack_detector_needs_the_named_base(make_env):
    env = make_env("stack")
    env.reset(seed=1)
    base = env.episode.other
    wrong = next(s for s in OBJECTS if s not in (base, env.target))
    _teleport(env, env.target, env.object_pos(wrong) + [0, 0, 2 * BLOCK_HALF])
    assert not TASKS["stack"].success(env)
    _teleport(env, env.target, env.object_pos(base) + [0.05, 0, 0])  # beside the base
    assert not TASKS["stack"].success(env)


def test_cue_touch_fails_on_early_or_wrong_touch(make_env):
    env = make_env("cue_touch")
    env.reset(seed=4)
    wrong = next(s for s in OBJECTS if s != env.target)
    env._step_count = GO_STEP
    _teleport(env, wrong, env.gripper_pos())
    assert not TASKS["cue_touch"].success(env)
    _teleport(env, env.target, env.gripper_pos())  # the right one after a wrong one: still a failure
    assert not TASKS["cue_touch"].success(env)

    env.reset(seed=4)
    env._step_count = GO_STEP - 2  # the right object, but before the go light
    _teleport(env, env.target, env.gripper_pos())
    assert not TASKS["cue_touch"].success(env)
    env._step_count = GO_STEP + 5
    assert not TASKS["cue_touch"].success(env)


def test_put_back_needs_the_hold_over_the_tray(make_env):
    env = make_env("put_back")
    env.reset(seed=5)
    _teleport(env, env.target, env.object_start_pos(env.target))  # never moved: not done
    assert not TASKS["put_back"].success(env)
    assert env.task_state["go"] is False


# ---- experts -------------------------------------------------------------------------------


PICKING_EXPERTS = {"lift", "place", "slide", "stack", "place_on_pad", "pick_shape", "place_shape", "put_back",
                   "which_pad", "which_pad_shown"}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_expert_succeeds(make_env, task):
    env = make_env(task)
    for seed, noise in ((100, 0.0), (101, 0.0), (102, 0.2), (103, 0.2)):
        steps = _rollout(env, seed, noise)
        assert env.success and steps[-1].reward == 1.0, f"{task} seed {seed} noise {noise}"
        assert env.step_count <= env.max_steps
        # the eval record's first_grasped: the named object for the experts that pick; the others grasp
        # nothing without noise (with it, a push can close the fingers around the object)
        if task in PICKING_EXPERTS or noise == 0.0:
            assert env.task_state.get("first_grasped") == (env.target if task in PICKING_EXPERTS else None)


def test_expert_moves_smoothly(make_env):
    """Demonstrations, not teleports: the tcp moves at most ~MAX_DELTA per step."""
    env = make_env("put_back")
    positions = [ts.observation["state"][:3] for ts in _rollout(env, seed=0)]
    jumps = np.linalg.norm(np.diff(np.array(positions), axis=0), axis=1)
    assert jumps.max() < 0.03


@pytest.mark.parametrize("task", ["put_back", "slide", "place"])
def test_joint_limits_hold_during_expert_episodes(make_env, task):
    env = make_env(task)
    low, high = env.joint_limits()
    qs = []
    _rollout(env, seed=7, noise=0.2, on_step=lambda env, ts: qs.append(env.arm_qpos()))
    qs = np.array(qs)
    assert np.all(qs >= low - 1e-3) and np.all(qs <= high + 1e-3)


def test_joint_limits_hold_when_driven_to_the_workspace_corners(make_env):
    env = make_env("reach", max_steps=200)
    low, high = env.joint_limits()
    env.reset(seed=0)
    for corner in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3):
        for _ in range(20):
            env.step(np.array([*corner, 0, 0], np.float32))
            q = env.arm_qpos()
            assert np.all(q >= low - 1e-3) and np.all(q <= high + 1e-3)
        tcp = env.gripper_pos()
        assert np.all(tcp >= WORKSPACE_LOW - 0.02) and np.all(tcp <= WORKSPACE_HIGH + 0.02)


def test_ik_reaches_workspace_points_with_the_gripper_down():
    env = TabletopEnv("reach", render=False)
    ik = DampedLeastSquaresIK(env.model, "tcp", ARM_JOINTS)
    rng = np.random.default_rng(0)
    q = env.ik.solve(np.zeros(6) + [0, -0.9, 1.9, 0, -1.0, 0], np.array([0, 0, 0.15]), GRIPPER_DOWN, 50)
    for target in rng.uniform(WORKSPACE_LOW, WORKSPACE_HIGH, size=(20, 3)):
        q = ik.solve(q, target, GRIPPER_DOWN, iterations=30)
        pos, rot = ik.forward(q)
        assert np.linalg.norm(pos - target) < 1e-3
        assert np.abs(rot - GRIPPER_DOWN).max() < 1e-2
        assert np.all(q >= ik.low) and np.all(q <= ik.high)
    env.close()


# ---- memory tasks: the cue is only visible early (checked on rendered frames) --------------


def _lamp_pixels(env, size):
    """Mask of the lamp's pixels in the front camera, from a segmentation render."""
    seg = mujoco.Renderer(env.model, size, size)
    try:
        seg.enable_segmentation_rendering()
        seg.update_scene(env.data, camera="front")
        ids = seg.render()
    finally:
        seg.close()
    mask = (ids[..., 0] == env.model.geom("lamp").id) & (ids[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM))
    assert mask.sum() >= 4, "the lamp must be visible in the front camera"
    return mask


def test_cue_touch_cue_is_visible_early_and_hidden_later(make_env):
    size = 96
    env = make_env("cue_touch", image_size=size, render=True)
    for seed in range(3):
        ts = env.reset(seed=seed)
        mask = _lamp_pixels(env, size)
        cue = np.array(RGB[env.episode.cue])
        frames = [ts.observation["image"]]
        for _ in range(GO_STEP + 1):
            frames.append(env.step(np.zeros(5, np.float32)).observation["image"])
        mean_rgb = [f[mask].mean(axis=0) / 255 for f in frames]

        def looks_like_cue(rgb):
            # The lit lamp's brightest channel is the cue colour's; the dark lamp is near black.
            return rgb.max() > 0.3 and np.argmax(rgb) == np.argmax(cue) and np.ptp(rgb) > 0.15

        assert all(looks_like_cue(mean_rgb[t]) for t in range(CUE_STEPS))
        assert all(mean_rgb[t].max() < 0.2 for t in range(CUE_STEPS, GO_STEP))  # dark: no colour
        assert mean_rgb[GO_STEP].min() > 0.6  # white "go"
        # A 6-frame window ending at the go step holds no frame with the cue.
        window = frames[GO_STEP - 5 : GO_STEP + 1]
        assert not any(looks_like_cue(f[mask].mean(axis=0) / 255) for f in window)


def test_cue_touch_expert_stays_still_until_go(make_env):
    env = make_env("cue_touch")
    steps = _rollout(env, seed=2)
    states = np.array([ts.observation["state"][:3] for ts in steps[: GO_STEP + 1]])
    assert np.abs(states - states[0]).max() < 2e-3  # nothing in the arm's motion points at the answer
    assert env.success


def test_put_back_spot_is_unmarked_and_go_comes_after_the_hold(make_env):
    env = make_env("put_back")
    seen = {}

    def check(env, ts):
        go = env.task_state.get("go", False)
        assert (env.lamp_rgb().min() > 0.9) == go
        if go and "spot_clear" not in seen:
            start = env.object_start_pos(env.target)
            dynamic = [g for g in range(env.model.ngeom) if env.model.geom_bodyid[g] != 0]  # not table/floor
            nearest = min(np.linalg.norm(env.data.geom_xpos[g][:2] - start[:2]) for g in dynamic)
            seen["spot_clear"] = nearest > 0.05
            seen["hold"] = env.task_state["held"]

    _rollout(env, seed=1, on_step=check)
    assert env.success and seen == {"spot_clear": True, "hold": HOLD_STEPS}
    # what the eval record keeps: when the go light came and how far from its start the object ended
    assert HOLD_STEPS < env.task_state["go_step"] < env.step_count
    assert 0 <= env.task_state["distance_from_start"] < PUT_BACK_RADIUS


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, match",
    [
        (np.zeros(3), r"action must have shape \(5,\) = \[dx, dy, dz, gripper, terminate\].*got shape \(3,\)"),
        (np.zeros((1, 5)), r"shape \(5,\).*bounds.*got shape \(1, 5\)"),
        ([0, np.nan, 0, 0, 0], r"action must be finite \(5,\) floats \[dx, dy, dz, gripper, terminate\]"),
        ([0, 0, np.inf, 0, 0], r"action must be finite"),
    ],
)
def test_bad_actions_name_the_expected_spec(make_env, action, match):
    env = make_env("stack")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


def test_out_of_bounds_actions_are_clipped(make_env):
    a, b = make_env("reach"), make_env("reach")
    a.reset(seed=3), b.reset(seed=3)
    for _ in range(3):
        ta = a.step(np.array([4, -3, 0.5, 9, -2], np.float32))
        tb = b.step(np.array([1, -1, 0.5, 1, 0], np.float32))
        np.testing.assert_array_equal(ta.observation["state"], tb.observation["state"])
        assert not ta.last()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "juggle"}, r"task must be one of \[.*'cue_touch'.*'put_back'.*\], got 'juggle'"),
        ({"task": "lift", "max_steps": 0}, r"max_steps must be a positive int or None.*got 0"),
        ({"task": "lift", "image_size": 0}, r"image_size must be a positive int, got 0"),
        ({"task": "lift", "wrist_image": True}, r"wrist_image=True needs render=True"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TabletopEnv(render=False, **kwargs)


def test_wrist_image_is_a_second_view(make_env):
    env = make_env("lift", image_size=32, render=True, wrist_image=True)
    obs = env.reset(seed=0).observation
    assert obs["wrist_image"].shape == (32, 32, 3) and obs["wrist_image"].std() > 5
    assert not np.array_equal(obs["wrist_image"], obs["image"])


def test_drawer_detectors_need_the_full_motion(make_env):
    env = make_env("open_drawer")
    env.reset(seed=0)
    assert env.drawer_opening() == 0.0
    q = env.model.joint("drawer").qposadr[0]
    for opening, is_open in ((0.05, False), (0.1, True)):
        env.data.qpos[q] = opening
        mujoco.mj_forward(env.model, env.data)
        assert TASKS["open_drawer"].success(env) is is_open
        assert TASKS["close_drawer"].success(env) is False
    env = make_env("close_drawer")
    env.reset(seed=0)
    assert 0.08 <= env.drawer_opening() <= 0.11 and not env.success


def test_layouts_keep_out_of_the_drawer(make_env):
    from envs.scene import DRAWER_KEEPOUT_HIGH, DRAWER_KEEPOUT_LOW

    env = make_env("place_on_pad")
    for seed in range(20):
        env.reset(seed=seed)
        for xy in [env.object_pos(s)[:2] for s in OBJECTS] + [env.tray_pos()[:2]] + [env.pad_pos(p)[:2] for p in PADS]:
            assert not (np.all(xy > DRAWER_KEEPOUT_LOW) and np.all(xy < DRAWER_KEEPOUT_HIGH)), (seed, xy)


def test_cue_touch_lit_shows_the_cue_until_go_and_a_window_sees_it(make_env):
    """The control task: the same episode as cue_touch, with the cue lit until the go light."""
    size = 96
    env = make_env("cue_touch_lit", image_size=size, render=True)
    assert not TASKS["cue_touch_lit"].memory
    for seed in range(2):
        ts = env.reset(seed=seed)
        mask = _lamp_pixels(env, size)
        cue = np.array(RGB[env.episode.cue])
        assert env.episode.cue == env.target_color
        frames = [ts.observation["image"]]
        for _ in range(GO_STEP + 1):
            frames.append(env.step(np.zeros(5, np.float32)).observation["image"])
        rgb = [f[mask].mean(axis=0) / 255 for f in frames]
        assert all(np.argmax(rgb[t]) == np.argmax(cue) and np.ptp(rgb[t]) > 0.15 for t in range(GO_STEP))
        assert rgb[GO_STEP].min() > 0.6  # white "go", as in cue_touch
