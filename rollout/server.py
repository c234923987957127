"""Remote policy server: a robot computer steps a policy that runs on another machine (a GPU box).

websockets + msgpack (rollout/protocol.py documents the messages). One session per connection, each
with its own runner state (weights shared). Model calls run one at a time, so sessions never
interleave inside the model: inline on the event loop by default (fewest thread hand-offs, lowest
latency), or on one worker thread (--model-thread) so that the loop keeps answering other sessions
during long (GPU-sized) steps. Step requests that wait while the model is busy are stepped together
in one batched call (PolicyRunner.step_group; --max-batch), each session keeping its own state.
Guards: an auth token (required whenever the server listens beyond loopback), a message size limit,
a per-session rate limit (token bucket), a session cap (counting sessions past hello; connections
that have not said hello are capped separately and closed after hello_timeout_s), schema
validation; every bad request gets an error reply and the server stays up.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any



from rollout import protocol as P

log = logging.getLogger("policy.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_message_bytes: int = 4 << 20  # a 256x320x3 frame is 240 KiB
    rate_hz: float = 200.0  # sustained messages per second per session
    burst: int = 50  # messages a session may send at once above the sustained rate
    max_sessions: int = 16  # sessions past hello; connections still waiting for hello count separately
    max_pending: int = 64  # connections not yet past hello (each closed after hello_timeout_s)
    hello_timeout_s: float = 5.0  # a connection that has not passed hello by then is closed
    max_auth_failures: int = 3  # then the connection is closed
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
                             ("max_pending", self.max_pending, 1)):
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
        if not (isinstance(self.hello_timeout_s, (int, float)) and self.hello_timeout_s > 0):
            raise ValueError(f"hello_timeout_s: expected seconds > 0, got {self.hello_timeout_s!r}")
        if not self.rate_hz > 0:
            raise ValueError(f"--rate-limit: expected messages per second > 0, got {self.rate_hz!r}")


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


class Session:
    def __init__(self, runner, cfg: ServerConfig):
        self.id = uuid.uuid4().hex[:12]
        self.runner = runner
        self.authed = False
        self.refused = False  # hello came when every session slot was taken: closed after the reply
        self.auth_failures = 0
        self.bucket = TokenBucket(cfg.rate_hz, cfg.burst)


class PolicyServer:
    def __init__(self, runner, cfg: ServerConfig):
        cfg.validate()
        self.base = runner
        self.cfg = cfg
        self.sessions: dict[str, Session] = {}  # past hello: what max_sessions counts
        self.pending: set[str] = set()  # connected, no hello yet (max_pending, hello_timeout_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="policy")
        self._queue: asyncio.Queue | None = None  # step requests for the batcher (made in serve())
        self.port: int | None = None

    # ---- messages ------------------------------------------------------------------------------
    def _hello(self, s: Session, msg: dict) -> dict:
        if msg.get("version") != P.PROTOCOL_VERSION:
            return P.error("version", f"hello.version: expected {P.PROTOCOL_VERSION}, got {msg.get('version')!r}")
        if self.cfg.token:
            token = msg.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.cfg.token.encode()):
                s.auth_failures += 1
                return P.error("unauthorized", "hello.token: expected this server's token, got "
                                               + ("none" if token is None else "a wrong one"))
        if not s.authed:
            # Slots go to sessions that said hello, so idle connections cannot lock clients out.
            if len(self.sessions) >= self.cfg.max_sessions:
                s.refused = True
                return P.error("busy", f"server: expected at most {self.cfg.max_sessions} sessions, "
                                       "all are taken; retry later")
            s.authed = True
            self.pending.discard(s.id)
            self.sessions[s.id] = s
            log.info("session %s opened", s.id)
        spec = self.base.spec.to_dict()
        return {"type": "ready", "version": P.PROTOCOL_VERSION, "session": s.id, "spec": spec,
                "action_names": list(self.base.action_names),
                "action_tokenizer": self.base.policy.action_tokenizer.to_dict(),
                "language_source": self.base.policy.cfg.model.language.source,
                "limits": {"max_message_bytes": self.cfg.max_message_bytes, "rate_hz": self.cfg.rate_hz,
                           "burst": self.cfg.burst}}

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
        results = type(self.base).step_group([s.runner for s, _, _ in items], [obs for _, _, obs in items])
        wall, cpu = 1000 * (time.perf_counter() - t), 1000 * (time.thread_time() - c)
        replies = []
        for (s, mid, _), res in zip(items, results):
            if isinstance(res, Exception):
                replies.append(self._error_reply(res, "step", mid, s))
            else:
                # policy_ms: the (batched) call's wall time; cpu_ms: this step's share of its CPU time,
                # which a loaded machine does not inflate (wall time does).
                replies.append({"type": "action", "id": mid, "action": res, "step": s.runner.steps,
                                "policy_ms": round(wall, 3), "cpu_ms": round(cpu / len(items), 3),
                                "batch": len(items)})
        return replies

    async def _batcher(self) -> None:
        # A connection sends its next request only after this reply (frames are handled in order per
        # connection), so the queue holds at most one request per session: whatever is waiting when
        # the model is free forms the batch, with no added delay.
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self.cfg.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            work = [(s, mid, obs) for s, mid, obs, _ in items]
            try:
                if self.cfg.model_thread:
                    replies = await loop.run_in_executor(self._executor, self._step_many, work)
                else:
                    replies = self._step_many(work)
            except Exception as exc:  # the batcher must outlive any request
                log.exception("batched step failed")
                replies = [P.error("internal", f"{type(exc).__name__}: {exc}", mid) for _, mid, _ in work]
            for (_, _, _, fut), reply in zip(items, replies):
                if not fut.done():
                    fut.set_result(reply)

    def _error_reply(self, exc: Exception, kind: str | None, mid: int | None, s: Session) -> dict:
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
                obs = P.decode_observation(msg.get("observation"))
                assert self._queue is not None
                fut = asyncio.get_running_loop().create_future()
                self._queue.put_nowait((s, mid, obs, fut))
                return await fut
            return P.error("bad_request", f"message.type: expected one of hello, reset, step, close; got {kind!r}", mid)
        except Exception as exc:  # the server stays up whatever a request does
            return self._error_reply(exc, kind, mid, s)

    async def _hello_deadline(self, s: Session, ws) -> None:
        await asyncio.sleep(self.cfg.hello_timeout_s)
        if not s.authed:
            log.info("connection %s: no hello within %g s; closed", s.id, self.cfg.hello_timeout_s)
            try:
                await ws.send(P.pack(P.error("unauthorized", f"hello: expected a 'hello' within "
                                                             f"{self.cfg.hello_timeout_s:g} s of connecting, got none")))
                await ws.close(1008, "no hello")
            except Exception:  # already gone
                pass

    async def handler(self, ws) -> None:
        if len(self.pending) >= self.cfg.max_pending:
            await ws.send(P.pack(P.error("busy", f"server: expected at most {self.cfg.max_pending} connections "
                                                 "waiting to say hello, all are taken; retry later")))
            await ws.close(1013, "busy")
            return
        s = Session(self.base.fork(), self.cfg)
        self.pending.add(s.id)
        log.info("connection %s from %s", s.id, ws.remote_address)
        deadline = asyncio.ensure_future(self._hello_deadline(s, ws))
        try:
            async for frame in ws:
                reply = await self.handle_frame(s, frame)
                if reply is None:
                    break
                await ws.send(P.pack(reply))
                if s.refused:
                    await ws.close(1013, "busy")
                    break
                if s.auth_failures >= self.cfg.max_auth_failures:
                    await ws.close(1008, "authentication failed")
                    break
        except Exception as exc:  # a dropped connection ends its session only
            log.info("session %s: connection ended: %s", s.id, type(exc).__name__)
        finally:
            deadline.cancel()
            self.pending.discard(s.id)
            if self.sessions.pop(s.id, None) is not None:
                log.info("session %s closed", s.id)

    async def serve(self, ready: asyncio.Future | None = None, stop: asyncio.Future | None = None) -> None:
        from websockets.asyncio.server import serve

        # Frames up to 4x the limit are read and answered with a "too_large" error; beyond that the
        # websocket layer closes the connection (1009) without buffering it.
        self._queue = asyncio.Queue()
        batcher = asyncio.ensure_future(self._batcher())
        async with serve(self.handler, self.cfg.host, self.cfg.port, compression=None,
                         max_size=4 * self.cfg.max_message_bytes, max_queue=4, ping_interval=20) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set_result(self.port)
            try:
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
            finally:
                batcher.cancel()


def serve_forever(policy_dir: str | Path, cfg: ServerConfig, threads: int = 1, device: str = "cpu") -> None:
    """`run_policy.py serve`: load the policy, listen, print the address, stop on SIGINT/SIGTERM."""
    import torch

    from policy.runner import PolicyRunner

    cfg.validate()
    torch.set_num_threads(threads)
    runner = PolicyRunner.load(policy_dir, device=device)
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


