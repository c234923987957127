"""Python client of the remote policy server, with the runner's interface (reset / step / step_named),
so the robot loop takes either. Synchronous: one request in flight per session, as a control loop needs.

A request that gets no reply within `timeout` raises TimeoutError and closes the connection: its late
reply would otherwise be read as the answer to the next request, and the server has stepped (or reset)
the episode without the caller knowing. Every later call raises ClientBrokenError; make a new client
and reset (the server ends the old session when the connection closes)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from websockets.exceptions import ConnectionClosed

from rollout import protocol as P


class RemotePolicyError(RuntimeError):
    """An error reply from the server; `code` is one of protocol.ERROR_CODES. `retry_after_s`: when the
    server says a refused client may try again (code "auth_backoff"), else None. "non_finite_action":
    the policy produced NaN/inf, no action came back and the episode is over (reset before stepping)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"policy server: {code}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s


class ClientBrokenError(ConnectionError):
    """The connection was closed after a request failed mid-way (timeout, dropped link, out-of-order
    reply): the episode on the server is lost; reconnect with a new PolicyClient and reset."""


class PolicyClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0, max_message_bytes: int = 16 << 20,
                 **connect_options: Any):
        """connect_options: passed on to websockets' connect, e.g. source_address=("10.0.0.5", 0)."""
        from websockets.sync.client import connect

        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"url: expected ws://HOST:PORT or wss://HOST:PORT, got {url!r}")
        self.url, self.timeout = url, timeout
        # Entered here and closed in close(): this client is the context manager (websockets 17 API).
        self._ws = connect(url, compression=None, max_size=max_message_bytes, open_timeout=timeout,
                           **connect_options).__enter__()
        self._id = 0
        self._broken: str | None = None  # why the connection was given up, once it is
        try:
            ready = self._call({"type": "hello", "version": P.PROTOCOL_VERSION, "token": token}, "ready")
        except BaseException:
            self._ws.close()
            raise
        self.session: str = ready["session"]
        self.spec: dict = ready["spec"]
        self.action_names: tuple[str, ...] = tuple(ready["action_names"])
        self.limits: dict = ready.get("limits", {})
        self._tokenizer_dict: dict = ready.get("action_tokenizer") or {}
        self.steps = 0
        self.last_policy_ms = float("nan")  # the server's wall time for the last step
        self.last_cpu_ms = float("nan")  # and its CPU time
        self.last_batch = 1  # sessions stepped together with this one
        self.last_waited_batches = 0  # model calls that started while the last step waited

    def _call(self, msg: dict, expect: str) -> dict:
        if self._broken is not None:
            raise ClientBrokenError(f"policy client: {self._broken}; the connection is closed and the server's "
                                    "episode is lost: make a new PolicyClient and reset")
        what = f"{msg['type']!r} request" + (f" {msg['id']}" if "id" in msg else "")
        frame = P.pack(msg)  # a local encoding error leaves the connection usable
        try:
            try:
                self._ws.send(frame)
            except ConnectionClosed:
                pass  # refused as it opened (busy, auth_backoff) and closed: the reason may still be there to read
            raw = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            self._give_up(f"{what} got no reply within {self.timeout:g} s")
            raise TimeoutError(f"policy client: {what} got no reply within {self.timeout:g} s; connection closed "
                               "(make a new PolicyClient and reset)") from None
        except BaseException as exc:  # link dropped or interrupted: whether the server acted on it is unknown
            self._give_up(f"{what} failed ({type(exc).__name__}: {exc})")
            raise
        reply = P.unpack(raw, 1 << 30)
        if reply["type"] == "error" and reply.get("id") in (None, msg.get("id")):
            if reply.get("code") == "non_finite_action":
                self.steps = 0  # the server ended the episode
            retry = reply.get("retry_after_s")
            raise RemotePolicyError(str(reply.get("code")), str(reply.get("message")),
                                    float(retry) if isinstance(retry, (int, float)) else None)
        if reply["type"] != expect or ("id" in msg and reply.get("id") != msg["id"]):
            # Replies are no longer paired with requests: nothing later could be trusted.
            self._give_up(f"{what} got a {reply['type']!r} reply for request {reply.get('id')}")
            raise RemotePolicyError("malformed", f"reply: expected {expect!r} for request {msg.get('id')}, "
                                                 f"got {reply['type']!r} for {reply.get('id')}")
        return reply

    def _give_up(self, why: str) -> None:
        self._broken = why
        try:
            self._ws.close_timeout = 0.5  # a stuck server would hold the closing handshake (default 10 s)
            self._ws.close()
        except Exception:  # already closed
            pass

    @property
    def broken(self) -> bool:
        """True once the connection was given up (see ClientBrokenError)."""
        return self._broken is not None

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def reset(self, instruction: str, embedding: np.ndarray | Sequence[float] | None = None) -> None:
        emb = None if embedding is None else np.asarray(embedding, dtype=np.float32)
        self.steps = 0  # a failed reset also leaves the session without an episode (server.py)
        self._call({"type": "reset", "id": self._next_id(), "instruction": instruction, "embedding": emb}, "reset_ok")

    def step(self, observation: Mapping[str, Any]) -> np.ndarray:
        """Send one observation (arrays; strings such as the instruction are passed along) -> flat action."""
        obs = {k: _wire_value(k, v) for k, v in observation.items()}
        reply = self._call({"type": "step", "id": self._next_id(), "observation": obs}, "action")
        self.steps = int(reply.get("step", self.steps + 1))
        self.last_policy_ms = float(reply.get("policy_ms", float("nan")))
        self.last_cpu_ms = float(reply.get("cpu_ms", float("nan")))
        self.last_batch = int(reply.get("batch", 1))
        self.last_waited_batches = int(reply.get("waited_batches", 0))
        return P.decode_array(reply["action"], "action.action").astype(np.float32)

    def step_named(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """As PolicyRunner.step_named: {name: float}, or the dict action of an Open X-Embodiment policy."""
        return self.named(self.step(observation))

    def named(self, action: np.ndarray) -> dict[str, Any]:
        if self._tokenizer_dict.get("kind") == "dict":
            from policy.action_tokenizer import DictActionTokenizer

            tok = DictActionTokenizer.from_dict(self._tokenizer_dict)
            return {k: v.numpy() for k, v in tok.unflatten(np.asarray(action, np.float32)).items()}
        return {n: float(v) for n, v in zip(self.action_names, action)}

    def close(self) -> None:
        try:
            if self._broken is None:
                self._ws.send(P.pack({"type": "close"}))
        except Exception:  # already closed: nothing to tell the server
            pass
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wire_value(key: str, v: Any) -> Any:
    """An observation entry -> what goes on the wire (str or array map); refusals name the key."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 0:  # a dm_env StringArray entry
        return str(v.item())
    if isinstance(v, str):
        return v
    where = f"observation[{key!r}]"
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as exc:  # e.g. a ragged list: numpy's message names no key
        raise ValueError(f"{where}: expected an array or a rectangular (not ragged) list of numbers, "
                         f"got {type(v).__name__} ({exc})") from None
    return P.encode_array(a, where)
