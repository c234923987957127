"""The robot control loop: a policy (in-process PolicyRunner or a remote PolicyClient) drives any
dm_env.Environment (the interface a robot driver implements; docs/ROBOT.md) at a fixed rate, with guards:

- every action is checked before it is sent: wrong shape or NaN/Inf -> the hold action; outside the
  env's action_spec bounds -> clipped. Nothing else ever reaches the robot.
- watchdog: the policy runs in a worker thread and must answer within `deadline_s` of the tick; if it
  is late the hold action is sent and a "late" event logged. A late answer is discarded (it was computed
  for an old observation); the next tick asks again with the fresh observation.
- after `max_consecutive_late` late steps in a row (the policy hangs or the link is down) the loop
  stops, the last action sent being the hold action; a policy exception holds and stops at once.
  `stop()` (any thread) or the stop hook stop it after the current step; a stop() that comes while no
  run is going stops the next run before it moves the robot (a stop is never lost).
- one policy call at a time: run() returns only once the policy is idle. A step still running when the
  loop ends (a late one) is waited for, up to `drain_timeout_s`, because it writes the policy's episode
  state when it returns and would overwrite the next reset. If it does not return in time run() raises
  PolicyOverrunError (the loop's log in `.result`), and the next run() waits again before it resets
  anything.
- a per-step log: policy latency, what was sent (policy or hold), events, tick overruns.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import dm_env
import numpy as np
from dm_env import specs

log = logging.getLogger("policy.robot_loop")


class StepPolicy(Protocol):
    def reset(self, instruction: str) -> None: ...
    def step(self, observation: Any) -> np.ndarray: ...


HoldAction = Callable[[np.ndarray | None], np.ndarray]


def hold_zero(spec: specs.Array) -> HoldAction:
    """The stop action: zeros, clipped into the bounds (for delta-position arms: stand still)."""
    zero = np.zeros(spec.shape, np.float32)
    return lambda last: zero


def hold_keep(spec: specs.Array, keep: Sequence[int]) -> HoldAction:
    """Zeros, except the dims in `keep` (e.g. the gripper) stay at their last sent value, so holding
    still does not drop what the gripper holds."""
    keep = list(keep)
    n = int(np.prod(spec.shape))
    bad = [k for k in keep if not 0 <= k < n]
    if bad:
        raise ValueError(f"hold keep: expected action indices in 0..{n - 1}, got {bad}")

    def hold(last: np.ndarray | None) -> np.ndarray:
        a = np.zeros(spec.shape, np.float32)
        if last is not None:
            a.flat[keep] = np.asarray(last, np.float32).flat[keep]
        return a

    return hold


@dataclass
class StepRecord:
    step: int
    t: float  # seconds since the loop started
    source: str  # "policy" | "hold"
    policy_ms: float | None  # None when the policy did not answer in time
    clipped: int  # action entries clipped into bounds
    events: list[str] = field(default_factory=list)


@dataclass
class LoopResult:
    steps: int
    stop_reason: str  # "episode_end" | "max_steps" | "stop" | "stop_hook" | "watchdog: ..." | "policy_error: ..."
    total_reward: float
    records: list[StepRecord]
    events: list[dict]
    rate_hz: float
    deadline_ms: float
    actions: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def late_steps(self) -> int:
        return sum(r.source == "hold" for r in self.records)

    def latency_ms(self) -> dict[str, float]:
        ms = np.array([r.policy_ms for r in self.records if r.policy_ms is not None])
        if not ms.size:
            return {}
        return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}

    def to_json(self) -> dict:
        return {"steps": self.steps, "stop_reason": self.stop_reason, "total_reward": self.total_reward,
                "rate_hz": self.rate_hz, "deadline_ms": self.deadline_ms, "late_steps": self.late_steps,
                "policy_latency_ms": self.latency_ms(), "events": self.events,
                "records": [asdict(r) for r in self.records]}


class PolicyOverrunError(RuntimeError):
    """A policy step is still running after the loop ended (or before a new run): the policy's episode
    state is not settled, so the loop neither returns as if idle nor resets the policy. `result`: the
    ended run's LoopResult (None when raised at the start of a run)."""

    def __init__(self, message: str, result: "LoopResult | None" = None):
        super().__init__(message)
        self.result = result


def _call_async(fn: Callable, *args: Any) -> Future:
    # A daemon thread per call: a hung policy must never keep the process (or the robot) hostage.
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # handed to the loop, which holds and stops
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="policy-step").start()
    return fut


class RobotLoop:
    def __init__(self, env: dm_env.Environment, policy: StepPolicy, rate_hz: float = 10.0,
                 deadline_s: float | None = None, hold_action: HoldAction | np.ndarray | None = None,
                 stop_hook: Callable[[StepRecord, dm_env.TimeStep], bool] | None = None,
                 max_consecutive_late: int | None = 10, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 drain_timeout_s: float = 2.0):
        if not isinstance(env, dm_env.Environment):
            raise TypeError(f"env: expected a dm_env.Environment, got {type(env).__name__}")
        if not (isinstance(rate_hz, (int, float)) and 0 < rate_hz <= 1000):
            raise ValueError(f"rate_hz: expected a rate in (0, 1000] Hz, got {rate_hz!r}")
        period = 1.0 / rate_hz
        deadline = period if deadline_s is None else deadline_s
        if not (isinstance(deadline, (int, float)) and 0 < deadline <= period):
            raise ValueError(f"deadline_s: expected a time in (0, {period:.4g}] s (the control period), got {deadline_s!r}")
        self.env, self.policy = env, policy
        self.period, self.deadline = period, float(deadline)
        self.spec = env.action_spec()
        self.low, self.high = _bounds(self.spec)
        if hold_action is None:
            self._hold: HoldAction = hold_zero(self.spec)
        elif callable(hold_action):
            self._hold = hold_action
        else:
            fixed = np.asarray(hold_action, np.float32)
            if fixed.shape != tuple(self.spec.shape):
                raise ValueError(f"hold_action: expected shape {tuple(self.spec.shape)}, got {fixed.shape}")
            self._hold = lambda last: fixed
        if max_consecutive_late is not None and (not isinstance(max_consecutive_late, int) or max_consecutive_late < 1):
            raise ValueError(f"max_consecutive_late: expected an integer >= 1 or None, got {max_consecutive_late!r}")
        self.max_consecutive_late = max_consecutive_late
        if not (isinstance(drain_timeout_s, (int, float)) and drain_timeout_s >= 0):
            raise ValueError(f"drain_timeout_s: expected seconds >= 0, got {drain_timeout_s!r}")
        self.stop_hook = stop_hook
        self.clock, self.sleep = clock, sleep
        self.drain_timeout = float(drain_timeout_s)
        self._stop = threading.Event()
        self._inflight: Future | None = None  # the policy call not yet returned, across runs
        self._inflight_t = 0.0  # (clock) when it was made
        self._inflight_step = 0  # the loop step it was made for
        self._inflight_policy: Any = None  # and the policy it runs on

    def stop(self) -> None:
        """Ask the loop to stop after the current step (thread-safe). Called while no run is going, it
        stops the next run() before it moves the robot. Each stop ends one run."""
        self._stop.set()

    @property
    def busy(self) -> bool:
        """A policy call is still running (a late step left over from a run)."""
        return self._inflight is not None and not self._inflight.done()

    def _drain(self, result: LoopResult | None) -> None:
        """Wait (bounded) for the in-flight policy call: it writes the policy's state when it returns."""
        fut = self._inflight
        if fut is None:
            return
        if result is None and self._inflight_policy is not self.policy:
            self._inflight = None  # loop.policy was replaced: the stuck call cannot touch the new one
            return
        t = self.clock()
        try:
            fut.exception(timeout=self.drain_timeout)  # its answer is stale either way; only wait
        except TimeoutError:
            age = self.clock() - self._inflight_t
            where = "after the loop ended" if result is not None else "at the start of run()"
            raise PolicyOverrunError(
                f"policy step overrun: the call made at loop step {self._inflight_step} is still running "
                f"{age:.2f} s later {where} (deadline {1000 * self.deadline:.0f} ms; waited "
                f"{self.drain_timeout:g} s, drain_timeout_s). The policy's episode state changes when it "
                "returns, so the policy was not reset; run() again once it has returned, or give the loop "
                "a new policy (loop.policy = ...; e.g. a new PolicyClient)", result) from None
        self._inflight = None
        if result is not None:
            waited = 1000 * (self.clock() - t)
            if waited >= 1:
                result.events.append({"step": result.steps - 1, "event": f"drained: waited {waited:.0f} ms for a "
                                      "late policy step to return after the loop ended; its answer discarded"})

    # ---- action guard --------------------------------------------------------------------------
    def guard(self, action: Any, last: np.ndarray | None) -> tuple[np.ndarray, int, list[str]]:
        """-> (the action to send: right shape, finite, within bounds; entries clipped; events)."""
        events: list[str] = []
        try:
            a = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError):
            a = None
        if a is None or a.shape != tuple(self.spec.shape):
            got = "not numeric" if a is None else f"shape {a.shape}"
            events.append(f"bad_action: expected shape {tuple(self.spec.shape)}, got {got}; sent hold")
            a = self.hold_action(last)
        elif not np.all(np.isfinite(a)):
            events.append(f"non_finite: action {a.tolist()}; sent hold")
            a = self.hold_action(last)
        clipped = 0
        if self.low is not None:
            c = np.clip(a, self.low, self.high)
            clipped = int(np.count_nonzero(c != a))
            a = c
        return a.astype(self.spec.dtype if np.issubdtype(self.spec.dtype, np.floating) else np.float32), clipped, events

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        a = np.asarray(self._hold(last), np.float32)
        if a.shape != tuple(self.spec.shape) or not np.all(np.isfinite(a)):
            raise ValueError(f"hold_action: expected finite values of shape {tuple(self.spec.shape)}, got {a}")
        return np.clip(a, self.low, self.high) if self.low is not None else a

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, instruction: str | None = None, max_steps: int | None = None,
            timestep: dm_env.TimeStep | None = None) -> LoopResult:
        """Reset the env (unless `timestep` is a fresh one) and the policy, then control until the episode
        ends, `max_steps`, stop() or the stop hook. The instruction defaults to observation['instruction']."""
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps: expected an integer >= 1 or None, got {max_steps!r}")
        if self._stop.is_set():  # stop() before this run: honour it before the robot moves
            self._stop.clear()
            return LoopResult(0, "stop", 0.0, [], [{"step": -1, "event": "stop: requested before run(); nothing sent"}],
                              1.0 / self.period, 1000 * self.deadline, [])
        self._drain(None)  # never reset the policy under a step still running
        ts = timestep if timestep is not None else self.env.reset()
        if instruction is None:
            instruction = _instruction(ts.observation)
        self.policy.reset(instruction)
        records: list[StepRecord] = []
        events: list[dict] = []
        actions: list[np.ndarray] = []
        last: np.ndarray | None = None
        pending: Future | None = None
        pending_t = 0.0
        reward, reason = 0.0, "max_steps"
        late_run = 0
        t0 = self.clock()
        next_tick = t0
        k = 0
        while max_steps is None or k < max_steps:
            tick = self.clock()
            step_events: list[str] = []
            if pending is not None and pending.done():
                late_ms = 1000 * (self.clock() - pending_t)
                exc = pending.exception()
                step_events.append(f"stale: discarded an answer {late_ms:.0f} ms late" if exc is None else
                                   f"stale: a late call failed ({type(exc).__name__}: {exc}); asking again")
                pending = self._inflight = None
            source, policy_ms, out = "hold", None, None
            if pending is None:
                pending, pending_t = _call_async(self.policy.step, ts.observation), self.clock()
                self._inflight, self._inflight_t, self._inflight_step = pending, pending_t, k
                self._inflight_policy = self.policy
                try:
                    out = pending.result(timeout=max(0.0, tick + self.deadline - self.clock()))
                    policy_ms = 1000 * (self.clock() - pending_t)
                    source, pending, self._inflight = "policy", None, None
                except TimeoutError:
                    step_events.append(f"late: no action within {1000 * self.deadline:.0f} ms; sent hold")
                except Exception as exc:
                    pending = self._inflight = None
                    reason = f"policy_error: {type(exc).__name__}: {exc}"
                    step_events.append(reason + "; sent hold and stopped")
            else:
                step_events.append(f"late: policy still busy ({1000 * (self.clock() - pending_t):.0f} ms); sent hold")
            if source == "policy":
                action, clipped, ev = self.guard(out, last)
                step_events += ev
            else:
                action, clipped = self.hold_action(last), 0
            ts = self.env.step(action)
            last = action
            actions.append(action)
            reward += float(ts.reward or 0.0)
            rec = StepRecord(k, round(self.clock() - t0, 6), source, None if policy_ms is None else round(policy_ms, 3),
                             clipped, step_events)
            records.append(rec)
            for e in step_events:
                events.append({"step": k, "event": e})
                log.warning("step %d: %s", k, e)
            k += 1
            late_run = late_run + 1 if source == "hold" else 0
            if reason.startswith("policy_error"):
                break
            if self.max_consecutive_late is not None and late_run >= self.max_consecutive_late:
                reason = f"watchdog: {late_run} consecutive steps without a timely action"
                events.append({"step": k - 1, "event": reason + "; stopped holding"})
                log.error("step %d: %s; stopped", k - 1, reason)
                break
            if ts.last():
                reason = "episode_end"
                break
            if self._stop.is_set():
                self._stop.clear()  # consumed by the run it stopped
                reason = "stop"
                break
            if self.stop_hook is not None and self.stop_hook(rec, ts):
                reason = "stop_hook"
                break
            next_tick += self.period
            wait = next_tick - self.clock()
            if wait > 0:
                self.sleep(wait)
            else:
                if -wait > self.period:
                    events.append({"step": k - 1, "event": f"overrun: tick {1000 * -wait:.0f} ms behind; rescheduled"})
                next_tick = self.clock()
        result = LoopResult(k, reason, reward, records, events, 1.0 / self.period, 1000 * self.deadline, actions)
        self._drain(result)  # a late step still running: wait for it, or raise with the log attached
        return result


def _bounds(spec: specs.Array) -> tuple[np.ndarray | None, np.ndarray | None]:
    if isinstance(spec, specs.BoundedArray):
        return (np.broadcast_to(spec.minimum, spec.shape).astype(np.float32),
                np.broadcast_to(spec.maximum, spec.shape).astype(np.float32))
    return None, None


def _instruction(observation: Any) -> str:
    text = observation.get("instruction") if isinstance(observation, dict) else None
    if isinstance(text, np.ndarray) and text.ndim == 0:  # dm_env StringArray observations
        text = text.item()
    if isinstance(text, bytes):
        text = text.decode()
    if not isinstance(text, str) or not text:
        raise ValueError("instruction: expected a string argument or observation['instruction'], got neither")
    return text
