"""The robot loop drives the real tabletop env (standing in for a robot) through a misbehaving policy:
it never sends NaN or out-of-bounds actions, holds when the policy is late, and stops when told."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import dm_env
import numpy as np
import pytest
import torch
from dm_env import specs

import envs
from policy.runner import PolicyRunner
from rollout.random_policy import build_random_policy
from rollout.robot_loop import ActionSpecError, BadActionError, PolicyOverrunError, RobotLoop, hold_keep
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
    # Half its actions are bad, in runs of up to 5: the bad-action limit (tested below) is not the point here.
    loop = RobotLoop(env, ChaosPolicy(runner, seed=0), rate_hz=10, hold_action=hold_keep(spec, [3]),
                     max_consecutive_late=None, max_bad_actions=40)
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
        assert env.resets == 1 and Counting.resets == 1 and len(env.sent) == 3  # 2 steps + the exit hold
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
    for n in (0, -1, 2.5, True, None, "3"):
        with pytest.raises(ValueError, match=r"max_bad_actions: expected an integer >= 1, got"):
            RobotLoop(env, runner, max_bad_actions=n)
    assert RobotLoop(env, runner).max_bad_actions == 10  # 1 s of holding at the default 10 Hz



# ---- reliability: the env's action spec, bad actions in a row, non-numeric actions, every exit holds ----

HOLD = np.array([0, 0, 0, 1, 0], np.float32)  # hold_keep(spec, [3]) after MOVE: still, gripper kept closed
MOVE = np.array([0.5, 0, 0, 1, 0], np.float32)  # move, gripper closed, do not terminate


class SpecEnv(RecordingEnv):
    """The real env, reporting another action spec (a driver with a broken spec)."""

    def __init__(self, env, spec):
        super().__init__(env)
        self.spec = spec

    def action_spec(self):
        return self.spec


def _float16_overflow():
    with np.errstate(over="ignore"):  # dm_env stores the bounds in the spec's dtype: -1e5 -> -inf
        return specs.BoundedArray((5,), np.float16, -1e5, 1.0)


def _swapped_bounds():
    spec = specs.BoundedArray((5,), np.float32, -1.0, 1.0, name="action")
    spec._minimum = np.array([-1, -1, -1, -1, 2], np.float32)  # dm_env refuses this at construction; a driver's own spec may not
    return spec


@pytest.mark.parametrize("spec, match", [
    (specs.BoundedArray((5,), np.float32, np.nan, 1.0), r"env action_spec\.minimum: expected finite numbers, got \[nan nan nan nan nan\]"),
    (specs.BoundedArray((5,), np.float32, -1.0, [1, 1, 1, 1, np.inf]), r"env action_spec\.maximum: expected finite numbers, got \[ 1\. +1\. +1\. +1\. +inf\]"),
    (_float16_overflow(), r"env action_spec\.minimum: expected finite numbers, got \[-inf -inf -inf -inf -inf\]"),
    (_swapped_bounds(), r"env action_spec: expected minimum <= maximum, got minimum .* at index \[4\]"),
    (specs.BoundedArray((5,), np.int32, -1, 1), r"env action_spec\.dtype: expected a floating dtype \(e\.g\. float32\), got int32"),
    (specs.Array((5, 1), np.float32), r"env action_spec\.shape: expected a known 1-D shape \(n,\) with n >= 1, got \(5, 1\)"),
    (specs.Array((), np.float32), r"env action_spec\.shape: expected a known 1-D shape \(n,\) with n >= 1, got \(\)"),
    ({"arm": specs.Array((5,), np.float32)}, r"env action_spec: expected a dm_env specs\.Array \(one flat action\), got dict"),
], ids=["nan_min", "inf_max", "overflowing_min", "min_above_max", "int_dtype", "2d_shape", "scalar_shape", "dict"])
def test_an_action_spec_that_cannot_be_guarded_is_refused(env, runner, spec, match):
    # NaN bounds used to make every clipped action NaN: now refused before the robot is touched.
    e = SpecEnv(env.env, spec)
    with pytest.raises(ActionSpecError, match=match) as exc:
        RobotLoop(e, runner)
    assert isinstance(exc.value, ValueError)
    assert e.sent == [] and e.resets == 0


def test_a_hold_action_that_is_not_finite_or_not_in_bounds_is_refused(env, runner):
    with pytest.raises(ActionSpecError, match=r"hold_action: expected values within the env action_spec bounds "
                                              r"\[-1\. -1\. -1\. -1\.  0\.\]\.\.\[1\. 1\. 1\. 1\. 1\.\], got \[0\. 0\. 0\. 0\. 2\.\]"):
        RobotLoop(env, runner, hold_action=np.array([0, 0, 0, 0, 2.0]))
    with pytest.raises(ActionSpecError, match=r"hold_action: expected finite values of shape \(5,\), got \[nan"):
        RobotLoop(env, runner, hold_action=np.full(5, np.nan))
    with pytest.raises(ActionSpecError, match=r"hold_action: expected finite values"):  # a callable: checked too
        RobotLoop(env, runner, hold_action=lambda last: np.full(5, np.inf))
    assert env.sent == [] and env.resets == 0


class Scripted:
    """A policy answering from a list (its last entry repeated); an exception instance is raised."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def reset(self, instruction):
        pass

    def step(self, obs):
        self.calls += 1
        out = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(out, BaseException):
            raise out
        return out


NOT_ACTIONS = {  # each would have reached the robot (or ended the episode) before
    "strings": (["0.1", "0", "0", "0", "0"], r"expected real numbers \(integer or floating\), got dtype <U3"),
    "complex": (np.array([0.1 + 1j, 0, 0, 0, 0]), r"expected real numbers \(integer or floating\), got dtype complex128"),
    "bool": (np.ones(5, bool), r"expected real numbers \(integer or floating\), got dtype bool"),  # True -> 1.0 = terminate
    "object": (np.array([0.1, None, 0, 0, 0], dtype=object), r"got dtype object"),
    "torch_bool": (torch.ones(5, dtype=torch.bool), r"got dtype bool"),
    "dict": ({"world_vector": [0, 0, 0]}, r"got dtype object"),
    "ragged": ([[0.1, 0.2], [0.3]], r"got list \(not an array\)"),
    "shape": (np.zeros((1, 5), np.float32), r"expected shape \(5,\), got shape \(1, 5\)"),
    "nan": (np.array([0, np.nan, 0, 0, 0], np.float32), r"non_finite: action \[0\.0, nan, 0\.0, 0\.0, 0\.0\]"),
}


def test_guard_accepts_only_real_finite_numbers_of_the_right_shape(env, runner):
    spec = env.action_spec()
    loop = RobotLoop(env, runner, hold_action=hold_keep(spec, [3]))
    for name, (action, reason) in NOT_ACTIONS.items():
        out, clipped, events = loop.guard(action, MOVE)
        assert np.array_equal(out, HOLD) and out.dtype == np.float32 and clipped == 0, name
        assert len(events) == 1 and events[0].endswith("; sent hold"), name
        assert re.search(reason, events[0]), (name, events[0])
    for good in ([0.1, 0, 0, 1, 0], np.array([0, 0, 1, 1, 0], np.int64), np.array([0, 0, 0, 1, 0], np.uint8),
                 torch.tensor([0.1, 0, 0, 1, 0]), np.array([0.1, 0, 0, 1, 0], np.float64)):
        out, clipped, events = loop.guard(good, None)
        assert events == [] and out.dtype == np.float32
        np.testing.assert_array_equal(out, np.asarray(good, np.float32))
    out, clipped, events = loop.guard(np.array([1e300, 0, 0, 0, -1e300]), None)  # finite float64: clipped
    assert events == [] and clipped == 2 and np.array_equal(out, [1, 0, 0, 0, 0])


def test_a_bool_action_is_held_not_sent_as_terminate(env):
    # np.ones(5, bool) used to become 1.0 everywhere: terminate > 0.5 ended the episode.
    res = RobotLoop(env, Scripted([np.ones(5, bool)]), rate_hz=20).run(max_steps=3)
    assert res.stop_reason == "max_steps" and res.steps == 3
    assert all(r.source == "policy" and r.events == ["bad_action: expected real numbers (integer or floating), "
                                                      "got dtype bool; sent hold"] for r in res.records)
    assert all(np.all(a == 0) for a in env.sent) and env.resets == 1  # 3 holds + the exit hold, no new episode


@pytest.mark.parametrize("kind", ["nan", "shape", "strings", "complex"])
def test_consecutive_bad_actions_stop_the_loop(env, kind):
    action, reason = NOT_ACTIONS[kind]
    loop = RobotLoop(env, Scripted([action]), rate_hz=20, max_bad_actions=4, max_consecutive_late=None)
    with pytest.raises(BadActionError, match=r"policy actions: 4 bad actions in a row \(max_bad_actions=4\), "
                                             r"the last at step 3: .*" + reason) as exc:
        loop.run()
    res = exc.value.result
    assert res.steps == 4 and res.stop_reason.startswith("bad_actions: 4 in a row; last: ")
    assert all(len(r.events) == 1 for r in res.records)  # each held, with its reason
    assert len(env.sent) == 5 and all(np.all(a == 0) for a in env.sent)  # 4 holds + the exit hold
    assert np.array_equal(res.exit_action, np.zeros(5))


def test_a_good_action_resets_the_bad_action_count(env):
    nan = np.full(5, np.nan, np.float32)
    loop = RobotLoop(env, Scripted([nan, nan, nan, MOVE] * 3), rate_hz=20, max_bad_actions=4, max_consecutive_late=None)
    try:
        res = loop.run(max_steps=12)
    except BadActionError as exc:
        res = exc.result
    if all(r.source == "policy" for r in res.records):  # (a late good answer would join two bad runs)
        assert res.stop_reason == "max_steps" and res.steps == 12


def test_every_exit_leaves_the_robot_holding(env):
    spec = env.action_spec()
    # max_steps and the stop hook: the last command would be the policy's; one hold is sent after it.
    for kwargs, run_kw, reason in (({}, {"max_steps": 3}, "max_steps"),
                                   ({"stop_hook": lambda rec, ts: rec.step == 2}, {}, "stop_hook")):
        env.sent.clear()
        res = RobotLoop(env, Scripted([MOVE]), rate_hz=20, hold_action=hold_keep(spec, [3]), **kwargs).run(**run_kw)
        assert res.stop_reason == reason and res.steps == 3
        assert len(env.sent) == 4 and np.array_equal(env.sent[-1], HOLD) and np.array_equal(res.exit_action, HOLD)
        assert res.events[-1] == {"step": 3, "event": f"exit_hold: sent hold on exit ({reason})"}
    # The episode ended: a step now would start a new one (a real arm would go home), so nothing is sent.
    env.sent.clear()
    resets = env.resets
    res = RobotLoop(env, Scripted([MOVE, MOVE, np.array([0, 0, 0, 1, 1], np.float32)]), rate_hz=20).run()
    assert res.stop_reason == "episode_end" and res.steps == 3 and len(env.sent) == 3
    assert res.exit_action is None and env.resets == resets + 1


class InterruptingEnv(RecordingEnv):
    """Ctrl-C while the robot takes its `at`-th command."""

    def __init__(self, env, at):
        super().__init__(env)
        self.at = at

    def step(self, action):
        ts = super().step(action)
        if len(self.sent) == self.at:
            raise KeyboardInterrupt
        return ts


@pytest.mark.parametrize("where", ["policy_thread", "tick_wait", "env_step", "stop_hook"])
def test_an_interrupt_sends_the_hold_once_and_is_reraised(env, where):
    # A KeyboardInterrupt used to leave run() with no hold sent for that tick. Each point raises once:
    # the policy's worker thread, the wait between ticks, the robot's step, the stop hook.
    spec = env.action_spec()
    answers = [MOVE] * 3 + ([KeyboardInterrupt()] if where == "policy_thread" else []) + [MOVE]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if where == "tick_wait" and len(sleeps) == 3:
            raise KeyboardInterrupt
        time.sleep(s)

    e = InterruptingEnv(env.env, at=3 if where == "env_step" else 0)
    fired = []

    def hook(rec, ts):
        if where == "stop_hook" and rec.step == 2 and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return False

    loop = RobotLoop(e, Scripted(answers), rate_hz=10, hold_action=hold_keep(spec, [3]), sleep=sleep, stop_hook=hook,
                     max_consecutive_late=None)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    # Three policy actions, then exactly one hold: in bounds, still, the gripper as it was.
    assert len(e.sent) == 4, e.sent
    assert all(np.array_equal(a, MOVE) for a in e.sent[:3]) and np.array_equal(e.sent[3], HOLD)
    assert not loop.busy
    res = loop.run(max_steps=2)  # the loop is usable after the interrupt
    assert res.stop_reason == "max_steps" and res.steps == 2


def test_a_late_interrupt_from_the_policy_thread_is_reraised(env):
    # Raised after its deadline: found at a later tick, not taken for a failed call to ask again.
    class LateInterrupt(Scripted):
        def step(self, obs):
            if self.calls == 0:
                self.calls += 1
                time.sleep(0.15)
                raise KeyboardInterrupt
            return super().step(obs)

    loop = RobotLoop(env, LateInterrupt([MOVE]), rate_hz=20, max_consecutive_late=None)
    with pytest.raises(KeyboardInterrupt):
        loop.run(max_steps=20)
    assert 2 <= len(env.sent) < 20 and all(np.all(a == 0) for a in env.sent)  # late holds, then the exit hold
    assert not loop.busy


def test_ctrl_c_sends_the_hold_and_is_reraised():
    # A real SIGINT, landing wherever the loop is (waiting for the policy, between ticks, in the env).
    code = """
import os, signal, threading, time, json
# A child inherits an ignored SIGINT from its parent (an earlier test of the suite may leave it ignored in
# pytest): restore Python's handler, as in a terminal, or the signal below does nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np, envs
from rollout.robot_loop import RobotLoop, hold_keep
env = envs.make("tabletop", task="lift", seed=3, max_steps=10_000)
sent = []
step = env.step
env.step = lambda a: (sent.append(np.array(a).tolist()), step(a))[1]
class Slow:
    def reset(self, instruction): pass
    def step(self, obs):
        time.sleep(0.02)
        return np.array([0.5, 0, 0, 1, 0], np.float32)
threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    RobotLoop(env, Slow(), rate_hz=10, hold_action=hold_keep(env.action_spec(), [3])).run()
except KeyboardInterrupt:
    print(json.dumps(sent))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sent = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), np.float32)
    # The last command the robot got is the hold (exactly-once is checked above, without timing).
    assert np.array_equal(sent[-1], HOLD) and any(np.array_equal(a, MOVE) for a in sent[:-1])
