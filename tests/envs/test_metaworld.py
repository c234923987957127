"""Meta-World adapter: specs, seeding, upright images, success, experts, errors, gymnasium and vector envs."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import dm_env
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import metaworld_env as mwe

MT10 = "metaworld-mt10"


@pytest.fixture
def make_env():
    created = []

    def _make(task: str = "drawer-open", name: str = MT10, **kwargs):
        env = envs.make(name, task, **kwargs)
        created.append(env)
        return env

    yield _make
    for env in created:
        env.close()


def _rollout(env, seed: int, noise: float = 0.0, max_steps: int | None = None):
    expert = envs.make_expert(env, noise=noise, seed=0)
    ts = env.reset(seed=seed)
    observations, actions = [ts.observation], []
    while not ts.last() and (max_steps is None or len(actions) < max_steps):
        actions.append(expert.act(ts))
        ts = env.step(actions[-1])
        observations.append(ts.observation)
    return observations, actions, ts


def test_registry_lists_mt10_and_mt50_with_instructions():
    mt10, mt50 = envs.list_tasks(MT10), envs.list_tasks("metaworld-mt50")
    assert len(mt10) == 10 and len(mt50) == 50 and set(mt10) < set(mt50)
    assert {"reach", "push", "pick-place", "drawer-open", "window-close"} <= set(mt10)
    for instructions in mt50.values():
        assert len(instructions) >= 3 and len(set(instructions)) == len(instructions)
        assert all(s == s.strip() and s.islower() for s in instructions)
    assert envs.env_family(MT10) == "metaworld" and envs.env_family("tabletop") == "tabletop"
    assert envs.action_names(MT10) == envs.ACTION_NAMES
    assert envs.default_camera(MT10) == "corner2"


@pytest.mark.parametrize("task", ["reach", "drawer-open", "pick-place", "peg-insert-side"])
def test_specs_match_observations(make_env, task):
    env = make_env(task, image_size=32)
    obs_spec, act_spec = env.observation_spec(), env.action_spec()
    assert act_spec.shape == (5,) and act_spec.dtype == np.float32
    np.testing.assert_array_equal(act_spec.minimum, [-1, -1, -1, -1, 0])
    assert obs_spec["image"].shape == (32, 32, 3) and obs_spec["state"].shape == (7,)
    ts = env.reset(seed=1)
    assert ts.first()
    # The goal (state[4:7]) is the episode's: MT benchmarks are fully observable.
    np.testing.assert_allclose(ts.observation["state"][4:], env.mw._target_pos, atol=1e-6)
    for _ in range(3):
        for key, spec in obs_spec.items():
            spec.validate(ts.observation[key])
        ts = env.step(act_spec.generate_value())
    assert ts.observation["instruction"].item() in envs.list_tasks(MT10)[task]


def test_seed_reproduces_episode_bit_exactly(make_env):
    runs = [_rollout(make_env("push", image_size=32), seed=7, noise=0.3, max_steps=15) for _ in range(2)]
    (obs_a, act_a, _), (obs_b, act_b, _) = runs
    np.testing.assert_array_equal(np.array(act_a), np.array(act_b))
    for a, b in zip(obs_a, obs_b):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["state"], b["state"])
        assert a["instruction"] == b["instruction"]


def test_same_env_replays_a_seed_after_other_episodes(make_env):
    env = make_env("pick-place", image_size=32)
    first = _rollout(env, seed=4, max_steps=10)[0]
    _rollout(env, seed=9, max_steps=10)
    again = _rollout(env, seed=4, max_steps=10)[0]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["state"], b["state"])
    with pytest.raises(ValueError, match=r"seed must be a non-negative int or None, got -1"):
        env.reset(seed=-1)


def test_seed_picks_benchmark_goal(make_env):
    env = make_env("reach", render=False)
    goals = {}
    for seed in (0, 1, 50):
        env.reset(seed=seed)
        goals[seed] = env.raw_observation[-3:]
        assert env.variant == seed % 50
    assert not np.allclose(goals[0], goals[1])
    np.testing.assert_array_equal(goals[0], goals[50])  # 50 benchmark train goals per task
    np.testing.assert_allclose(goals[1], mwe.benchmark_goals("MT10")["reach"][1][3:6])


def test_random_goals_are_fresh_per_seed_and_reproducible(make_env):
    env = make_env("reach", render=False, goals="random")
    env.reset(seed=0)
    first = env.raw_observation[-3:]
    env.reset(seed=50)
    assert not np.allclose(first, env.raw_observation[-3:]) and env.variant == -1
    env.reset(seed=0)
    np.testing.assert_array_equal(first, env.raw_observation[-3:])


def _project(env, camera: str, point: np.ndarray) -> float:
    """Row of `point` in MuJoCo's raw frame (pinhole model of the named camera)."""
    cam = env.model.camera(camera).id
    rot = env.data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards)
    x, y, z = rot.T @ (point - env.data.cam_xpos[cam])
    focal = (env.image_size / 2) / np.tan(np.radians(env.model.cam_fovy[cam]) / 2)
    return env.image_size / 2 - focal * y / -z


@pytest.mark.parametrize("camera", ["corner", "corner2", "corner3", "behindGripper"])
def test_images_are_upright(make_env, camera):
    env = make_env(image_size=64, camera=camera)
    image = env.reset(seed=0).observation["image"]
    raw = env.render_raw()
    rotated = env.needs_rotation()
    assert rotated == camera.startswith("corner")
    np.testing.assert_array_equal(image, raw[::-1, ::-1] if rotated else raw)
    # Geometry: a point 30 cm above the table centre is above it in the observed image.
    table, above = np.array([0.0, 0.6, 0.0]), np.array([0.0, 0.6, 0.3])
    rows = [_project(env, camera, p) for p in (table, above)]
    if rotated:
        rows = [env.image_size - 1 - r for r in rows]
    assert rows[1] < rows[0] - 5


def test_corner2_table_is_in_the_lower_half(make_env):
    image = make_env(image_size=64, camera="corner2").reset(seed=0).observation["image"].astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    wood = (r - b > 25) & (r > g) & (g > b)  # the brown tabletop
    assert wood[32:].mean() > 3 * wood[:32].mean() and wood[32:].mean() > 0.15


def test_success_not_reported_at_reset_or_after_idle_steps(make_env):
    for task in envs.list_tasks(MT10):
        env = make_env(task, render=False)
        for seed in range(3):
            ts = env.reset(seed=seed)
            assert env.success is False and env.last_info["success"] is False and ts.reward is None
            for _ in range(3):
                ts = env.step(np.zeros(5, np.float32))
            assert not ts.last() and env.success is False and ts.reward == 0.0, (task, seed)


@pytest.mark.parametrize("task", ["drawer-open", "reach"])
def test_expert_succeeds_and_episode_ends_on_success(make_env, task):
    env = make_env(task, render=False)
    for seed in range(3):
        _, actions, ts = _rollout(env, seed)
        assert ts.last() and ts.discount == 0.0 and ts.reward == 1.0 and env.success
        assert env.step_count == len(actions) <= 150
        spec = env.action_spec()
        assert all(np.all(spec.minimum <= a) and np.all(a <= spec.maximum) for a in actions)


def test_expert_terminates_when_episode_does_not_end_on_success(make_env):
    env = make_env("reach", render=False, end_on_success=False)
    _, actions, ts = _rollout(env, seed=0)
    assert ts.last() and ts.discount == 0.0 and ts.reward == 1.0
    assert actions[-1][4] == 1.0 and all(a[4] == 0.0 for a in actions[:-1])


def test_noisy_expert_records_its_clean_action(make_env):
    env = make_env("push", render=False)
    ts = env.reset(seed=3)
    noisy = envs.make_expert(env, noise=0.3, seed=1)
    executed = noisy.act(ts)
    np.testing.assert_array_equal(noisy.clean_action, envs.make_expert(env).act(ts))
    assert not np.array_equal(executed, noisy.clean_action)


def test_truncation_after_max_steps_and_terminate_action(make_env):
    env = make_env("push", render=False, max_steps=4)
    ts = env.reset(seed=0)
    while not ts.last():
        ts = env.step(np.zeros(5, np.float32))
    assert env.step_count == 4 and ts.discount == 1.0 and ts.reward == 0.0
    assert env.step(np.zeros(5)).first()  # stepping after the end starts a new episode
    ts = env.step(np.array([0, 0, 0, 0, 1], np.float32))
    assert ts.last() and ts.discount == 0.0 and env.last_info["success"] is False


def test_out_of_bounds_actions_are_clipped(make_env):
    env = make_env("reach", render=False)
    states = []
    for action in ([40, -3, 2, 9, 0.4], [1, -1, 1, 1, 0.4]):
        env.reset(seed=2)
        for _ in range(5):
            ts = env.step(np.array(action, np.float32))
        states.append(ts.observation["state"])
    np.testing.assert_array_equal(states[0], states[1])


@pytest.mark.parametrize(
    "action, match",
    [
        (np.zeros(4), r"action must have shape \(5,\) = \[dx, dy, dz, gripper, terminate\], got shape \(4,\)"),
        (np.zeros((1, 5)), r"got shape \(1, 5\)"),
        ([0, 0, np.nan, 0, 0], r"action must be finite \(5,\) floats"),
    ],
)
def test_bad_action_is_rejected(make_env, action, match):
    env = make_env("reach", render=False)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((MT10, "fly"), {},
         r"task must be one of \[.*'drawer-open'.*'window-open'\] for env 'metaworld-mt10', got 'fly'"),
        ((MT10, "assembly"), {}, r"task must be one of .* for env 'metaworld-mt10', got 'assembly'"),  # MT50 only
        (("kitchen", "reach"), {}, r"name must be one of \['tabletop', 'metaworld-mt10', 'metaworld-mt50'\]"),
        ((MT10, "reach"), {"camera": "front"}, r"camera must be one of \['corner', 'corner2'.*got 'front'"),
        ((MT10, "reach"), {"max_steps": 501}, r"max_steps must be an int in \[1, 500\].*got 501"),
        ((MT10, "reach"), {"goals": "test"}, r"goals must be one of \['benchmark', 'random'\], got 'test'"),
        ((MT10, "reach"), {"image_size": 0}, r"image_size must be a positive int, got 0"),
        ((MT10, "reach"), {"render_quality": "ultra"}, r"render_quality must be one of \['fast', 'full'\]"),
    ],
)
def test_bad_constructor_arguments_are_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        envs.make(*args, render=False, **kwargs)


def test_metaworld_spelling_of_task_names_is_accepted(make_env):
    assert make_env("drawer-open-v3", render=False).task == "drawer-open"


def test_make_expert_rejects_foreign_envs():
    with pytest.raises(TypeError, match="env must be a TabletopEnv or MetaWorldEnv"):
        envs.make_expert(object())


@pytest.mark.filterwarnings("ignore:.*not having a spec")  # built directly, not via gymnasium.make
def test_gymnasium_check_env():
    env = envs.make_gym(MT10, "window-open", image_size=32, seed=0)
    try:
        check_env(env.unwrapped)
        obs, info = env.reset(seed=0)
        assert obs in env.observation_space and info["task"] == "window-open" and info["success"] is False
        assert env.render().shape == (32, 32, 3)
    finally:
        env.close()
    env.close()  # closing twice is allowed


def test_make_vec_steps_a_batch_of_tasks():
    vec = envs.make_vec(MT10, ["reach", "push"], 3, image_size=32, asynchronous=False)
    try:
        obs, info = vec.reset(seed=0)
        assert obs["image"].shape == (3, 32, 32, 3) and obs["state"].shape == (3, 7)
        assert list(info["task"]) == ["reach", "push", "reach"]
        assert obs["instruction"][1] in envs.list_tasks(MT10)["push"]
        obs, reward, terminated, truncated, info = vec.step(np.zeros((3, 5), np.float32))
        assert reward.shape == (3,) and not terminated.any() and not truncated.any()
    finally:
        vec.close()


@pytest.mark.slow  # spawns worker processes that import MuJoCo and Meta-World (~20 s on 2 cores)
def test_make_vec_async_matches_sync():
    results = []
    for asynchronous in (True, False):
        vec = envs.make_vec(MT10, "drawer-close", 2, image_size=32, asynchronous=asynchronous)
        try:
            obs, _ = vec.reset(seed=5)
            obs, *_ = vec.step(np.tile(np.array([0.5, 0, -0.5, 0, 0], np.float32), (2, 1)))
            results.append(obs["image"])
        finally:
            vec.close()
    np.testing.assert_array_equal(results[0], results[1])


def test_make_vec_validates_its_arguments():
    with pytest.raises(ValueError, match=r"n must be a positive int"):
        envs.make_vec(MT10, "reach", 0)
    with pytest.raises(ValueError, match=r"task must be one of .*got 'fly'"):
        envs.make_vec(MT10, ["reach", "fly"], 2)


def test_bench_env_reports_per_task_numbers():
    from rollout.bench.env import bench_env

    res = bench_env(MT10, ["reach"], seeds=2, image_size=32, frames=3, upstream=True, progress=False)
    row = res["per_task"]["reach"]
    assert row["expert_success"] == 1.0 and row["upstream_expert_success"] == 1.0 and row["episodes"] == 2
    assert row["control_steps_per_s"] > 0 and row["rendered_frames_per_s"] > 0 and row["camera"] == "corner2"
    assert row["control_steps_per_cpu_s"] > 0 and row["rendered_frames_per_cpu_s"] > 0 and row["max_length"] <= 200
    json.dumps(res)


@pytest.mark.slow  # TensorFlow import and an RLDS write (~50 s on the shared 2 cores)
def test_collect_writes_metaworld_rlds(tmp_path):
    from datasets.collect import collect
    from datasets.rlds_dataset import RLDSDataset

    res = collect(MT10, ["reach"], 2, tmp_path / "mw", image_size=32, workers=1, progress=False)
    assert res.episodes_written == 2 and res.episodes_failed == 0
    ds = RLDSDataset(res.path)
    summary = ds.summary()
    assert summary.num_episodes == 2 and summary.image_shape == (32, 32, 3)
    assert summary.proprio_dim == 7 and summary.action_dim == 5  # tcp xyz, gripper, goal xyz
    assert set(summary.instructions) <= set(envs.list_tasks(MT10)["reach"])
    benchmark = mwe.benchmark_goals("MT10")["reach"]
    assert all(_is_benchmark_goal(g, benchmark) for g in _first_goals(ds))

    # --goals random: a fresh goal per episode, recorded in the sidecar
    res = collect(MT10, ["reach"], 2, tmp_path / "mw_random", image_size=32, workers=1, progress=False,
                  goals="random")
    ds = RLDSDataset(res.path)
    assert ds.sidecar["goals"] == "random"
    assert not any(_is_benchmark_goal(g, benchmark) for g in _first_goals(ds))
    with pytest.raises(ValueError, match="--goals: only Meta-World"):
        collect("tabletop", ["reach"], 1, tmp_path / "tt", goals="random", progress=False)


def _first_goals(ds) -> list[np.ndarray]:
    """The goal part of each episode's first state."""
    return [next(iter(ep["steps"].batch(1)))["observation"]["state"].numpy()[0, 4:]
            for ep in ds.episodes(decode_images=False)]


def _is_benchmark_goal(goal, benchmark_vecs) -> bool:
    return bool(np.any(np.all(np.abs(benchmark_vecs[:, -3:] - goal) < 1e-4, axis=1)))


@pytest.mark.filterwarnings("ignore:Constant")  # upstream's move() warns when its gain saturates
@pytest.mark.parametrize("task, seeds", [("door-open", (10, 11)), ("peg-insert-side", (2, 9))])
def test_patched_experts_succeed_where_upstream_fails(make_env, task, seeds):
    """Regression for the patches in envs/metaworld_env.py: MT10 goals on which upstream's policy fails."""
    from metaworld.policies import ENV_POLICY_MAP

    env = make_env(task, render=False)
    assert type(envs.make_expert(env).policy) is mwe.PATCHED_POLICIES[task]
    upstream = ENV_POLICY_MAP[mwe.mw_name(task)]()
    for seed in seeds:
        assert _rollout(env, seed)[2].reward == 1.0
        ts = env.reset(seed=seed)
        while not ts.last():
            ts = env.step(mwe.from_metaworld_action(upstream.get_action(env.raw_observation)))
        assert not env.success, f"upstream now solves {task} seed {seed}: the patch may be unnecessary"


def test_cli_bench_env_writes_json_and_names_bad_tasks(tmp_path, capsys):
    from run_policy import main

    out = tmp_path / "env.json"
    args = ["bench", "env", "--env", MT10, "--tasks", "reach", "--seeds", "1", "--frames", "2", "--image-size", "32"]
    assert main(args + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env"] == MT10 and list(result["per_task"]) == ["reach"] and result["image_size"] == 32
    assert main(["bench", "env", "--env", MT10, "--tasks", "reach,fly"]) == 2
    assert "unknown task(s) ['fly']" in capsys.readouterr().err
