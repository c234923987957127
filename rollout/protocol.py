"""The remote policy protocol: msgpack messages over a websocket (binary frames), never pickle.

Every message is a msgpack map with a string "type". Arrays travel as maps
{"__ndarray__": true, "dtype": "<u1", "shape": [H, W, 3], "data": <bytes, C order>}, with dtype one
of ALLOWED_DTYPES (little-endian numeric only, so no object arrays can be smuggled in).

client -> server                                        server -> client
  {"type": "hello", "version": 1, "token": str|None}      {"type": "ready", "version": 1, "session": str,
                                                           "spec": {...input spec...}, "action_names": [...],
                                                           "action_tokenizer": {...}, "language_source": str,
                                                           "limits": {...}}
  {"type": "reset", "id": int, "instruction": str,        {"type": "reset_ok", "id": int}
   "embedding": array|None}
  {"type": "step", "id": int, "observation": {key: array}} {"type": "action", "id": int, "action": array [A] float32,
                                                           "step": int, "policy_ms": float, "cpu_ms": float,
                                                           "batch": int (sessions stepped in the same call),
                                                           "waited_batches": int (model calls that started
                                                           while this step waited)}
  {"type": "close"}                                       (the server closes the connection)
  anything wrong                                          {"type": "error", "id": int|None, "code": str, "message": str,
                                                           "retry_after_s": float (auth_backoff only)}

The first message must be "hello" (with the token when the server has one); a session's reset/step
state belongs to its connection only. Error codes: ERROR_CODES. Errors never close the connection,
except repeated authentication failures, no "hello" within the server's hello timeout (close 1008), a
full server ("busy", close 1013), an address in login backoff ("auth_backoff", close 1008) and frames
beyond the hard size cap (websocket close 1009). A failed "reset" leaves the session without an episode:
"step" gets "not_ready" until a reset succeeds; so does a step whose action came out NaN or infinite
("non_finite_action": the action is never sent, and the episode's memory may hold the NaN).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ALLOWED_DTYPES = ("|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<i8", "<u8", "<f2", "<f4", "<f8", "|b1")
ERROR_CODES = ("malformed", "unauthorized", "too_large", "rate_limited", "bad_request", "bad_observation",
               "not_ready", "busy", "version", "internal", "non_finite_action", "auth_backoff")
MAX_DEPTH = 4  # nesting allowed inside a message (observation -> key -> array map)


class ProtocolError(ValueError):
    """A message that breaks the schema; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode_array(a: np.ndarray, where: str = "array") -> dict:
    a = np.ascontiguousarray(a)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt.str not in ALLOWED_DTYPES:
        raise ProtocolError("bad_request", f"{where}.dtype: expected one of {ALLOWED_DTYPES}, got {a.dtype.str}")
    return {"__ndarray__": True, "dtype": dt.str, "shape": list(a.shape), "data": a.astype(dt, copy=False).tobytes()}


def decode_array(obj: Any, where: str) -> np.ndarray:
    """An array map -> a read-only array; every refusal names `where` (e.g. step.observation['image'])."""
    if not isinstance(obj, Mapping) or obj.get("__ndarray__") is not True:
        raise ProtocolError("malformed", f"{where}: expected an array map {{__ndarray__, dtype, shape, data}}, "
                                         f"got {type(obj).__name__}")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError("malformed", f"{where}.dtype: expected one of {ALLOWED_DTYPES}, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in shape)):
        raise ProtocolError("malformed", f"{where}.shape: expected a list of at most 8 non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError("malformed", f"{where}.data: expected bytes, got {type(data).__name__}")
    # Python ints: a shape such as [2**40, 2**40, 3] must not wrap around to a small (or zero) size.
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes != len(data):
        why = " (more than any frame can hold)" if nbytes > len(data) and nbytes >= 1 << 40 else ""
        raise ProtocolError("malformed", f"{where}.shape: expected a shape whose {dtype} size matches the "
                                         f"{len(data)} data bytes, got {shape} which needs {nbytes} bytes{why}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def pack(message: Mapping[str, Any]) -> bytes:
    """Encode a message; numpy arrays anywhere inside become array maps."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return encode_array(o)
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot send {type(o).__name__} in a message")

    return msgpack.packb(message, default=default, use_bin_type=True)


def unpack(frame: Any, max_bytes: int) -> dict:
    """Decode and shape-check one frame -> a message dict with "type" (arrays still as maps)."""
    if isinstance(frame, str):
        raise ProtocolError("malformed", "frame: expected a binary msgpack frame, got a text frame")
    if len(frame) > max_bytes:
        raise ProtocolError("too_large", f"frame: expected at most {max_bytes} bytes, got {len(frame)}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 16,
                              max_array_len=1 << 12, max_map_len=64, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"frame: expected a msgpack map, could not decode it ({type(exc).__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"message: expected a msgpack map, got {type(msg).__name__}")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("malformed", f"message.type: expected a string, got {msg.get('type')!r}")
    if _depth(msg) > MAX_DEPTH:
        raise ProtocolError("malformed", f"message: expected nesting depth <= {MAX_DEPTH}")
    return msg


def _depth(o: Any, d: int = 0) -> int:
    if d > MAX_DEPTH:
        return d
    if isinstance(o, dict):
        return max([_depth(v, d + 1) for v in o.values()], default=d + 1)
    if isinstance(o, list):
        return max([_depth(v, d + 1) for v in o], default=d + 1)
    return d


def message_id(msg: Mapping[str, Any]) -> int | None:
    i = msg.get("id")
    return i if isinstance(i, int) and not isinstance(i, bool) else None


def require(msg: Mapping[str, Any], key: str, kind: type | tuple, what: str) -> Any:
    v = msg.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise ProtocolError("bad_request", f"{msg.get('type')}.{key}: expected {what}, got {type(v).__name__}")
    return v


def error(code: str, message: str, mid: int | None = None, retry_after_s: float | None = None) -> dict:
    assert code in ERROR_CODES, code
    reply = {"type": "error", "id": mid, "code": code, "message": message}
    if retry_after_s is not None:  # when a refused client may try again (auth_backoff)
        reply["retry_after_s"] = round(float(retry_after_s), 3)
    return reply


def decode_observation(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict) or not obj:
        raise ProtocolError("bad_request", f"step.observation: expected a map of key -> array, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, str):
            out[k] = v  # e.g. the instruction, passed along and ignored by the policy
        else:
            out[k] = decode_array(v, f"step.observation[{k!r}]")
    return out
