"""Remote policy server: a robot computer steps a policy that runs on another machine (a GPU box).

websockets + msgpack (rollout/protocol.py documents the messages). One session per connection, each
with its own runner state (weights shared). Model calls run one at a time, so sessions never
interleave inside the model: inline on the event loop by default (fewest thread hand-offs, lowest
latency), or on one worker thread (--model-thread) so that the loop keeps answering other sessions
during long (GPU-sized) steps. Step requests that wait while the model is busy are stepped together
in one batched call (PolicyRunner.step_group; --max-batch), each session keeping its own state.
Fair share: when the model frees, the waiting session that pauses longest between a reply and its
next step (its think time: the longest of its last THINK_STEPS pauses) goes first, and only sessions pausing at least 1/fair_ratio as
long join its batch: sessions that flood the server (a new step the moment a reply comes) are batched
among themselves, and a control loop beside them waits for no more than the model call in flight,
which is kept short (flood_batch) while such a loop is active.
Guards: an auth token (required whenever the server listens beyond loopback), a message size limit,
a per-session rate limit (token bucket), a session cap (counting sessions past hello, in all and per
client address), a small pool of connections that have not said hello yet, apart from the session
slots (closed after hello_timeout_s; when the pool or an address's share of it is full, room is made
at the cost of the address holding most, or of a connection that has waited a quarter of the hello
timeout: idle connections can neither take a session slot nor, reconnecting at once, keep a client
at another address from saying hello), failed logins counted per address with exponential backoff,
actions checked finite before they are sent (a NaN/inf action is never sent: "non_finite_action"),
schema validation; every bad request gets an error reply and the server stays up.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import secrets
import signal
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rollout import protocol as P

log = logging.getLogger("policy.server")
THINK_STEPS = 8  # a session's think time: its longest pause over this many steps (fair share)
STARVE_BATCHES = 8  # a step passed over by this many batches goes into the next one whatever its think time


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_message_bytes: int = 4 << 20  # a 256x320x3 frame is 240 KiB
    rate_hz: float = 200.0  # sustained messages per second per session
    burst: int = 50  # messages a session may send at once above the sustained rate
    max_sessions: int = 16  # sessions past hello; connections still waiting for hello count separately
    # Robots behind one NAT share an address: by default one address may hold every session slot.
    max_sessions_per_address: int = 16
    # Connections not yet past hello: a small pool, apart from the session slots. When it (or one
    # address's share) is full, a connection of the address holding most, or one that has waited a
    # quarter of hello_timeout_s, is closed to make room (AddressBook.add_pending); else the new one is.
    max_pending: int = 32
    max_pending_per_address: int = 8
    hello_timeout_s: float = 2.0  # a connection that has not passed hello by then is closed
    max_auth_failures: int = 3  # then the connection is closed
    # Failed logins per client address: after auth_backoff_after of them the address's hellos are
    # refused for auth_backoff_s, doubling with each further failure up to auth_backoff_max_s; an
    # address quiet for auth_backoff_max_s (or logging in) starts again from zero.
    auth_backoff_after: int = 5
    auth_backoff_s: float = 1.0
    auth_backoff_max_s: float = 300.0
    # Fair share of the model: each batch starts with the waiting session of longest think time (pause
    # between a reply and its next step, Session.think_s) and takes only those pausing >= 1/fair_ratio as long.
    # A session that stepped within fair_window_s counts as active (its next step is on its way).
    fair_ratio: float = 2.0
    fair_window_s: float = 1.0
    # While a lighter session is active, batches of the heavier ones hold at most this many steps: the
    # call a quiet client may find in flight stays short (batching's gain is at large batches anyway).
    flood_batch: int = 2
    # Run model calls on a worker thread (the event loop keeps answering other sessions during a step)
    # instead of inline on the event loop (two thread hand-offs fewer per step: lower latency on a busy CPU).
    model_thread: bool = False
    # Step the sessions whose requests are waiting together in one batched model call (each keeps its
    # own state): about half the CPU per step at 4 sessions on the quickstart policy. 1 = no batching.
    max_batch: int = 16

    def validate(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port: expected an integer in 0..65535 (0 = any free port), got {self.port!r}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError(f"--token: expected at least 8 characters, got {len(self.token)}")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"--token: required when the server listens beyond loopback (--host {self.host!r}); "
                             f"e.g. --token {secrets.token_urlsafe(16)}")
        for name, v, low in (("--max-message-bytes", self.max_message_bytes, 1024), ("--burst", self.burst, 1),
                             ("--max-sessions", self.max_sessions, 1), ("--max-batch", self.max_batch, 1),
                             ("max_pending", self.max_pending, 1),
                             ("max_pending_per_address", self.max_pending_per_address, 1),
                             ("max_sessions_per_address", self.max_sessions_per_address, 1),
                             ("max_auth_failures", self.max_auth_failures, 1),
                             ("auth_backoff_after", self.auth_backoff_after, 1), ("flood_batch", self.flood_batch, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
        for name, v in (("hello_timeout_s", self.hello_timeout_s), ("auth_backoff_s", self.auth_backoff_s),
                        ("fair_window_s", self.fair_window_s)):
            if not (_is_number(v) and 0 < v < math.inf):
                raise ValueError(f"{name}: expected seconds > 0, got {v!r}")
        if not (_is_number(self.auth_backoff_max_s) and self.auth_backoff_max_s >= self.auth_backoff_s):
            raise ValueError(f"auth_backoff_max_s: expected seconds >= auth_backoff_s ({self.auth_backoff_s!r}), "
                             f"got {self.auth_backoff_max_s!r}")
        if not (_is_number(self.fair_ratio) and self.fair_ratio >= 1):
            raise ValueError(f"fair_ratio: expected a number >= 1 (inf = no fair share), got {self.fair_ratio!r}")
        if not (_is_number(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f"--rate-limit: expected messages per second > 0, got {self.rate_hz!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.t = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def address_key(remote: Any) -> str:
    """The client address that limits count against: the IP (an IPv6 client by its /64, which one
    host can fill with addresses), or "unknown" when the transport does not say."""
    host = remote[0] if isinstance(remote, (tuple, list)) and remote else remote
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Session:
    def __init__(self, runner, cfg: ServerConfig, address: str = "unknown", ws: Any = None):
        self.id = uuid.uuid4().hex[:12]
        self.runner = runner
        self.address = address
        self.ws = ws
        self.connected_at = time.monotonic()
        self.authed = False
        self.refused = False  # hello was refused for good (busy, backoff): closed after the reply
        self.dropped = False  # closed while waiting for hello to make room in the pending pool
        self.auth_failures = 0
        self.bucket = TokenBucket(cfg.rate_hz, cfg.burst)
        self.last_reply = time.monotonic()  # when its last reply was sent
        self.last_step = -math.inf  # when its last step was queued
        # Its pauses between a reply and its next step, the last THINK_STEPS of them: ~0 for a session
        # that floods, the control period minus the latency for a control loop. A new session starts
        # light (one pause of fair_window_s), so a control loop is served promptly from its first step.
        self.pauses: deque[float] = deque([cfg.fair_window_s], maxlen=THINK_STEPS)

    @property
    def think_s(self) -> float:
        """Its longest recent pause: a control loop that ran late a few times (no pause: it catches up)
        still counts as one, so one slow step cannot tip it in with the flooders for good."""
        return max(self.pauses)

    def note_step(self, arrived: float) -> None:
        self.pauses.append(max(0.0, arrived - self.last_reply))
        self.last_step = arrived


@dataclass
class _Address:
    pending: dict[str, Session] = field(default_factory=dict)  # waiting for hello, oldest first
    sessions: int = 0
    failures: int = 0  # failed logins since the last success (or a quiet auth_backoff_max_s)
    last_failure: float = -math.inf
    blocked_until: float = -math.inf


class AddressBook:
    """What each client address holds: connections waiting for hello, sessions, failed logins."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.entries: dict[str, _Address] = {}

    def get(self, address: str) -> _Address:
        return self.entries.setdefault(address, _Address())

    def add_pending(self, s: Session, pending: dict[str, Session], now: float) -> tuple[bool, Session | None]:
        """Try to admit s to the pending pool -> (admitted, the connection dropped to make room or None).

        Room is made at the cost of an address holding more than the newcomer's would (fair shares), or
        else of a connection that has waited at least a quarter of the hello timeout: a real client says
        hello within a round trip, and connections dropped and reconnecting at once cannot churn the
        pool faster than that. Otherwise the newcomer is refused."""
        mine = self.get(s.address).pending
        victim = None
        if len(mine) >= self.cfg.max_pending_per_address:
            victim = self._aged(mine.values(), now)
        elif len(pending) >= self.cfg.max_pending:
            most = max(len(e.pending) for e in self.entries.values())
            if most > len(mine) + 1:
                victim = min((next(iter(e.pending.values())) for e in self.entries.values() if len(e.pending) == most),
                             key=lambda v: v.connected_at)
            else:
                victim = self._aged(pending.values(), now)
        else:
            victim = s  # room without dropping anyone
        if victim is None:
            return False, None
        if victim is not s:
            self.drop_pending(victim, pending)
        mine[s.id] = s
        pending[s.id] = s
        return True, None if victim is s else victim

    def _aged(self, waiting: Any, now: float) -> Session | None:
        """The longest-waiting connection, if it has had its grace (hello_timeout_s / 4)."""
        oldest = min(waiting, key=lambda v: v.connected_at, default=None)
        if oldest is None or now - oldest.connected_at < self.cfg.hello_timeout_s / 4:
            return None
        return oldest

    def drop_pending(self, s: Session, pending: dict[str, Session]) -> None:
        pending.pop(s.id, None)
        e = self.entries.get(s.address)
        if e is not None:
            e.pending.pop(s.id, None)

    def backoff_left(self, address: str, now: float) -> float:
        e = self.entries.get(address)
        return 0.0 if e is None else max(0.0, e.blocked_until - now)

    def login_failed(self, address: str, now: float) -> float:
        """Count a failed login -> the backoff it starts for the address (0: none yet)."""
        e = self.get(address)
        if now - e.last_failure > self.cfg.auth_backoff_max_s:
            e.failures = 0  # quiet long enough: an old typo does not count against it
        e.failures += 1
        e.last_failure = now
        over = e.failures - self.cfg.auth_backoff_after
        if over < 0:
            return 0.0
        wait = min(self.cfg.auth_backoff_max_s, self.cfg.auth_backoff_s * 2.0 ** min(over, 64))
        e.blocked_until = now + wait
        return wait

    def login_ok(self, address: str) -> None:
        e = self.get(address)
        e.failures, e.blocked_until = 0, -math.inf

    def prune(self, now: float) -> None:
        """Forget addresses that hold nothing and whose failures have expired (bounded memory)."""
        for a in [a for a, e in self.entries.items() if not e.pending and not e.sessions
                  and now - e.last_failure > self.cfg.auth_backoff_max_s and now >= e.blocked_until]:
            del self.entries[a]


@dataclass
class _Step:
    session: Session
    mid: int | None
    obs: dict
    fut: asyncio.Future
    after_batch: int  # model calls started before this step was queued
    passed: int = 0  # batches picked without it (fair share); at STARVE_BATCHES it goes first


class PolicyServer:
    def __init__(self, runner, cfg: ServerConfig):
        cfg.validate()
        self.base = runner
        self.cfg = cfg
        self.sessions: dict[str, Session] = {}  # past hello: what max_sessions counts
        self.pending: dict[str, Session] = {}  # connected, no hello yet (max_pending, hello_timeout_s)
        self.addresses = AddressBook(cfg)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="policy")
        self._waiting: list[_Step] = []  # step requests for the batcher, at most one per session
        self._wake: asyncio.Event | None = None  # set when a step is queued (made in serve())
        self.batches = 0  # model calls started
        self._after_inline_call: float | None = None  # start of the inline call whose aftermath is being read
        self._call_s = 0.0  # model call duration, averaged (fair share: _think)
        self.port: int | None = None
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget closes, referenced until done

    # ---- messages ------------------------------------------------------------------------------
    def _hello(self, s: Session, msg: dict) -> dict:
        if msg.get("version") != P.PROTOCOL_VERSION:
            return P.error("version", f"hello.version: expected {P.PROTOCOL_VERSION}, got {msg.get('version')!r}")
        if s.dropped:
            s.refused = True
            return P.error("busy", "hello: expected it before this connection was dropped from the full pool of "
                                   "connections waiting to say hello, got it after; reconnect and say hello at once")
        if self.cfg.token and not s.authed:
            refusal = self._check_token(s, msg.get("token"))
            if refusal is not None:
                return refusal
        if not s.authed:
            refusal = self._take_session_slot(s)
            if refusal is not None:
                return refusal
        spec = self.base.spec.to_dict()
        return {"type": "ready", "version": P.PROTOCOL_VERSION, "session": s.id, "spec": spec,
                "action_names": list(self.base.action_names),
                "action_tokenizer": self.base.policy.action_tokenizer.to_dict(),
                "language_source": self.base.policy.cfg.model.language.source,
                "limits": {"max_message_bytes": self.cfg.max_message_bytes, "rate_hz": self.cfg.rate_hz,
                           "burst": self.cfg.burst}}

    def _check_token(self, s: Session, token: Any) -> dict | None:
        """None when the token is right; else the refusal, counted against the connection and its address."""
        now = time.monotonic()
        left = self.addresses.backoff_left(s.address, now)
        if left > 0:  # the token is not even compared: guesses during a backoff teach nothing
            s.refused = True
            return self._backoff_error(s.address, left)
        expected = str(self.cfg.token).encode()
        if isinstance(token, str) and hmac.compare_digest(token.encode(), expected):
            self.addresses.login_ok(s.address)
            return None
        s.auth_failures += 1
        wait = self.addresses.login_failed(s.address, now)
        got = "none" if token is None else "a wrong one"
        if wait > 0:
            s.refused = True
            log.warning("address %s: %d failed logins; hellos refused for %g s", s.address,
                        self.addresses.get(s.address).failures, wait)
            return P.error("unauthorized", f"hello.token: expected this server's token, got {got}; after "
                                           f"{self.addresses.get(s.address).failures} failed logins from "
                                           f"{s.address} its hellos are refused for {wait:g} s (auth_backoff)",
                           retry_after_s=wait)
        return P.error("unauthorized", f"hello.token: expected this server's token, got {got}")

    def _backoff_error(self, address: str, left: float) -> dict:
        e = self.addresses.get(address)
        return P.error("auth_backoff", f"hello: expected no login from {address} for {left:.1f} s more (backoff after "
                                       f"{e.failures} failed logins), got one; retry in {left:.1f} s",
                       retry_after_s=left)

    def _take_session_slot(self, s: Session) -> dict | None:
        """Move s from the pending pool to the sessions -> None, or the busy refusal."""
        # Slots go to sessions that said hello, so idle connections cannot lock clients out.
        entry = self.addresses.get(s.address)
        if len(self.sessions) >= self.cfg.max_sessions:
            s.refused = True
            return P.error("busy", f"server: expected at most {self.cfg.max_sessions} sessions, all are taken; "
                                   "retry later")
        if entry.sessions >= self.cfg.max_sessions_per_address:
            s.refused = True
            return P.error("busy", f"server: expected at most {self.cfg.max_sessions_per_address} sessions from one "
                                   f"address, {s.address} holds them all; retry later")
        s.authed = True
        self.addresses.drop_pending(s, self.pending)
        entry.sessions += 1
        self.sessions[s.id] = s
        log.info("session %s opened from %s", s.id, s.address)
        return None

    def _reset(self, s: Session, msg: dict) -> dict:
        # A failed reset ends the previous episode too: steps get not_ready until a reset succeeds.
        try:
            instruction = P.require(msg, "instruction", str, "a non-empty string")
            emb = msg.get("embedding")
            embedding = None if emb is None else P.decode_array(emb, "reset.embedding")
            s.runner.reset(instruction, embedding)
        except BaseException:
            s.runner.end_episode()
            raise
        return {"type": "reset_ok", "id": P.message_id(msg)}

    def _step_many(self, items: list[tuple[Session, int | None, dict]]) -> list[dict]:
        """Step requests of distinct sessions -> their replies, in one batched model call where possible."""
        t, c = time.perf_counter(), time.thread_time()
        attempted = [s.runner.steps + 1 for s, _, _ in items]  # a runner that refuses may end its episode first
        try:
            results = type(self.base).step_group([s.runner for s, _, _ in items], [obs for _, _, obs in items])
        except Exception as exc:  # e.g. the runner's own non-finite check on the whole group: each gets the error
            results = [exc] * len(items)
        wall, cpu = 1000 * (time.perf_counter() - t), 1000 * (time.thread_time() - c)
        replies = []
        for (s, mid, _), res, step in zip(items, results, attempted):
            if isinstance(res, Exception):
                replies.append(self._error_reply(res, "step", mid, s, step))
            elif not np.all(np.isfinite(res)):
                replies.append(self._non_finite_reply(s, mid, step, res))
            else:
                # policy_ms: the (batched) call's wall time; cpu_ms: this step's share of its CPU time,
                # which a loaded machine does not inflate (wall time does).
                replies.append({"type": "action", "id": mid, "action": res, "step": s.runner.steps,
                                "policy_ms": round(wall, 3), "cpu_ms": round(cpu / len(items), 3),
                                "batch": len(items)})
        return replies

    def _non_finite_reply(self, s: Session, mid: int | None, step: int, action: Any,
                          exc: Exception | None = None) -> dict:
        """Never send a NaN/inf action: refuse it, and end the episode (its memory may hold the NaN too)."""
        if exc is not None:
            what = f"{type(exc).__name__}: {exc}"
        else:
            a = np.asarray(action, dtype=np.float64).reshape(-1)
            names = list(getattr(self.base, "action_names", ())) or [str(i) for i in range(a.size)]
            bad = [f"{names[i] if i < len(names) else i}={a[i]}" for i in np.flatnonzero(~np.isfinite(a))]
            what = f"non-finite entries {', '.join(bad)}"
        log.error("session %s step %d: the policy produced a non-finite action (%s)", s.id, step, what)
        s.runner.end_episode()
        return P.error("non_finite_action", f"action: expected finite values, got NaN/inf from the policy (session "
                                            f"{s.id}, step {step}: {what}); no action sent and the episode is "
                                            "ended: check the policy's weights, then reset", mid)

    async def _batcher(self) -> None:
        # A connection sends its next request only after this reply (frames are handled in order per
        # connection), so at most one request per session waits: what is waiting when the model is free
        # forms the batch (fair share: _pick_batch), with no added delay.
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            picked = self._pick_batch(time.monotonic())
            self.batches += 1
            work = [(it.session, it.mid, it.obs) for it in picked]
            started = time.monotonic()
            try:
                if self.cfg.model_thread:
                    replies = await loop.run_in_executor(self._executor, self._step_many, work)
                else:
                    replies = self._step_many(work)
            except Exception as exc:  # the batcher must outlive any request
                log.exception("batched step failed")
                replies = [P.error("internal", f"{type(exc).__name__}: {exc}", mid) for _, mid, _ in work]
            self._call_s = 0.8 * self._call_s + 0.2 * (time.monotonic() - started)
            for it, reply in zip(picked, replies):
                if reply.get("type") == "action":
                    reply["waited_batches"] = self.batches - 1 - it.after_batch
                if not it.fut.done():
                    it.fut.set_result(reply)
            # Steps queued in these turns were read late: an inline call held the loop (see _queue_step).
            self._after_inline_call = None if self.cfg.model_thread else started
            await _let_io_run()
            self._after_inline_call = None

    def _pick_batch(self, now: float) -> list[_Step]:
        """Take the next batch off the waiting steps: the session of longest think time first, then those
        whose think time is at least 1/fair_ratio of it, up to max_batch. Sessions that flood the server
        (think ~0) thus form batches of their own, and a control loop beside them waits only for the
        model call in flight; while such a loop is active, that call holds at most flood_batch steps.
        Steps passed over STARVE_BATCHES times come right after the first, whatever their think time."""
        order = sorted(self._waiting, key=lambda it: -self._think(it.session))  # stable: FIFO on ties
        head, longest = order[0], self._think(order[0].session)
        size = self.cfg.flood_batch if self._lighter_session_active(longest, now) else self.cfg.max_batch
        due = [it for it in self._waiting if it.passed >= STARVE_BATCHES and it is not head]  # FIFO
        light = [it for it in order[1:] if it.passed < STARVE_BATCHES
                 and self._think(it.session) * self.cfg.fair_ratio >= longest]
        picked = (due[:1] if due and size == 1 else [head] + due + light)[:size]
        chosen = {id(it) for it in picked}
        self._waiting = [it for it in self._waiting if id(it) not in chosen]
        for it in self._waiting:
            it.passed += 1
        return picked

    def _think(self, s: Session) -> float:
        # Pauses under a tenth of a model call all count as back-to-back: flooders batch together
        # whatever the jitter of their (near zero) think times.
        return max(s.think_s, 0.1 * self._call_s)

    def _lighter_session_active(self, think_s: float, now: float) -> bool:
        """Whether a session that stepped within the last fair_window_s pauses more than fair_ratio times
        as long (its next step may come while this batch is running)."""
        return any(now - s.last_step < self.cfg.fair_window_s and self._think(s) > self.cfg.fair_ratio * think_s
                   for s in self.sessions.values())

    def _queue_step(self, s: Session, mid: int | None, obs: dict) -> asyncio.Future:
        assert self._wake is not None
        fut = asyncio.get_running_loop().create_future()
        arrived = time.monotonic()
        if self._after_inline_call is not None:
            # Read just after an inline model call: the frame may have sat in the socket since the call
            # began (or since this session's reply). Else a flooding session would seem to pause for
            # as long as the call ran.
            arrived = max(s.last_reply, self._after_inline_call)
        s.note_step(arrived)
        self._waiting.append(_Step(s, mid, obs, fut, self.batches))
        self._wake.set()
        return fut

    def _error_reply(self, exc: Exception, kind: str | None, mid: int | None, s: Session,
                     step: int | None = None) -> dict:
        if _is_non_finite_error(exc):  # the runner's own check (policy/runner.py NonFiniteActionError)
            return self._non_finite_reply(s, mid, s.runner.steps + 1 if step is None else step, None, exc)
        if isinstance(exc, P.ProtocolError):
            return P.error(exc.code, str(exc), mid)
        if isinstance(exc, RuntimeError):  # step before reset
            return P.error("not_ready", str(exc), mid)
        if isinstance(exc, ValueError):  # ObservationError and other input checks name the field
            return P.error("bad_observation" if kind == "step" else "bad_request", str(exc), mid)
        log.error("session %s: internal error: %s: %s", s.id, type(exc).__name__, exc)
        return P.error("internal", f"{type(exc).__name__}: {exc}", mid)

    async def handle_frame(self, s: Session, frame: Any) -> dict | None:
        """One request -> its reply (None: close the connection)."""
        mid, kind = None, None
        try:
            if not s.bucket.take():
                return P.error("rate_limited", f"session: expected at most {self.cfg.rate_hz:g} messages/s "
                                               f"(burst {self.cfg.burst}), got more")
            msg = P.unpack(frame, self.cfg.max_message_bytes)
            mid = P.message_id(msg)
            kind = msg["type"]
            if kind == "hello":
                return self._hello(s, msg)
            if not s.authed:
                return P.error("unauthorized", f"{kind}: expected a 'hello' message first"
                                               + (" with the server's token" if self.cfg.token else ""), mid)
            if kind == "close":
                return None
            if kind == "reset":
                if self.cfg.model_thread:
                    return await asyncio.get_running_loop().run_in_executor(self._executor, self._reset, s, msg)
                return self._reset(s, msg)
            if kind == "step":
                return await self._queue_step(s, mid, P.decode_observation(msg.get("observation")))
            return P.error("bad_request", f"message.type: expected one of hello, reset, step, close; got {kind!r}", mid)
        except Exception as exc:  # the server stays up whatever a request does
            return self._error_reply(exc, kind, mid, s)

    async def _hello_deadline(self, s: Session, ws) -> None:
        await asyncio.sleep(self.cfg.hello_timeout_s)
        if not s.authed:
            log.info("connection %s: no hello within %g s; closed", s.id, self.cfg.hello_timeout_s)
            self.addresses.drop_pending(s, self.pending)
            await _refuse(ws, P.error("unauthorized", f"hello: expected a 'hello' within "
                                                      f"{self.cfg.hello_timeout_s:g} s of connecting, got none"),
                          1008, "no hello")

    async def _drop_pending(self, s: Session) -> None:
        """Close a connection still waiting for hello to make room for a newer one."""
        s.dropped = True
        log.info("connection %s from %s: dropped from the full pending pool", s.id, s.address)
        await _refuse(s.ws, P.error("busy", f"server: expected at most {self.cfg.max_pending} connections waiting to "
                                            f"say hello ({self.cfg.max_pending_per_address} per address), all are "
                                            "taken and this one waited longest; retry and say hello at once"),
                      1013, "busy")

    async def handler(self, ws) -> None:
        s = Session(self.base.fork(), self.cfg, address_key(ws.remote_address), ws)
        now = time.monotonic()
        left = self.addresses.backoff_left(s.address, now) if self.cfg.token else 0.0
        if left > 0:  # refused before it can hold a pending slot
            await _refuse(ws, self._backoff_error(s.address, left), 1008, "auth backoff")
            return
        if len(self.addresses.entries) > 256:
            self.addresses.prune(now)
        admitted, victim = self.addresses.add_pending(s, self.pending, now)
        if not admitted:
            await _refuse(ws, P.error("busy", f"server: expected at most {self.cfg.max_pending} connections waiting "
                                              f"to say hello ({self.cfg.max_pending_per_address} per address), all are "
                                              f"taken by connections younger than {self.cfg.hello_timeout_s / 4:g} s; "
                                              "retry in a moment and say hello at once"), 1013, "busy")
            return
        if victim is not None:
            task = asyncio.ensure_future(self._drop_pending(victim))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info("connection %s from %s", s.id, ws.remote_address)
        deadline = asyncio.ensure_future(self._hello_deadline(s, ws))
        try:
            async for frame in ws:
                reply = await self.handle_frame(s, frame)
                if reply is None:
                    break
                await ws.send(P.pack(reply))
                s.last_reply = time.monotonic()
                if s.refused:
                    await ws.close(1013 if reply.get("code") == "busy" else 1008, reply.get("code", "refused"))
                    break
                if s.auth_failures >= self.cfg.max_auth_failures:
                    await ws.close(1008, "authentication failed")
                    break
        except Exception as exc:  # a dropped connection ends its session only
            log.info("session %s: connection ended: %s", s.id, type(exc).__name__)
        finally:
            deadline.cancel()
            self.addresses.drop_pending(s, self.pending)
            if self.sessions.pop(s.id, None) is not None:
                self.addresses.get(s.address).sessions -= 1
                log.info("session %s closed", s.id)

    async def serve(self, ready: asyncio.Future | None = None, stop: asyncio.Future | None = None) -> None:
        from websockets.asyncio.server import serve

        # Frames up to 4x the limit are read and answered with a "too_large" error; beyond that the
        # websocket layer closes the connection (1009) without buffering it. A websocket handshake
        # gets the hello timeout too, so half-open connections cannot pile up before the pool.
        self._wake = asyncio.Event()
        batcher = asyncio.ensure_future(self._batcher())
        async with serve(self.handler, self.cfg.host, self.cfg.port, compression=None,
                         max_size=4 * self.cfg.max_message_bytes, max_queue=4, ping_interval=20,
                         open_timeout=self.cfg.hello_timeout_s) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set_result(self.port)
            try:
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
            finally:
                batcher.cancel()


async def _let_io_run(turns: int = 3) -> None:
    """Yield a few loop turns between model calls: the replies just made get sent, and steps that
    arrived while an inline model call held the loop reach the queue before the next batch is picked
    (else a waiting flooder batch would run first and hold a quiet client's reply behind it)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def _is_non_finite_error(exc: Exception) -> bool:
    """The runner's non-finite-output error, by name: the server does not import the runner module."""
    return any(c.__name__.startswith("NonFinite") for c in type(exc).__mro__)


async def _refuse(ws, reply: dict, code: int, reason: str) -> None:
    try:
        await ws.send(P.pack(reply))
        await ws.close(code, reason)
    except Exception:  # already gone
        pass


def serve_forever(policy_dir: str | Path, cfg: ServerConfig, threads: int = 1, device: str = "cpu") -> None:
    """`run_policy.py serve`: load the policy, listen, print the address, stop on SIGINT/SIGTERM."""
    import torch

    from policy.runner import PolicyRunner

    cfg.validate()
    torch.set_num_threads(threads)
    runner = PolicyRunner.load(policy_dir, device=device, threads=None)
    server = PolicyServer(runner, cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop, ready = loop.create_future(), loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        task = asyncio.ensure_future(server.serve(ready, stop))
        port = await ready
        print(f"serving {policy_dir} on ws://{cfg.host}:{port} (auth {'on' if cfg.token else 'off'}, "
              f"config {asdict(cfg) | {'token': '***' if cfg.token else None}})", flush=True)
        await task

    asyncio.run(main())
    print("server stopped", file=sys.stderr, flush=True)


