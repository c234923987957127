"""The server against clumsy and hostile clients (issue 19): a policy that outputs NaN, idle connections
that reconnect as soon as they are dropped, token guessing across reconnects, sessions that flood the
model, and wire arrays whose shape is ragged or overflows. Servers run in this process (tests/rollout/
test_server.py: _server_in_thread); other client addresses are other loopback IPs (127.0.0.2, ...)."""
import contextlib
import threading
import time

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from policy.runner import PolicyRunner
from rollout import protocol as P
from rollout.client import PolicyClient, RemotePolicyError
from rollout.random_policy import build_random_policy
from rollout.server import PolicyServer, ServerConfig, Session, address_key
from tests.rollout.test_server import OBS, TOKEN, _server_in_thread, _wait_until

INSTR = "pick up the red block"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("pol") / "policy", seed=3)


def _raw(url, source="127.0.0.1"):
    """A websocket from a chosen loopback address (what per-address limits count)."""
    return connect(url, compression=None, max_size=None, source_address=(source, 0), open_timeout=5)


def _ask(ws, msg):
    ws.send(P.pack(msg))
    return P.unpack(ws.recv(5), 1 << 30)


def _hello(ws, token=TOKEN):
    return _ask(ws, {"type": "hello", "version": 1, "token": token})


# ---- NaN actions ---------------------------------------------------------------------------------
def _nan_runner(policy_dir):
    """A real policy whose action head bias is NaN (as a corrupted weights file gives): with expectation
    decoding every action comes out NaN. Forks share the model, so every session gets it."""
    runner = PolicyRunner.load(policy_dir)
    runner.policy.cfg.model.action_decoding = "expectation"
    with torch.no_grad():
        for name, p in runner.model.head.named_parameters():
            if name.endswith("bias"):
                p.fill_(float("nan"))
    probe = runner.fork()
    probe.reset(INSTR)
    try:
        action = probe.step(OBS)
    except (ValueError, RuntimeError) as exc:  # a runner that refuses non-finite output itself
        assert "NonFinite" in type(exc).__name__, exc
    else:
        assert not np.all(np.isfinite(action))  # really NaN in process
    return runner


def test_a_nan_action_is_never_sent_and_the_error_names_session_and_step(policy_dir):
    with _server_in_thread(_nan_runner(policy_dir)) as (url, server):
        with PolicyClient(url) as c:
            c.reset(INSTR)
            with pytest.raises(RemotePolicyError) as err:
                c.step(OBS)
            assert err.value.code == "non_finite_action"
            msg = str(err.value)
            assert c.session in msg and "step 1" in msg and "NaN" in msg and "no action sent" in msg
            with pytest.raises(RemotePolicyError, match="not_ready"):  # the NaN memory is not stepped on
                c.step(OBS)
            c.reset(INSTR)  # the connection stays usable
            with pytest.raises(RemotePolicyError, match="non_finite_action"):
                c.step(OBS)
        # A batched call of two sessions: each gets its own error, naming its own session.
        sessions = [Session(server.base.fork(), server.cfg) for _ in range(2)]
        for s in sessions:
            s.runner.reset(INSTR)
        replies = server._step_many([(s, i, OBS) for i, s in enumerate(sessions)])
        for s, r in zip(sessions, replies):
            assert r["type"] == "error" and r["code"] == "non_finite_action" and s.id in r["message"]
            assert "action" not in r


class NonFiniteActionError(ValueError):
    """What a runner that checks its own output may raise (policy/runner.py: by name, whatever its base)."""


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_non_finite_output_is_refused_whether_the_runner_returns_or_raises_it(policy_dir, how):
    runner = PolicyRunner.load(policy_dir)

    class Broken(PolicyRunner):
        @staticmethod
        def step_group(runners, observations):
            if how == "raises":
                raise NonFiniteActionError("step: the policy produced NaN in 'x'")
            for r in runners:
                r.steps += 1
            return [np.array([0.1, np.nan, 0.0, np.inf, 1.0], np.float32) for _ in runners]

    server = PolicyServer(Broken(runner.policy), ServerConfig(port=0))
    s = Session(runner.fork(), server.cfg)
    s.runner.reset(INSTR)
    (r,) = server._step_many([(s, 7, OBS)])
    assert r["type"] == "error" and r["code"] == "non_finite_action" and r["id"] == 7 and "action" not in r
    assert s.id in r["message"] and s.runner._context is None  # named, and the episode was ended
    if how == "returns":  # the server's own check names the entries
        assert "step 1" in r["message"] and "world_vector_y=nan" in r["message"] and "=inf" in r["message"]
    else:
        assert "NonFiniteActionError" in r["message"]


# ---- lock-out by idle connections ------------------------------------------------------------------
@contextlib.contextmanager
def _idle_storm(url, sources, per_source):
    """Connections that never say hello and reconnect the moment they are dropped."""
    stop = threading.Event()
    counts = {"connects": 0}

    def storm(source):
        while not stop.is_set():
            try:
                with _raw(url, source) as ws:
                    counts["connects"] += 1
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            ws.recv(0.05)  # raises ConnectionClosed once the server drops it
            except Exception:  # dropped or refused: straight back
                continue

    threads = [threading.Thread(target=storm, args=(src,), daemon=True) for src in sources for _ in range(per_source)]
    for t in threads:
        t.start()
    try:
        yield counts
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_reconnecting_idle_connections_cannot_lock_out_a_client(policy_dir):
    cfg = dict(token=TOKEN, max_sessions=2, max_pending=4, max_pending_per_address=2, hello_timeout_s=0.5)
    with _server_in_thread(PolicyRunner.load(policy_dir), **cfg) as (url, server):
        # 12 idle, reconnecting connections: three times the pre-hello pool, from three addresses.
        with _idle_storm(url, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 4) as storm:
            assert _wait_until(lambda: storm["connects"] > 12 and len(server.pending) == 4)
            for _ in range(6):  # every legitimate connect gets in and steps
                assert len(server.pending) <= 4
                assert all(len(e.pending) <= 2 for e in server.addresses.entries.values())
                with PolicyClient(url, token=TOKEN) as c:
                    c.reset(INSTR)
                    assert np.all(np.isfinite(c.step(OBS)))
        # Idle connections from the client's own address: past its share a newcomer is refused until the
        # oldest has had its grace (hello_timeout_s / 4); then the oldest is dropped and the newcomer gets in.
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(_raw(url)) for _ in range(2)]
            with _raw(url) as ws:
                r = P.unpack(ws.recv(5), 1 << 30)
                assert r["code"] == "busy" and "younger than 0.125 s" in r["message"]
            time.sleep(0.15)
            with PolicyClient(url, token=TOKEN) as c:
                c.reset(INSTR)
                c.step(OBS)
            r = P.unpack(idle[0].recv(5), 1 << 30)
            assert r["code"] == "busy" and "waited longest" in r["message"]


# ---- token guessing --------------------------------------------------------------------------------
def test_failed_logins_back_off_per_address(policy_dir):
    cfg = dict(token=TOKEN, auth_backoff_after=3, auth_backoff_s=1.0, auth_backoff_max_s=8.0)
    with _server_in_thread(PolicyRunner.load(policy_dir), **cfg) as (url, server):
        for i in range(3):  # one guess per connection: the per-connection limit never trips
            with _raw(url, "127.0.0.2") as ws:
                r = _hello(ws, f"guess-number-{i}")
                assert r["code"] == "unauthorized"
        assert r["retry_after_s"] == 1.0 and "refused for 1 s" in r["message"]
        with _raw(url, "127.0.0.2") as ws:  # refused at once, even with the right token
            r = P.unpack(ws.recv(5), 1 << 30)
            assert r["code"] == "auth_backoff" and 0 < r["retry_after_s"] <= 1.0 and "127.0.0.2" in r["message"]
        with pytest.raises(RemotePolicyError) as err:  # the client surfaces the code and the wait
            PolicyClient(url, token=TOKEN, source_address=("127.0.0.2", 0))
        assert err.value.code == "auth_backoff" and 0 < err.value.retry_after_s <= 1.0
        # Another address is not affected.
        with PolicyClient(url, token=TOKEN) as c:
            c.reset(INSTR)
            c.step(OBS)
        # Guessing as fast as it can for 2.5 s: the server compares only a guess or two.
        checked, refused, end = 0, 0, time.monotonic() + 2.5
        while time.monotonic() < end:
            try:
                with _raw(url, "127.0.0.2") as ws:
                    r = _hello(ws, "another-guess")
            except Exception:  # refused and closed before the hello was read
                refused += 1
                continue
            checked += r["code"] == "unauthorized"
            refused += r["code"] == "auth_backoff"
        assert 1 <= checked <= 2 and refused > 10, (checked, refused)  # backoffs of 1 s, then 2 s
        assert server.addresses.get("127.0.0.2").failures == 3 + checked
        assert r["code"] == "auth_backoff" or r.get("retry_after_s") == 2.0 * checked


def test_server_config_validates_the_limits():
    for field, bad, want in (("max_pending_per_address", 0, "an integer >= 1"),
                             ("max_sessions_per_address", 1.5, "an integer >= 1"),
                             ("auth_backoff_after", True, "an integer >= 1"),
                             ("auth_backoff_s", -1.0, "seconds > 0"),
                             ("fair_window_s", float("nan"), "seconds > 0"),
                             ("fair_ratio", 0.5, "a number >= 1"),
                             ("auth_backoff_max_s", 0.1, "seconds >= auth_backoff_s")):
        with pytest.raises(ValueError, match=f"^{field}: expected {want}.*, got {bad!r}$"):
            ServerConfig(**{field: bad}).validate()
    ServerConfig(fair_ratio=float("inf")).validate()  # no fair share: plain FIFO batches
    assert address_key(("::ffff:10.0.0.7", 1, 0, 0)) == "10.0.0.7"
    assert address_key(("2001:db8::1:2:3:4", 1, 0, 0)) == address_key(("2001:db8::9", 1, 0, 0)) == "2001:db8::/64"
    assert address_key(None) == "unknown"


# ---- fair share ------------------------------------------------------------------------------------
def test_flooding_sessions_do_not_delay_a_control_loop_beside_them(policy_dir):
    """8 sessions step back-to-back; one steps at ~8 Hz. Asserted on batches, not time: each of its
    steps runs in the first model call after it arrives, in a call of at most flood_batch (2) steps
    (flooders batch among themselves), and the flooders' calls it may find in flight are as short."""
    runner = PolicyRunner.load(policy_dir)
    step = runner.model.step

    def slow_step(*args, **kwargs):  # a GPU-sized step: the model, not the transport, is the bottleneck
        time.sleep(0.02)
        return step(*args, **kwargs)

    runner.model.step = slow_step
    stop, flood_batches, errors = threading.Event(), [], []

    def flooder(url):
        try:
            with _raw(url) as ws:
                _hello(ws, None)
                _ask(ws, {"type": "reset", "id": 0, "instruction": INSTR})
                frame = P.pack({"type": "step", "id": 1, "observation": OBS})
                while not stop.is_set():
                    ws.send(frame)
                    r = P.unpack(ws.recv(5), 1 << 30)
                    assert r["type"] == "action", r
                    flood_batches.append(r["batch"])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    with _server_in_thread(runner, fair_window_s=0.5) as (url, server):
        threads = [threading.Thread(target=flooder, args=(url,), daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            assert _wait_until(lambda: len(flood_batches) > 40)
            with PolicyClient(url) as c:
                c.reset(INSTR)
                seen = []
                for k in range(16):
                    time.sleep(0.1)  # a control loop: it pauses 0.1 s between a reply and its next step
                    c.step(OBS)
                    seen.append((c.last_batch, c.last_waited_batches))
                    if k == 5:
                        mark = len(flood_batches)
                end = len(flood_batches)
        finally:
            stop.set()
            for t in threads:
                t.join(5)
    assert not errors, errors
    settled = seen[5:]  # the first steps: its think time is not known yet
    assert all(w == 0 for _, w in settled), seen  # never waits behind a flooder batch picked after it
    # Stepped apart from the flooders (at most one that had waited STARVE_BATCHES batches joins it).
    assert all(b <= 2 for b, _ in settled), seen
    assert max(flood_batches[:mark]) >= 4  # the flooders alone: batched in full
    beside = flood_batches[mark:end]
    assert len(beside) > 10 and max(beside) <= 2  # beside it: served (not starved), in short calls (flood_batch)


# ---- wire arrays -----------------------------------------------------------------------------------
def test_ragged_and_overflowing_wire_arrays_are_refused_naming_the_key(policy_dir):
    with pytest.raises(P.ProtocolError) as err:
        P.decode_observation({"image": {"__ndarray__": True, "dtype": "<f4", "shape": [2 ** 40, 2 ** 40, 3],
                                        "data": b""}})
    msg = str(err.value)
    assert msg.startswith("step.observation['image'].shape:") and f"needs {2 ** 80 * 3 * 4} bytes" in msg
    assert "0 data bytes" in msg and "more than any frame can hold" in msg
    with pytest.raises(P.ProtocolError, match=r"^step.observation\['state'\]: expected an array map"):
        P.decode_observation({"state": [[1.0, 2.0], [3.0]]})
    with pytest.raises(P.ProtocolError, match=r"^observation\['tag'\].dtype: expected one of"):
        P.encode_array(np.array([object()]), "observation['tag']")
    with _server_in_thread(PolicyRunner.load(policy_dir)) as (url, _):
        with _raw(url) as ws:
            _hello(ws, None)
            _ask(ws, {"type": "reset", "id": 0, "instruction": INSTR})
            for obs, key in (({"image": {"__ndarray__": True, "dtype": "|u1", "shape": [2 ** 40, 2 ** 40, 3],
                                         "data": b""}, "state": OBS["state"]}, "image"),
                             ({"image": OBS["image"], "state": [[1.0, 2.0], [3.0]]}, "state")):
                r = _ask(ws, {"type": "step", "id": 3, "observation": obs})
                assert r["code"] == "malformed" and f"step.observation[{key!r}]" in r["message"], r
        with PolicyClient(url) as c:  # the client names the key of a ragged list, and stays usable
            c.reset(INSTR)
            with pytest.raises(ValueError, match=r"observation\['state'\]: expected an array or a rectangular"):
                c.step({"image": OBS["image"], "state": [[1.0, 2.0], [3.0]]})
            assert not c.broken and np.all(np.isfinite(c.step(OBS)))
