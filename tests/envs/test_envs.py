"""Tabletop suite: specs, seeding, experts, gymnasium API, errors and rendering (real MuJoCo)."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

import dm_env
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import tabletop
from envs.experts import make_expert
from envs.scene import COLORS, WORKSPACE_LOW
from tests.helpers import ROOT

TASKS = list(envs.list_tasks())
# 50-seed expert checks for the original tasks; tests/test_tabletop_suite.py covers every task on fewer seeds.
EXPERT_TASKS = ["reach", "lift", "push", "place"]


@pytest.fixture
def make_env():
    created = []

    def _make(task: str = "lift", **kwargs):
        env = envs.make("tabletop", task, **kwargs)
        created.append(env)
        return env

    yield _make
    for env in created:
        env.close()


def _run_expert(env, seed: int, noise: float = 0.0):
    """Roll out the expert; returns (observations, actions, last timestep)."""
    expert = make_expert(env, noise=noise, seed=0)
    ts = env.reset(seed=seed)
    observations, actions = [ts.observation], []
    while not ts.last():
        action = expert.act(ts)
        ts = env.step(action)
        actions.append(action)
        observations.append(ts.observation)
    return observations, actions, ts


def test_registry_and_constants():
    assert envs.ENV_NAMES == ("tabletop", "metaworld-mt10", "metaworld-mt50")
    assert envs.env_family("tabletop") == "tabletop" and envs.default_camera("tabletop") == "front"
    assert envs.action_names("tabletop") == envs.ACTION_NAMES
    assert envs.ACTION_NAMES[-1] == "terminate_episode" and len(envs.ACTION_NAMES) == 5
    tasks = envs.list_tasks()
    assert set(tasks) >= {"reach", "lift", "push", "place"}
    for templates in tasks.values():
        assert len(templates) >= 3  # slots: {obj}, {other}, {pad}, {direction}; memory tasks name no answer


@pytest.mark.parametrize("task", TASKS)
def test_specs_match_observations(make_env, task):
    env = make_env(task, image_size=32)
    obs_spec, act_spec = env.observation_spec(), env.action_spec()
    assert act_spec.shape == (5,) and act_spec.dtype == np.float32
    np.testing.assert_array_equal(act_spec.minimum, [-1, -1, -1, -1, 0])
    ts = env.reset(seed=1)
    assert ts.first()
    for _ in range(2):
        for key, spec in obs_spec.items():
            spec.validate(ts.observation[key])
        assert ts.observation["image"].shape == (32, 32, 3)
        ts = env.step(act_spec.generate_value())
    assert 0.0 <= ts.observation["state"][3] <= 1.0


def test_seed_reproduces_episode_bit_exactly(make_env):
    runs = [_run_expert(make_env("place", image_size=32), seed=7, noise=0.2) for _ in range(2)]
    (obs_a, act_a, _), (obs_b, act_b, _) = runs
    assert len(obs_a) == len(obs_b)
    np.testing.assert_array_equal(np.array(act_a), np.array(act_b))
    for a, b in zip(obs_a, obs_b):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["state"], b["state"])
        assert a["instruction"] == b["instruction"]


def test_env_seed_reproduces_unseeded_resets(make_env):
    def episodes(env):
        return [(env.reset().observation["instruction"].item(), env.episode_seed) for _ in range(5)]

    first = episodes(make_env("reach", seed=3, render=False))
    assert first == episodes(make_env("reach", seed=3, render=False))
    assert len({seed for _, seed in first}) == 5


@pytest.mark.parametrize("task", EXPERT_TASKS)
def test_expert_success_rate(make_env, task):
    env = make_env(task, render=False)
    successes = 0
    for seed in range(50):
        _, _, ts = _run_expert(env, seed)
        assert ts.last() and env.step_count <= env.max_steps
        successes += env.success
        assert ts.reward == float(env.success)
    assert successes >= 49, f"{task}: {successes}/50"


@pytest.mark.parametrize("task", EXPERT_TASKS)
def test_noisy_expert_still_succeeds(make_env, task):
    env = make_env(task, render=False)
    successes = sum(_run_expert(env, seed, noise=0.2)[2].reward == 1.0 for seed in range(50))
    assert successes >= 49, f"{task}: {successes}/50"


def test_expert_terminates_when_episode_does_not_end_on_success(make_env):
    env = make_env("lift", render=False, end_on_success=False)
    _, actions, ts = _run_expert(env, seed=2)
    assert ts.step_type == dm_env.StepType.LAST and ts.discount == 0.0 and ts.reward == 1.0
    assert actions[-1][4] == 1.0 and all(a[4] == 0.0 for a in actions[:-1])


def test_truncation_after_max_steps(make_env):
    env = make_env("push", render=False, max_steps=5)
    ts = env.reset(seed=0)
    while not ts.last():
        ts = env.step(np.zeros(5, np.float32))
    assert env.step_count == 5 and ts.discount == 1.0 and ts.reward == 0.0
    assert env.step(np.zeros(5)).first()  # stepping after the end starts a new episode


def test_terminate_action_ends_episode_without_success(make_env):
    env = make_env("place", render=False)
    env.reset(seed=0)
    ts = env.step(np.array([0, 0, 0, 0, 1], np.float32))
    assert ts.last() and ts.discount == 0.0 and ts.reward == 0.0
    assert env.last_info["success"] is False and env.last_info["task"] == "place"


def test_actions_are_clipped_and_gripper_stays_above_table(make_env):
    env = make_env("reach", render=False)
    env.reset(seed=0)
    for _ in range(15):
        ts = env.step(np.array([0, 0, -50, 5, 0]))
    state = ts.observation["state"]
    assert state[2] >= WORKSPACE_LOW[2] - 0.005
    assert state[3] < 0.1  # gripper command > 0 closed the fingers


@pytest.mark.parametrize(
    "action, match",
    [(np.zeros(4), r"action must have shape \(5,\).*got shape \(4,\)"), ([0, 0, np.nan, 0, 0], "action must be finite")],
)
def test_bad_action_is_rejected(make_env, action, match):
    env = make_env("reach", render=False)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "fly"}, r"task must be one of \[.*'lift', .*'place', .*'push', .*'reach'.*\] for env 'tabletop', got 'fly'"),
        ({"task": "lift", "camera": "top"}, r"camera must be one of .*'front'.*got 'top'"),
        ({"task": "lift", "name": "kitchen"},
         r"name must be one of \['tabletop', 'metaworld-mt10', 'metaworld-mt50'\], got 'kitchen'"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    kwargs = {"name": "tabletop", **kwargs}
    with pytest.raises(ValueError, match=match):
        envs.make(render=False, **kwargs)


def test_renderer_failure_explains_the_fix(monkeypatch):
    def broken(*args, **kwargs):
        raise mujoco.FatalError("gladLoadGL error")

    monkeypatch.setattr(tabletop.mujoco, "Renderer", broken)
    with pytest.raises(RuntimeError, match=r"(?is)headless.*MUJOCO_GL=egl.*libegl1.*osmesa.*gladLoadGL"):
        envs.make("tabletop", "lift")


@pytest.mark.parametrize("camera", ["front", "wrist"])
def test_image_is_not_blank_and_follows_the_gripper(make_env, camera):
    env = make_env("lift", image_size=48, camera=camera)
    first = env.reset(seed=4).observation["image"]
    assert first.std() > 10 and len(np.unique(first.reshape(-1, 3), axis=0)) > 20
    for _ in range(4):
        ts = env.step(np.array([1, 0, 1, 0, 0], np.float32))
    moved = ts.observation["image"]
    assert np.abs(moved.astype(int) - first.astype(int)).mean() > 2


def test_instruction_names_the_target_colour(make_env):
    env = make_env("place", render=False)
    targets, phrasings = set(), set()
    for seed in range(30):
        text = env.reset(seed=seed).observation["instruction"].item()
        assert text == env.instruction and env.target_color in text
        assert [c for c in COLORS if c in text] == [env.target_color]
        targets.add(env.target_color)
        phrasings.add(text.replace(env.target_color, "{color}"))
    assert targets == set(COLORS) and len(phrasings) >= 3


@pytest.mark.filterwarnings("ignore:.*not having a spec")  # built directly, not via gymnasium.make
def test_gymnasium_check_env():
    env = envs.make_gym("tabletop", "lift", image_size=32, seed=0)
    try:
        check_env(env.unwrapped)
    finally:
        env.close()
    env.close()  # closing twice is allowed


def test_gymnasium_step_flags_and_info():
    env = envs.make_gym("tabletop", "reach", image_size=32, max_steps=3)
    try:
        obs, info = env.reset(seed=0)
        assert obs in env.observation_space and info["task"] == "reach" and info["success"] is False
        _, reward, terminated, truncated, info = env.step(np.zeros(5, np.float32))
        assert (terminated, truncated) == (False, False) and "success" in info
        env.step(np.zeros(5, np.float32))
        _, reward, terminated, truncated, _ = env.step(np.zeros(5, np.float32))
        assert (reward, terminated, truncated) == (0.0, False, True)
        env.reset(seed=1)
        _, reward, terminated, truncated, _ = env.step(np.array([0, 0, 0, 0, 1], np.float32))
        assert (terminated, truncated) == (True, False)
        assert env.render().shape == (32, 32, 3)
    finally:
        env.close()


def test_gymnasium_wrapper_exposes_the_wrist_camera():
    env = envs.make_gym("tabletop", "reach", image_size=32, wrist_image=True)
    try:
        obs, _ = env.reset(seed=0)
        assert obs["wrist_image"].shape == (32, 32, 3) and obs in env.observation_space
        assert not np.array_equal(obs["wrist_image"], obs["image"])
    finally:
        env.close()


def test_envs_dropped_without_close_exit_cleanly():
    # mujoco's EGL renderer raises a traceback if it is freed after mujoco's atexit hook terminated the
    # display; each env frees its renderer when collected, or at exit before that hook. torch is imported
    # first because it registers weakref.finalize's own exit hook early (a finalize alone ran too late).
    script = (
        "import gc, torch, envs\n"
        "e = envs.make('tabletop', 'lift', image_size=32); e.reset(seed=0)\n"
        "d = envs.make('tabletop', 'reach', image_size=32); d.reset(seed=0); del d; gc.collect()\n"
        "c = envs.make('tabletop', 'push', image_size=32); c.close(); c.close()\n"
        "g = envs.make_gym('tabletop', 'reach', image_size=32); g.reset(seed=0)\n"
        "print('done')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_registry_defaults_camera_and_dispatches_the_expert(make_env):
    env = make_env("reach", image_size=32, camera=None)
    assert env.camera == "front"
    expert = envs.make_expert(env, noise=0.0, seed=0)
    ts = env.reset(seed=0)
    np.testing.assert_array_equal(expert.act(ts), make_expert(env).act(ts))


def test_make_vec_tabletop():
    vec = envs.make_vec("tabletop", ["lift", "push"], 2, image_size=32, asynchronous=False, max_steps=2)
    try:
        obs, info = vec.reset(seed=0)
        assert obs["image"].shape == (2, 32, 32, 3) and list(info["task"]) == ["lift", "push"]
        for _ in range(2):
            obs, reward, terminated, truncated, info = vec.step(np.zeros((2, 5), np.float32))
        assert truncated.all() and not terminated.any()
    finally:
        vec.close()


def test_noisy_expert_records_its_clean_action(make_env):
    """DART: with noise the executed action is perturbed, `clean_action` is the noise-free one."""
    env = make_env("reach", image_size=32)
    ts = env.reset(seed=3)
    noisy_expert = make_expert(env, noise=0.3, seed=1)
    executed = noisy_expert.act(ts)
    clean_expert = make_expert(env, noise=0.0)
    np.testing.assert_array_equal(noisy_expert.clean_action, clean_expert.act(ts))
    assert not np.array_equal(executed, noisy_expert.clean_action)
