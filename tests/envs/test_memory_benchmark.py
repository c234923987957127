"""The memory benchmark (envs/memory_tasks.py): experts, controls, chance levels, the cue hidden at the
decision (checked on rendered frames) and shown in the controls, and every detector's failure cases."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import dataclasses

import mujoco
import numpy as np
import pytest

from envs.experts import make_expert
from envs.memory_tasks import DONE, LIT, MEMORY_BENCHMARK, PRESS_Z, RELEASE_Z, pad_under
from envs.scene import GO_STEP, MAX_DELTA, NEUTRAL, OBJECTS, PADS, PAINT_RGB
from envs.task_spec import CUE_STEPS, HOLD_STEPS
from envs.tasks import TASKS

MEMORY = [n for n, t in MEMORY_BENCHMARK.items() if t.memory]
CONTROLS = {t.control_of: n for n, t in MEMORY_BENCHMARK.items() if t.control_of}


def _expert_episode(env, seed, noise=0.0, on_step=None, until=None):
    """Runs the expert from reset(seed); stops early when until(env) holds. Returns the observations."""
    expert = make_expert(env, noise=noise, seed=0)
    ts = env.reset(seed=seed)
    frames = [ts]
    while not ts.last() and not (until is not None and until(env)):
        ts = env.step(expert.act(ts))
        frames.append(ts)
        if on_step is not None:
            on_step(env, ts)
    return frames


def _drive(env, goal, gripper=1.0, steps=40, tol=0.004):
    """Moves the tcp to `goal` like a teleoperator (closed fingers by default); returns the last timestep."""
    ts = None
    for _ in range(steps):
        err = np.asarray(goal) - env.gripper_pos()
        if np.abs(err).max() < tol:
            break
        move = np.clip(0.8 * err / MAX_DELTA, -1, 1)
        ts = env.step(np.array([*move, gripper, 0], np.float32))
        if ts.last():
            break
    return ts


def _wait_for(env, condition, steps=60):
    for _ in range(steps):
        if condition(env):
            return
        env.step(np.zeros(5, np.float32))
    raise AssertionError("condition never held")


def _touch(env, slot):
    p = env.object_pos(slot)
    _drive(env, [p[0], p[1], 0.08], gripper=-1.0)
    _drive(env, [p[0], p[1], 0.03], gripper=-1.0)
    _drive(env, [p[0], p[1], 0.08], gripper=-1.0)


def _press(env, pad):
    p = env.pad_pos(pad)
    _drive(env, [p[0], p[1], 0.08])
    _drive(env, [p[0], p[1], 0.02])
    _drive(env, [p[0], p[1], 0.12])


# ---- the benchmark's make-up -------------------------------------------------------------------


def test_four_kinds_each_with_a_control_and_a_stated_chance():
    assert MEMORY == ["which_object", "touch_order", "which_pad", "press_again"]
    assert set(CONTROLS) == set(MEMORY)
    for name in MEMORY:
        task, control = TASKS[name], TASKS[CONTROLS[name]]
        assert 0 < task.chance < 0.6 and control.chance is None and not control.memory
        # the same episodes, detector, expert and timing: only what is shown differs
        for field in ("success", "expert", "max_steps", "choose", "lamp", "uses_pads", "target_on_pad", "go_bar"):
            assert getattr(task, field) is getattr(control, field) or getattr(task, field) == getattr(control, field)
        assert task.paint is not control.paint
        for text in task.templates:
            assert "{" not in text, text  # no slot: the instruction never names the answer
    assert [round(TASKS[n].chance, 3) for n in MEMORY] == [0.333, 0.167, 0.5, 0.5]


@pytest.mark.parametrize("name", MEMORY)
def test_a_control_has_the_same_episodes(make_env, name):
    task, control = make_env(name), make_env(CONTROLS[name])
    for seed in range(5):
        task.reset(seed=seed), control.reset(seed=seed)
        assert task.episode == control.episode
        for s in OBJECTS:
            np.testing.assert_array_equal(task.object_pos(s), control.object_pos(s))
        for p in PADS:
            np.testing.assert_array_equal(task.pad_pos(p), control.pad_pos(p))


@pytest.mark.parametrize("name", list(MEMORY_BENCHMARK))
def test_experts_succeed_with_and_without_noise(make_env, name):
    env = make_env(name)
    wins = 0
    for seed in range(24):
        _expert_episode(env, 200 + seed, noise=0.2 if seed % 2 else 0.0)
        wins += env.success
    assert wins >= 23, f"{name}: {wins}/24"


def test_which_pad_object_starts_on_its_pad_and_the_others_clear_of_both(make_env):
    env = make_env("which_pad")
    for seed in range(10):
        env.reset(seed=seed)
        pad = env.pad_pos(env.episode.pad)[:2]
        assert np.linalg.norm(env.object_pos(env.target)[:2] - pad) < 1e-6
        for s in OBJECTS:
            if s != env.target:
                assert min(np.linalg.norm(env.object_pos(s)[:2] - env.pad_pos(p)[:2]) for p in PADS) > 0.1


# ---- the cue: shown early, gone at the decision (memory tasks), shown at it (controls) ------------


def _answers(env):
    """Every other answer the episode could have had, as episodes."""
    ep = env.episode
    if env.task in ("which_object", "which_object_shown"):
        return [dataclasses.replace(ep, target=s) for s in OBJECTS if s != ep.target]
    if env.task in ("touch_order", "touch_order_shown"):
        return [dataclasses.replace(ep, target=a, other=b) for a in OBJECTS for b in OBJECTS
                if a != b and (a, b) != (ep.target, ep.other)]
    return [dataclasses.replace(ep, pad=p) for p in PADS if p != ep.pad]


def _shown_with(env, episode, size):
    """The frame the env would render now had the episode's answer been `episode`'s."""
    real = env._episode
    env._episode = episode
    try:
        env._update_signals()
        return env.render().copy()
    finally:
        env._episode = real
        env._update_signals()


def _decision_step(env):
    return env.task_state.get("go_step", GO_STEP) if env.task_spec.uses_pads else GO_STEP


@pytest.mark.parametrize("name", MEMORY)
def test_the_frames_before_the_decision_do_not_depend_on_the_answer(make_env, name):
    """At the go step and the 5 observations before it, re-rendering the same scene with any other answer
    gives the same pixels: neither the current frame nor a 6-frame window holds the answer. In the control,
    the frame at the decision differs."""
    size = 64
    for env_name, hidden in ((name, True), (CONTROLS[name], False)):
        env = make_env(env_name, image_size=size, render=True)
        for seed in range(2):
            frames = []

            def record(env, ts):
                frames.append((env.step_count, [(_shown_with(env, e, size) != ts.observation["image"]).any()
                                                for e in _answers(env)]))

            _expert_episode(env, seed, on_step=record)
            go = _decision_step(env)
            window = [differs for step, differs in frames if go - 5 <= step <= go]
            assert len(window) == 6
            if hidden:
                assert not any(any(d) for d in window), (env_name, seed)
            else:
                assert any(window[-1]), (env_name, seed)  # the control shows it at the decision


@pytest.mark.parametrize("name", MEMORY)
def test_the_cue_is_visible_at_the_start(make_env, name):
    size = 64
    env = make_env(name, image_size=size, render=True)
    ts = env.reset(seed=3)
    if name == "which_pad":  # the cue is where the object stands: on its pad
        assert pad_under(env, env.object_pos(env.target)) == env.episode.pad
    else:
        assert any((_shown_with(env, e, size) != ts.observation["image"]).any() for e in _answers(env))
    lit = [k for k, v in {**{s: env.color_of(s) for s in OBJECTS}, **{p: env.pad_color(p) for p in PADS}}.items()
           if v == LIT]
    assert len(lit) == 1
    # the lit geom renders red: mean colour of its pixels, from a segmentation render
    mask = _geom_pixels(env, lit[0], size)
    assert mask.sum() >= 4
    rgb = ts.observation["image"][mask].mean(axis=0)
    assert rgb[0] > 2 * rgb[1] and rgb[0] > 2 * rgb[2], rgb


def test_paint_reports_what_is_shown(make_env):
    env = make_env("touch_order")
    env.reset(seed=1)
    first, second = env.target, env.episode.other
    assert env.color_of(first) == LIT and env.color_of(second) == NEUTRAL
    for _ in range(CUE_STEPS):
        env.step(np.zeros(5, np.float32))
    assert env.color_of(first) == NEUTRAL and env.color_of(second) == LIT
    for _ in range(CUE_STEPS):
        env.step(np.zeros(5, np.float32))
    assert {env.color_of(s) for s in OBJECTS} == {NEUTRAL} and {env.pad_color(p) for p in PADS} == {NEUTRAL}
    assert np.allclose(env.model.geom_rgba[env.model.geom(first).id, :3], PAINT_RGB[NEUTRAL])
    assert env.last_info["target_color"] == NEUTRAL


def test_touch_order_arm_is_still_until_go_and_hold_tasks_wait_over_the_tray(make_env):
    env = make_env("touch_order")
    states = np.array([ts.observation["state"][:3] for ts in _expert_episode(env, 2)[: GO_STEP + 1]])
    assert np.abs(states - states[0]).max() < 2e-3 and env.success
    for name in ("which_pad", "press_again"):
        env = make_env(name)
        tcps = {}
        _expert_episode(env, 4, on_step=lambda env, ts: tcps.setdefault(env.step_count, env.gripper_pos()))
        go = env.task_state["go_step"]
        assert env.success and env.task_state["held"] == HOLD_STEPS
        for step in range(go - 5, go + 1):
            rel = tcps[step] - env.tray_pos()
            assert np.abs(rel[:2]).max() < 0.07 and rel[2] > 0.06, (name, step)


# ---- detectors: the first decision is final ----------------------------------------------------


@pytest.mark.parametrize("name", ["which_object", "which_object_shown"])
def test_which_object_fails_on_a_wrong_or_early_touch(make_env, name):
    env = make_env(name, max_steps=300)
    env.reset(seed=0)
    _wait_for(env, lambda e: e.step_count >= GO_STEP)
    _touch(env, next(s for s in OBJECTS if s != env.target))
    _touch(env, env.target)
    assert not env.success
    env.reset(seed=0)
    q = env._obj_qpos[env.target]  # the target right under the gripper, so it can be touched before the go light
    env.data.qpos[q : q + 3] = [*env.gripper_pos()[:2], 0.02]
    mujoco.mj_forward(env.model, env.data)
    p = env.object_pos(env.target)
    _drive(env, [p[0], p[1], 0.03], gripper=-1.0)
    assert env.step_count < GO_STEP and env.task_state["first_touch"] == "invalid"
    _wait_for(env, lambda e: e.step_count >= GO_STEP)
    _touch(env, env.target)
    assert not env.success and env.task_state["first_touch"] == "invalid"


def test_touch_order_needs_the_order(make_env):
    env = make_env("touch_order", max_steps=300)
    env.reset(seed=0)
    first, second = env.target, env.episode.other
    third = next(s for s in OBJECTS if s not in (first, second))
    _wait_for(env, lambda e: e.step_count >= GO_STEP)
    _touch(env, second)
    assert env.task_state["failed"] == "wrong order"
    _touch(env, first), _touch(env, second)
    assert not env.success
    env.reset(seed=0)
    _wait_for(env, lambda e: e.step_count >= GO_STEP)
    _touch(env, first)
    assert env.task_state["touches"] == [first] and "failed" not in env.task_state
    _touch(env, third)
    assert env.task_state["failed"] == "wrong order" and not env.success
    env.reset(seed=0)
    _wait_for(env, lambda e: e.step_count >= GO_STEP)
    _touch(env, first)
    _touch(env, first)  # touching the first again is allowed
    p = env.object_pos(second)
    _drive(env, [p[0], p[1], 0.08], gripper=-1.0)
    ts = _drive(env, [p[0], p[1], 0.03], gripper=-1.0)
    assert env.success and ts.last() and ts.reward == 1.0


def test_which_pad_first_set_down_decides(make_env):
    env = make_env("which_pad", max_steps=150)
    ts = _expert_episode(env, 1, until=lambda e: e.task_state.get("go", False))[-1]
    right = env.episode.pad
    wrong = next(p for p in PADS if p != right)
    true_start = env._obj_start[env.target].copy()
    env._obj_start[env.target][:2] = env.pad_pos(wrong)[:2]  # the expert now returns it to the other pad
    expert = make_expert(env)
    expert._plan, expert._phase, expert._steps_in_phase = expert.waypoints(), 3, 0
    expert._rng = np.random.default_rng(0)
    while not ts.last() and "placed_on" not in env.task_state:
        ts = env.step(expert.act(ts))
    assert env.task_state["placed_on"] == wrong and not env.success
    env._obj_start[env.target] = true_start
    q = env._obj_qpos[env.target]
    env.data.qpos[q : q + 7] = [*env.pad_pos(right)[:2], 0.02, 1, 0, 0, 0]  # moved onto the right pad: too late
    env.data.qvel[:] = 0
    ts = env.step(np.array([0, 0, 1, -1, 0], np.float32))
    assert not env.success


def test_which_pad_set_down_off_the_pads_fails(make_env):
    env = make_env("which_pad", max_steps=150)
    ts = _expert_episode(env, 2, until=lambda e: e.task_state.get("go", False))[-1]
    taken = [env.tray_pos()[:2], *[env.pad_pos(p)[:2] for p in PADS],
             *[env.object_pos(s)[:2] for s in OBJECTS if s != env.target]]
    spots = [np.array([x, y]) for x in np.linspace(-0.2, 0.2, 9) for y in np.linspace(-0.12, 0.14, 7)]
    free = next(xy for xy in spots if min(np.linalg.norm(xy - t) for t in taken) > 0.12)
    env._obj_start[env.target][:2] = free  # the expert now sets it down on the bare table
    expert = make_expert(env)
    expert._plan, expert._phase, expert._steps_in_phase = expert.waypoints(), 3, 0
    expert._rng = np.random.default_rng(0)
    while not ts.last() and "placed_on" not in env.task_state:
        ts = env.step(expert.act(ts))
    assert env.task_state["placed_on"] in ("table", *[p for p in PADS if p != env.episode.pad])
    assert not env.success


@pytest.mark.parametrize("name", ["press_again", "press_again_shown"])
def test_press_again_fails_on_the_wrong_pad_or_too_early(make_env, name):
    env = make_env(name, max_steps=300)
    env.reset(seed=0)
    right = env.episode.pad
    wrong = next(p for p in PADS if p != right)
    _press(env, wrong)
    assert env.task_state["failed"] == "pressed the unlit pad"
    env.reset(seed=0)
    _press(env, right)
    assert "first_press" in env.task_state
    assert env.pad_color(right) == (DONE if name.endswith("_shown") else NEUTRAL)
    _press(env, right)
    assert env.task_state["failed"] == "pressed before the go light"
    _expert_episode(env, 0, until=lambda e: e.task_state.get("go", False))
    _press(env, wrong)
    assert env.task_state["failed"] == "pressed the other pad"
    _press(env, right)
    assert not env.success


def test_press_needs_the_fingertips_low_over_the_pad(make_env):
    env = make_env("press_again", max_steps=300)
    env.reset(seed=0)
    p = env.pad_pos(env.episode.pad)
    _drive(env, [p[0], p[1], PRESS_Z + 0.015])
    assert "first_press" not in env.task_state and env.pad_color(env.episode.pad) == LIT
    _drive(env, [p[0], p[1], 0.02])
    assert "first_press" in env.task_state


def test_eval_table_states_chance_and_controls():
    import envs
    from rollout.evaluate import EvalResult

    assert envs.memory_facts("tabletop", "touch_order") == {"chance": 1 / 6}
    assert envs.memory_facts("tabletop", "touch_order_shown") == {"control_of": "touch_order"}
    assert envs.memory_facts("tabletop", "lift") == {} and envs.memory_facts("metaworld-mt10", "reach-v3") == {}
    per_task = {n: {"success_rate": 0.5, "episodes": 2, "mean_length": 30.0, **envs.memory_facts("tabletop", n)}
                for n in ("lift", "press_again", "press_again_shown")}
    lines = EvalResult(per_task, 6, 1.0).table().splitlines()
    assert lines[0].endswith("memory") and lines[2].endswith("chance 50%")
    assert lines[3].endswith("control of press_again") and lines[1].split() == ["lift", "50%", "2", "30.0"]


def test_a_jitter_at_the_pad_is_one_press(make_env):
    env = make_env("press_again", max_steps=300)
    env.reset(seed=0)
    p = env.pad_pos(env.episode.pad)
    _drive(env, [p[0], p[1], 0.02])
    _drive(env, [p[0], p[1], RELEASE_Z - 0.01])
    _drive(env, [p[0], p[1], 0.02])
    assert "failed" not in env.task_state and env.task_state["first_press"] > 0
    _drive(env, [p[0], p[1], RELEASE_Z + 0.02])
    _drive(env, [p[0], p[1], 0.02])
    assert env.task_state["failed"] == "pressed before the go light"


def _geom_pixels(env, name, size=64):
    seg = mujoco.Renderer(env.model, size, size)
    try:
        seg.enable_segmentation_rendering()
        seg.update_scene(env.data, camera="front")
        ids = seg.render()
    finally:
        seg.close()
    return (ids[..., 0] == env.model.geom(name).id) & (ids[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM))


@pytest.mark.parametrize("name", ["which_pad", "press_again_shown", "touch_order"])
def test_the_go_bar_stays_in_view_and_turns_white_with_the_lamp(make_env, name):
    """The lamp can be hidden behind the arm; the go bar on the table's front edge cannot."""
    env = make_env(name, image_size=64, render=True)
    seen = []

    def check(env, ts):
        mask = _geom_pixels(env, "go_bar")
        go = bool(env.lamp_rgb().min() > 0.9)
        rgb = ts.observation["image"][mask].mean(axis=0) / 255
        seen.append((int(mask.sum()), go, float(rgb.min()), float(rgb.max())))

    for seed in range(3):
        _expert_episode(env, seed, on_step=check)
    assert min(px for px, *_ in seen) >= 200  # a 58 x 5 pixel strip at 64 px, never covered
    assert all(lo > 0.7 for _, go, lo, _ in seen if go) and all(hi < 0.3 for _, go, _, hi in seen if not go)
    assert any(go for _, go, *_ in seen) and any(not go for _, go, *_ in seen)


def test_other_tasks_keep_the_go_bar_under_the_table(make_env):
    for name in ("lift", "cue_touch", "put_back"):
        env = make_env(name, image_size=64, render=True)
        env.reset(seed=0)
        assert not _geom_pixels(env, "go_bar").any() and env.data.mocap_pos[env._go_bar_mocap][2] < 0


def test_eval_records_keep_the_benchmark_state(make_env):
    from rollout.evaluate import _episode_details

    env = make_env("touch_order")
    _expert_episode(env, 3)
    details = _episode_details(env)
    assert details["touches"] == [env.target, env.episode.other] and details["other"] == env.episode.other
    env = make_env("which_pad")
    _expert_episode(env, 3)
    assert _episode_details(env)["placed_on"] == env.episode.pad
