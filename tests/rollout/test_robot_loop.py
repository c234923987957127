"""The robot loop drives the real tabletop env (standing in for a robot) through a misbehaving policy:
it never sends NaN or out-of-bounds actions, holds when the policy is late, and stops when told."""
import os
import subprocess
import sys
import threading
import time

import dm_env
import numpy as np
import pytest
import torch

import envs
from policy.runner import PolicyRunner
from rollout.random_policy import build_random_policy
from rollout.robot_loop import PolicyOverrunError, RobotLoop, hold_keep
from tests.helpers import ROOT

# Whole-episode TTM memory: a step that lands after a reset shows in the state.
EPISODE_MEMORY = ["model.controller.memory_horizon=0", "data.sequence=episode", "data.sequence_length=60"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return PolicyRunner.load(build_random_policy(tmp_path_factory.mktemp("pol") / "policy"))


@pytest.fixture(scope="module")
def ttm_dir(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("ttm") / "policy", overrides=EPISODE_MEMORY)


@pytest.fixture
def ttm(ttm_dir):
    return PolicyRunner.load(ttm_dir)


def _slow_model(runner, monkeypatch, before):
    """The runner's model step calls `before()` first (a sleep, a wait): a policy that overruns."""
    step = runner.model.step
    finished = threading.Event()

    def slow(*args, **kwargs):
        before()
        out = step(*args, **kwargs)
        finished.set()
        return out

    monkeypatch.setattr(runner.model, "step", slow)
    return finished


def _same_state(a, b):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


class RecordingEnv(dm_env.Environment):
    """Wraps the robot (here the simulator) and records every action it receives."""

    def __init__(self, env):
        self.env, self.sent, self.resets = env, [], 0

    def reset(self):
        self.resets += 1
        return self.env.reset()

    def step(self, action):
        self.sent.append(np.array(action, copy=True))
        return self.env.step(action)

    def observation_spec(self):
        return self.env.observation_spec()

    def action_spec(self):
        return self.env.action_spec()

    def close(self):
        self.env.close()


class ChaosPolicy:
    """The real runner, but a seeded fraction of its actions are NaN/Inf/huge/wrong-shaped, some steps sleep."""

    def __init__(self, runner, seed, late_every=0, late_s=0.0, chaos=True):
        self.runner, self.rng, self.chaos = runner, np.random.default_rng(seed), chaos
        self.late_every, self.late_s, self.calls = late_every, late_s, 0

    def reset(self, instruction):
        self.runner.reset(instruction)

    def step(self, obs):
        self.calls += 1
        a = self.runner.step(obs)
        if self.late_every and self.calls % self.late_every == 0:
            time.sleep(self.late_s)
        kind = self.rng.integers(6) if self.chaos else 5
        if kind == 0:
            a[self.rng.integers(a.size)] = np.nan
        elif kind == 1:
            a[self.rng.integers(a.size)] = self.rng.choice([np.inf, -np.inf])
        elif kind == 2:
            a = a * 1e6 + self.rng.normal(size=a.size) * 50
        elif kind == 3:
            return a[:3]
        return a


@pytest.fixture
def env():
    e = RecordingEnv(envs.make("tabletop", task="lift", seed=11, max_steps=40))
    yield e
    e.close()


def test_never_sends_nan_or_out_of_bounds_actions(env, runner):
    spec = env.action_spec()
    loop = RobotLoop(env, ChaosPolicy(runner, seed=0), rate_hz=10, hold_action=hold_keep(spec, [3]),
                     max_consecutive_late=None)
    res = loop.run()
    assert res.steps == len(env.sent) and res.stop_reason == "episode_end"  # a clipped terminate may end it early
    sent = np.stack(env.sent)
    assert np.all(np.isfinite(sent))
    assert np.all(sent >= spec.minimum) and np.all(sent <= spec.maximum)
    if sum(r.source == "policy" for r in res.records) >= 20:  # unless the machine is too loaded to answer in time
        kinds = {e["event"].split(":")[0] for e in res.events}
        assert {"non_finite", "bad_action"} <= kinds  # each guard fired and was logged
        assert sum(r.clipped for r in res.records) > 0
    # The guard itself, on a seeded stream of hostile actions (independent of timing).
    rng = np.random.default_rng(7)
    last = None
    for _ in range(500):
        a = rng.normal(size=int(rng.choice([5, 5, 5, 4, 6]))) * rng.choice([1, 10, 1e9])
        if a.size == 5 and rng.random() < 0.3:
            a[rng.integers(5)] = rng.choice([np.nan, np.inf, -np.inf])
        out, clipped, events = loop.guard(a, last)
        assert out.shape == (5,) and np.all(np.isfinite(out))
        assert np.all(out >= spec.minimum) and np.all(out <= spec.maximum)
        assert bool(events) == (a.size != 5 or not np.all(np.isfinite(a)))
        last = out


def test_holds_when_the_policy_is_late(env, runner):
    spec = env.action_spec()
    policy = ChaosPolicy(runner, seed=1, late_every=4, late_s=0.15, chaos=False)
    res = RobotLoop(env, policy, rate_hz=20, deadline_s=0.04, hold_action=hold_keep(spec, [3]),
                    max_consecutive_late=None).run(max_steps=25)
    late = [r for r in res.records if r.source == "hold"]
    assert late, "no step was late"
    assert all(r.policy_ms is None and any(e.startswith("late") for e in r.events) for r in late)
    on_time = [r for r in res.records if r.source == "policy"]
    assert all(r.policy_ms is not None for r in on_time)  # (wall times under load: no bound asserted)
    for r in late:  # the hold action: no motion, the gripper as last sent
        sent = env.sent[r.step]
        assert np.all(sent[[0, 1, 2, 4]] == 0)
        assert sent[3] == (env.sent[r.step - 1][3] if r.step else 0)
    assert res.steps == 25 and [r.step for r in res.records] == list(range(25))  # one action per tick, none skipped


class HungPolicy:
    """A policy whose step blocks until `release` is set (at most 10 s)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def reset(self, instruction):
        pass

    def step(self, obs):
        self.release.wait(10)


def test_watchdog_stops_a_hung_policy_holding(env, runner):
    release = threading.Event()

    loop = RobotLoop(env, HungPolicy(release), rate_hz=50, max_consecutive_late=5, drain_timeout_s=0.05)
    try:
        # The hung call is still running when the loop stops: run() says so rather than return as if idle.
        with pytest.raises(PolicyOverrunError, match="still running") as exc:
            loop.run()
    finally:
        release.set()
    res = exc.value.result
    assert res.steps == 5 and res.stop_reason.startswith("watchdog: 5 consecutive")
    assert all(np.all(a == 0) for a in env.sent)


def test_run_returns_only_once_a_late_step_has_returned(env, ttm, monkeypatch):
    # A late step writes the runner's state when it returns; had run() returned first, that write would
    # land on top of the next reset (the old episode's memory in the new one).
    finished = _slow_model(ttm, monkeypatch, lambda: time.sleep(0.35))
    res = RobotLoop(env, ttm, rate_hz=10).run(max_steps=2)
    assert finished.is_set() and ttm.steps == 1  # the late step is done before run() returned
    assert [r.source for r in res.records] == ["hold", "hold"]
    assert any(e["event"].startswith("drained: waited") for e in res.events)
    ttm.reset("pick up the red block")
    assert ttm.steps == 0 and _same_state(ttm._state, ttm.model.init_state(1))
    assert not [t for t in threading.enumerate() if t.name == "policy-step" and t.is_alive()]


def test_a_step_past_the_drain_timeout_raises_and_blocks_the_next_reset(env, ttm, monkeypatch):
    release = threading.Event()
    finished = _slow_model(ttm, monkeypatch, lambda: release.wait(10))

    class Counting:
        resets = 0

        def reset(self, instruction):
            Counting.resets += 1
            ttm.reset(instruction)

        def step(self, obs):
            return ttm.step(obs)

    loop = RobotLoop(env, Counting(), rate_hz=20, drain_timeout_s=0.05)
    try:
        with pytest.raises(PolicyOverrunError, match=r"loop step 0 is still running .* after the loop ended") as exc:
            loop.run(max_steps=2)
        assert exc.value.result.steps == 2 and loop.busy
        # Still running: the next run() refuses before it moves the robot or resets the policy.
        with pytest.raises(PolicyOverrunError, match="at the start of run"):
            loop.run(max_steps=2)
        assert env.resets == 1 and Counting.resets == 1 and len(env.sent) == 2
    finally:
        release.set()
    loop.drain_timeout = 30.0  # the released step finishes at the next run's start
    res = loop.run(max_steps=2)
    assert finished.is_set() and not loop.busy and res.steps == 2 and Counting.resets == 2


def test_a_new_policy_is_not_blocked_by_the_old_ones_stuck_step(env, runner):
    release = threading.Event()

    loop = RobotLoop(env, HungPolicy(release), rate_hz=50, max_consecutive_late=2, drain_timeout_s=0.05)
    try:
        with pytest.raises(PolicyOverrunError):
            loop.run()
        loop.policy = runner  # e.g. a new PolicyClient after a lost link
        loop.max_consecutive_late, loop.drain_timeout = None, 30.0  # (a loaded machine may be late)
        res = loop.run(max_steps=2)  # the old policy's call is still stuck: not waited for
        assert res.steps == 2 and res.stop_reason == "max_steps"
    finally:
        release.set()


def test_a_script_ending_right_after_a_late_step_exits_cleanly(ttm_dir):
    # The late step used to be inside torch when the interpreter exited: "terminate called without an
    # active exception", rc 134.
    code = f"""
import time, envs
from policy.runner import PolicyRunner
from rollout.robot_loop import RobotLoop
r = PolicyRunner.load({str(ttm_dir)!r})
step = r.model.step
def slow(*a, **k):
    t = time.monotonic()
    while time.monotonic() - t < 0.35:
        out = step(*a, **k)
    return out
r.model.step = slow
RobotLoop(envs.make("tabletop", task="lift", seed=1), r, rate_hz=10).run(max_steps=2)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr


def test_stop_hook_and_stop(env, runner):
    res = RobotLoop(env, runner, rate_hz=100, stop_hook=lambda rec, ts: rec.step == 6).run()
    assert res.stop_reason == "stop_hook" and res.steps == 7
    loop = RobotLoop(env, runner, rate_hz=20)
    threading.Timer(0.2, loop.stop).start()
    res = loop.run()
    assert res.stop_reason == "stop" and 1 <= res.steps < 40


def test_a_stop_before_run_is_not_lost(env, runner):
    loop = RobotLoop(env, runner, rate_hz=50)
    loop.stop()
    res = loop.run()
    assert res.stop_reason == "stop" and res.steps == 0
    assert env.sent == [] and env.resets == 0  # the robot did not move, not even to its reset pose
    res = loop.run(max_steps=3)  # each stop ends one run
    assert res.stop_reason == "max_steps" and res.steps == 3


def test_policy_exception_holds_and_stops(env, runner):
    class Broken:
        def reset(self, instruction):
            pass

        def step(self, obs):
            raise ObservationErrorLike("observation['image']: expected uint8 (64, 64, 3), got float32")

    res = RobotLoop(env, Broken(), rate_hz=50).run()
    assert res.steps == 1 and res.stop_reason.startswith("policy_error") and "observation['image']" in res.stop_reason
    assert np.all(env.sent[0] == 0)


class ObservationErrorLike(ValueError):
    pass


def test_bad_loop_settings_are_refused(env, runner):
    with pytest.raises(ValueError, match="rate_hz"):
        RobotLoop(env, runner, rate_hz=0)
    with pytest.raises(ValueError, match="deadline_s"):
        RobotLoop(env, runner, rate_hz=10, deadline_s=0.5)
    with pytest.raises(ValueError, match="hold_action: expected shape"):
        RobotLoop(env, runner, hold_action=np.zeros(3))
    with pytest.raises(TypeError, match="dm_env.Environment"):
        RobotLoop(object(), runner)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        RobotLoop(env, runner, drain_timeout_s=-1)
