"""The robot control loop: a policy (in-process PolicyRunner or a remote PolicyClient) drives any
dm_env.Environment (the interface a robot driver implements; docs/ROBOT.md) at a fixed rate, with guards:

- the env's action_spec is checked when the loop is made (a known 1-D shape, a floating dtype, finite
  bounds with minimum <= maximum; the hold action finite, of that shape, within the bounds):
  ActionSpecError otherwise, before anything is sent.
- every action is checked before it is sent: only real numbers (integer or floating; not bool, complex,
  strings or objects) of the spec's shape, all finite, pass; anything else is a bad action -> the hold
  action, the reason logged. Outside the bounds -> clipped. Nothing else ever reaches the robot.
  `max_bad_actions` bad actions in a row (no good one between; late steps neither count nor reset) stop
  the loop: run() raises BadActionError (the loop's log in `.result`).
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
- every exit from run() after the env is reset, exceptions and KeyboardInterrupt included (raised in
  the loop's thread or in the policy's worker thread), sends the hold action once more (the robot is
  left holding, not on the policy's last command), then returns or re-raises. Not when the episode has
  ended: a dm_env step after the last time step starts a new episode.
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
    #                   | "bad_actions: ..."
    total_reward: float
    records: list[StepRecord]
    events: list[dict]
    rate_hz: float
    deadline_ms: float
    actions: list[np.ndarray] = field(default_factory=list, repr=False)  # one per step
    exit_action: np.ndarray | None = field(default=None, repr=False)  # the hold sent on exit (None: none sent)

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


class ActionSpecError(ValueError):
    """The env's action_spec (or the hold action measured against it) cannot be guarded: refused when
    the loop is made, before anything is sent."""


class LoopError(RuntimeError):
    """run() ended abnormally after the loop ran; `result`: that run's LoopResult (None when raised at
    the start of a run)."""

    def __init__(self, message: str, result: "LoopResult | None" = None):
        super().__init__(message)
        self.result = result


class PolicyOverrunError(LoopError):
    """A policy step is still running after the loop ended (or before a new run): the policy's episode
    state is not settled, so the loop neither returns as if idle nor resets the policy. `result`: the
    ended run's LoopResult (None when raised at the start of a run)."""


class BadActionError(LoopError):
    """The policy answered `max_bad_actions` bad actions in a row (each one held): it is broken, not
    unlucky, so the loop stopped (holding). `result`: the run's LoopResult."""


@dataclass
class _Run:
    """One run's state, kept outside the loop body so that any exit can send the hold."""
    ts: dm_env.TimeStep
    t0: float
    records: list[StepRecord] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    last: np.ndarray | None = None
    reward: float = 0.0
    reason: str = "max_steps"
    k: int = 0
    bad_error: str | None = None
    exit_action: np.ndarray | None = None


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
                 drain_timeout_s: float = 2.0, max_bad_actions: int = 10):
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
        self.spec = _checked_spec(env.action_spec())
        self.dtype = np.dtype(self.spec.dtype)
        self.low, self.high = _bounds(self.spec)
        if hold_action is None:
            self._hold: HoldAction = hold_zero(self.spec)  # zeros, clipped into the bounds (documented)
        elif callable(hold_action):
            self._hold = hold_action
        else:
            fixed = np.asarray(hold_action, np.float32)
            if fixed.shape != tuple(self.spec.shape):
                raise ActionSpecError(f"hold_action: expected shape {tuple(self.spec.shape)}, got {fixed.shape}")
            # A fixed hold the bounds would change is not the hold its author thinks is safe.
            if self.low is not None and np.all(np.isfinite(fixed)) and (np.any(fixed < self.low) or np.any(fixed > self.high)):
                raise ActionSpecError(f"hold_action: expected values within the env action_spec bounds "
                                      f"{_fmt(self.low)}..{_fmt(self.high)}, got {_fmt(fixed)}")
            self._hold = lambda last: fixed
        # Checked now, not at the first late step: the fallback any exit sends if the hold fails later.
        self._safe_hold = self.hold_action(None)
        if max_consecutive_late is not None and (not isinstance(max_consecutive_late, int) or max_consecutive_late < 1):
            raise ValueError(f"max_consecutive_late: expected an integer >= 1 or None, got {max_consecutive_late!r}")
        self.max_consecutive_late = max_consecutive_late
        if isinstance(max_bad_actions, bool) or not isinstance(max_bad_actions, int) or max_bad_actions < 1:
            raise ValueError(f"max_bad_actions: expected an integer >= 1, got {max_bad_actions!r}")
        self.max_bad_actions = max_bad_actions
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
        """-> (the action to send: right shape, finite, within bounds; entries clipped; events). Events
        are only ever bad-action reasons (the hold was sent instead): a clip is counted, not an event."""
        shape = tuple(self.spec.shape)
        try:
            a = np.asarray(action)
        except Exception:  # ragged lists, tensors that refuse conversion, ...
            a = None
        reason = None
        if a is None:
            reason = f"bad_action: expected an array of shape {shape}, got {type(action).__name__} (not an array)"
        elif a.dtype.kind not in "iuf":
            # bool would send True as 1.0 (terminate), complex drops its imaginary part, strings parse.
            reason = f"bad_action: expected real numbers (integer or floating), got dtype {a.dtype}"
        elif a.shape != shape:
            reason = f"bad_action: expected shape {shape}, got shape {a.shape}"
        elif not np.all(np.isfinite(a)):
            reason = f"non_finite: action {a.tolist()}"
        if reason is None:
            x = a.astype(np.float64)
            clipped = 0
            if self.low is not None:
                c = np.clip(x, self.low, self.high)
                clipped = int(np.count_nonzero(c != x))
                x = c
            out = x.astype(self.dtype)
            if np.all(np.isfinite(out)):
                return out, clipped, []
            reason = f"non_finite: action {a.tolist()} overflows {self.dtype}"  # unbounded spec, huge value
        return self.hold_action(last), 0, [reason + "; sent hold"]

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        try:
            a = np.asarray(self._hold(last), np.float64)
        except (TypeError, ValueError):
            a = None
        if a is None or a.shape != tuple(self.spec.shape) or not np.all(np.isfinite(a)):
            raise ActionSpecError(f"hold_action: expected finite values of shape {tuple(self.spec.shape)}, got {a}")
        a = np.clip(a, self.low, self.high) if self.low is not None else a
        out = a.astype(self.dtype)
        if not np.all(np.isfinite(out)):
            raise ActionSpecError(f"hold_action: expected values that fit {self.dtype}, got {_fmt(a)}")
        return out

    def _exit_hold(self, st: _Run, exc: BaseException | None) -> None:
        """Send the hold once as run() exits, so the robot is not left on the policy's last command.
        Never raises over `exc` (the exception already leaving run())."""
        if st.ts.last():
            return  # the episode is over: a dm_env step now would start a new one (a robot: go home)
        why = st.reason if exc is None else f"{type(exc).__name__}: {exc}"
        try:
            try:
                action = self.hold_action(st.last)
            except Exception:  # the hold callable failed: the one checked at construction
                action = self._safe_hold
            st.exit_action = action
            ts = self.env.step(action)
            st.reward += float(ts.reward or 0.0)
        except Exception as hold_exc:
            log.error("exit: the hold action could not be sent (%s: %s)", type(hold_exc).__name__, hold_exc)
            if exc is None:
                raise
            return
        st.events.append({"step": st.k, "event": f"exit_hold: sent hold on exit ({why})"})
        (log.info if exc is None else log.warning)("exit: sent hold (%s)", why)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, instruction: str | None = None, max_steps: int | None = None,
            timestep: dm_env.TimeStep | None = None) -> LoopResult:
        """Reset the env (unless `timestep` is a fresh one) and the policy, then control until the episode
        ends, `max_steps`, stop() or the stop hook. The instruction defaults to observation['instruction'].
        Every exit after the env reset sends the hold once more (unless the episode ended)."""
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps: expected an integer >= 1 or None, got {max_steps!r}")
        if self._stop.is_set():  # stop() before this run: honour it before the robot moves
            self._stop.clear()
            return LoopResult(0, "stop", 0.0, [], [{"step": -1, "event": "stop: requested before run(); nothing sent"}],
                              1.0 / self.period, 1000 * self.deadline, [])
        self._drain(None)  # never reset the policy under a step still running
        st = _Run(timestep if timestep is not None else self.env.reset(), self.clock())
        exc: BaseException | None = None
        try:
            if instruction is None:
                instruction = _instruction(st.ts.observation)
            self.policy.reset(instruction)
            self._control(st, max_steps)
        except BaseException as e:  # KeyboardInterrupt included: hold, then re-raise
            exc = e
            if self._inflight is not None and self._inflight.done():
                self._inflight = None  # it raised (e.g. in the worker): nothing left to wait for
            raise
        finally:
            self._exit_hold(st, exc)
        result = LoopResult(st.k, st.reason, st.reward, st.records, st.events, 1.0 / self.period,
                            1000 * self.deadline, st.actions, st.exit_action)
        self._drain(result)  # a late step still running: wait for it, or raise with the log attached
        if st.bad_error is not None:
            raise BadActionError(st.bad_error, result)
        return result

    def _control(self, st: _Run, max_steps: int | None) -> None:
        pending: Future | None = None
        pending_t = 0.0
        late_run = bad_run = 0
        next_tick = st.t0
        while max_steps is None or st.k < max_steps:
            k = st.k
            tick = self.clock()
            step_events: list[str] = []
            if pending is not None and pending.done():
                late_ms = 1000 * (self.clock() - pending_t)
                exc = pending.exception()
                pending = self._inflight = None
                if exc is not None and not isinstance(exc, Exception):
                    raise exc  # a late KeyboardInterrupt/SystemExit from the worker: stop, holding
                step_events.append(f"stale: discarded an answer {late_ms:.0f} ms late" if exc is None else
                                   f"stale: a late call failed ({type(exc).__name__}: {exc}); asking again")
            source, policy_ms, out = "hold", None, None
            if pending is None:
                pending, pending_t = _call_async(self.policy.step, st.ts.observation), self.clock()
                self._inflight, self._inflight_t, self._inflight_step = pending, pending_t, k
                self._inflight_policy = self.policy
                try:
                    # A BaseException raised in the worker (KeyboardInterrupt) is re-raised here.
                    out = pending.result(timeout=max(0.0, tick + self.deadline - self.clock()))
                    policy_ms = 1000 * (self.clock() - pending_t)
                    source, pending, self._inflight = "policy", None, None
                except TimeoutError:
                    step_events.append(f"late: no action within {1000 * self.deadline:.0f} ms; sent hold")
                except Exception as exc:
                    pending = self._inflight = None
                    st.reason = f"policy_error: {type(exc).__name__}: {exc}"
                    step_events.append(st.reason + "; sent hold and stopped")
            else:
                step_events.append(f"late: policy still busy ({1000 * (self.clock() - pending_t):.0f} ms); sent hold")
            bad = None
            if source == "policy":
                action, clipped, ev = self.guard(out, st.last)
                step_events += ev
                bad = ev[0] if ev else None
            else:
                action, clipped = self.hold_action(st.last), 0
            st.last = action  # before the step: an interrupted step may have taken it
            st.ts = self.env.step(action)
            st.actions.append(action)
            st.reward += float(st.ts.reward or 0.0)
            rec = StepRecord(k, round(self.clock() - st.t0, 6), source, None if policy_ms is None else round(policy_ms, 3),
                             clipped, step_events)
            st.records.append(rec)
            for e in step_events:
                st.events.append({"step": k, "event": e})
                log.warning("step %d: %s", k, e)
            st.k = k + 1
            late_run = late_run + 1 if source == "hold" else 0
            if bad is not None:
                bad_run += 1
            elif source == "policy":
                bad_run = 0  # only a good answer resets it: a late step between bad ones is no recovery
            if st.reason.startswith("policy_error"):
                break
            if bad_run >= self.max_bad_actions:
                st.reason = f"bad_actions: {bad_run} in a row; last: {bad.removesuffix('; sent hold')}"
                st.bad_error = (f"policy actions: {bad_run} bad actions in a row (max_bad_actions="
                                f"{self.max_bad_actions}), the last at step {k}: {bad.removesuffix('; sent hold')}; "
                                "each was held, and the loop stopped holding")
                st.events.append({"step": k, "event": st.reason + "; stopped holding"})
                log.error("step %d: %s; stopped", k, st.reason)
                break
            if self.max_consecutive_late is not None and late_run >= self.max_consecutive_late:
                st.reason = f"watchdog: {late_run} consecutive steps without a timely action"
                st.events.append({"step": k, "event": st.reason + "; stopped holding"})
                log.error("step %d: %s; stopped", k, st.reason)
                break
            if st.ts.last():
                st.reason = "episode_end"
                break
            if self._stop.is_set():
                self._stop.clear()  # consumed by the run it stopped
                st.reason = "stop"
                break
            if self.stop_hook is not None and self.stop_hook(rec, st.ts):
                st.reason = "stop_hook"
                break
            next_tick += self.period
            wait = next_tick - self.clock()
            if wait > 0:
                self.sleep(wait)
            else:
                if -wait > self.period:
                    st.events.append({"step": k, "event": f"overrun: tick {1000 * -wait:.0f} ms behind; rescheduled"})
                next_tick = self.clock()


def _fmt(x: Any) -> str:
    return np.array2string(np.asarray(x), threshold=8, edgeitems=3, precision=4)


def _checked_spec(spec: Any) -> specs.Array:
    """The env's action spec, refused unless every action can be checked against it (ActionSpecError)."""
    if not isinstance(spec, specs.Array):
        raise ActionSpecError(f"env action_spec: expected a dm_env specs.Array (one flat action), got {type(spec).__name__}")
    shape = tuple(spec.shape)
    if len(shape) != 1 or not isinstance(shape[0], (int, np.integer)) or shape[0] < 1:
        raise ActionSpecError(f"env action_spec.shape: expected a known 1-D shape (n,) with n >= 1, got {shape}")
    if not np.issubdtype(spec.dtype, np.floating):
        raise ActionSpecError(f"env action_spec.dtype: expected a floating dtype (e.g. float32), got {np.dtype(spec.dtype)}")
    if isinstance(spec, specs.BoundedArray):
        bounds = {}
        for name in ("minimum", "maximum"):
            raw = getattr(spec, name)
            try:
                b = np.broadcast_to(np.asarray(raw, np.float64), shape)
            except (TypeError, ValueError):
                raise ActionSpecError(f"env action_spec.{name}: expected numbers broadcastable to {shape}, got {raw!r}") from None
            # NaN bounds make every clipped action NaN; infinite ones clip nothing.
            if not np.all(np.isfinite(b)) or not np.all(np.isfinite(b.astype(spec.dtype))):
                raise ActionSpecError(f"env action_spec.{name}: expected finite numbers, got "
                                      f"{_fmt(np.broadcast_to(np.asarray(raw), shape))}")
            bounds[name] = b
        wrong = np.flatnonzero(bounds["minimum"] > bounds["maximum"])
        if wrong.size:
            raise ActionSpecError(f"env action_spec: expected minimum <= maximum, got minimum "
                                  f"{_fmt(bounds['minimum'])} > maximum {_fmt(bounds['maximum'])} at index {wrong.tolist()}")
    return spec


def _bounds(spec: specs.Array) -> tuple[np.ndarray | None, np.ndarray | None]:
    # In the spec's own dtype (as dm_env stores them), so that clipping then casting stays inside.
    if isinstance(spec, specs.BoundedArray):
        return (np.broadcast_to(np.asarray(spec.minimum, spec.dtype), spec.shape).astype(np.float64),
                np.broadcast_to(np.asarray(spec.maximum, spec.dtype), spec.shape).astype(np.float64))
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
