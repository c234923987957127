"""A real policy server process on loopback: episodes through the client match in-process steps,
sessions keep their own memory, and bad requests (randomised) get error replies while the server stays up."""
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

import envs
from policy.runner import PolicyRunner
from rollout import protocol as P
from rollout.bench.serve import stop_server
from rollout.client import ClientBrokenError, PolicyClient, RemotePolicyError
from rollout.random_policy import build_random_policy
from rollout.robot_loop import RobotLoop
from rollout.server import PolicyServer, ServerConfig
from tests.helpers import ROOT

TOKEN = "test-token-0123456789"
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    # Whole-episode TTM memory, so any state shared between sessions would change the actions.
    return build_random_policy(tmp_path_factory.mktemp("pol") / "policy", seed=2,
                               overrides=["model.controller.memory_horizon=0", "data.sequence=episode",
                                          "data.sequence_length=60"])


@pytest.fixture(scope="module")
def server(policy_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_policy.py"), "serve", "--policy", str(policy_dir),
                             "--port", "0", "--token", TOKEN, "--max-message-bytes", str(MAX_BYTES),
                             "--rate-limit", "2000", "--burst", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    m = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        pytest.fail(f"server did not start: {line!r}")
    yield f"ws://127.0.0.1:{m.group(1)}", proc
    stop_server(proc)


@contextlib.contextmanager
def _server_in_thread(runner, **cfg):
    """A PolicyServer on its own event loop in this process: settings the CLI does not take, and a model
    the test can slow down."""
    server = PolicyServer(runner, ServerConfig(port=0, **cfg))
    started: Future = Future()

    def main():
        async def go():
            loop = asyncio.get_running_loop()
            stop, ready = loop.create_future(), loop.create_future()
            task = asyncio.ensure_future(server.serve(ready, stop))
            started.set_result((loop, stop, await ready))
            await task

        asyncio.run(go())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    loop, stop, port = started.result(30)
    try:
        yield f"ws://127.0.0.1:{port}", server
    finally:
        loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
        thread.join(10)


def _wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


OBS = {"image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(4, np.float32)}


def _assert_alive(url):
    with PolicyClient(url, token=TOKEN) as c:
        c.reset("pick up the red block")
        a = c.step({"image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(4, np.float32)})
        assert a.shape == (5,) and np.all(np.isfinite(a))


def _episode(policy, seed, steps=20):
    env = envs.make("tabletop", task="lift", max_steps=steps)
    try:
        ts = env.reset(seed=seed)
        policy.reset(str(env.instruction))
        actions = []
        while not ts.last():
            actions.append(policy.step(ts.observation))
            ts = env.step(actions[-1])
        return np.stack(actions)
    finally:
        env.close()


def test_episode_through_the_server_matches_in_process(server, policy_dir):
    url, _ = server
    local = PolicyRunner.load(policy_dir)
    with PolicyClient(url, token=TOKEN) as client:
        assert client.action_names == local.action_names and client.spec["image_shape"] == [64, 64, 3]
        remote = _episode(client, seed=1_000_123)
    np.testing.assert_allclose(remote, _episode(local, seed=1_000_123), atol=1e-6)
    assert remote.shape == (20, 5)


def test_robot_loop_runs_on_the_client(server):
    url, _ = server
    env = envs.make("tabletop", task="reach", seed=5, max_steps=10)
    try:
        with PolicyClient(url, token=TOKEN) as client:
            res = RobotLoop(env, client, rate_hz=5, max_consecutive_late=None).run()
    finally:
        env.close()
    assert res.steps == 10 and res.stop_reason == "episode_end"
    assert all(r.source == "hold" or r.policy_ms is not None for r in res.records)


def test_concurrent_sessions_never_share_memory(server, policy_dir):
    url, _ = server
    rng = np.random.default_rng(0)
    streams = {k: [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                    "state": rng.normal(size=4).astype(np.float32)} for _ in range(12)] for k in "ab"}
    instr = {"a": "pick up the red block", "b": "push the green block to the left"}
    got, errors = {}, []

    def run(k):
        try:
            with PolicyClient(url, token=TOKEN) as c:
                c.reset(instr[k])
                got[k] = np.stack([c.step(o) for o in streams[k]])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    local = PolicyRunner.load(policy_dir)
    for k in "ab":
        local.reset(instr[k])
        want = np.stack([local.step(o) for o in streams[k]])
        np.testing.assert_allclose(got[k], want, atol=1e-6)


def _bad_frames(rng):
    """A random mix of malformed, schema-breaking, oversized and out-of-order requests."""
    good_img = P.encode_array(np.zeros((64, 64, 3), np.uint8))
    makers = [
        lambda: rng.bytes(int(rng.integers(1, 300))),  # garbage
        lambda: msgpack.packb([1, 2, 3]),  # not a map
        lambda: msgpack.packb({"id": 3}),  # no type
        lambda: msgpack.packb({"type": 7}),
        lambda: P.pack({"type": "launch_missiles", "id": 1}),
        lambda: P.pack({"type": "reset", "id": 2, "instruction": 42}),
        lambda: P.pack({"type": "reset", "id": 2, "instruction": ""}),
        lambda: P.pack({"type": "step", "id": 4, "observation": "image"}),
        lambda: P.pack({"type": "step", "id": 5, "observation": {"image": {"__ndarray__": True, "dtype": "|O",
                                                                              "shape": [1], "data": b"x"}}}),
        lambda: P.pack({"type": "step", "id": 6, "observation": {"image": {**good_img, "shape": [64, 64, 4]}}}),
        lambda: P.pack({"type": "step", "id": 7, "observation": {"image": {**good_img, "shape": [-1]}}}),
        lambda: P.pack({"type": "step", "id": 8, "observation": {"image": np.zeros((64, 64, 3), np.float32),
                                                                 "state": np.zeros(4, np.float32)}}),
        lambda: P.pack({"type": "step", "id": 9, "observation": {"image": np.zeros((32, 64, 3), np.uint8),
                                                                 "state": np.zeros(4, np.float32)}}),
        lambda: P.pack({"type": "step", "id": 10, "observation": {"state": np.zeros(4, np.float32)}}),
        lambda: P.pack({"type": "step", "id": 11, "observation": {"image": np.zeros((64, 64, 3), np.uint8),
                                                                  "state": np.full(4, np.nan, np.float32)}}),
        lambda: P.pack({"type": "step", "id": 12, "observation": {"a": {"b": {"c": {"d": [1]}}}}}),
        lambda: b"\x00" * (MAX_BYTES + 10),  # oversized but under the hard cap: answered
        lambda: "a text frame",
        lambda: P.pack({"type": "hello", "version": 999, "token": TOKEN}),
    ]
    return [makers[int(i)]() for i in rng.integers(len(makers), size=150)]


def _is_reset(frame):
    try:
        return P.unpack(frame, 1 << 30)["type"] == "reset"
    except Exception:
        return False


def test_random_bad_requests_get_error_replies_and_the_server_stays_up(server):
    url, proc = server
    rng = np.random.default_rng(1234)
    with connect(url, compression=None, max_size=None) as ws:
        ws.send(P.pack({"type": "hello", "version": 1, "token": TOKEN}))
        assert P.unpack(ws.recv(10), 1 << 30)["type"] == "ready"
        ws.send(P.pack({"type": "reset", "id": 0, "instruction": "push the red block to the left"}))
        assert P.unpack(ws.recv(10), 1 << 30)["type"] == "reset_ok"
        codes = []
        for frame in _bad_frames(rng):
            ws.send(frame)
            reply = P.unpack(ws.recv(10), 1 << 30)
            assert reply["type"] == "error" and reply["code"] in P.ERROR_CODES and reply["message"], reply
            codes.append(reply["code"])
            if _is_reset(frame):  # a failed reset ends the episode: start another so steps are checked
                ws.send(P.pack({"type": "reset", "id": 0, "instruction": "push the red block to the left"}))
                assert P.unpack(ws.recv(10), 1 << 30)["type"] == "reset_ok"
        # The same session still works after all that.
        ws.send(P.pack({"type": "reset", "id": 1, "instruction": "pick up the red block"}))
        assert P.unpack(ws.recv(10), 1 << 30)["type"] == "reset_ok"
    assert {"malformed", "too_large", "bad_request", "bad_observation", "version"} <= set(codes)
    assert proc.poll() is None
    _assert_alive(url)


def test_unauthenticated_requests_are_refused(server):
    url, proc = server
    with connect(url, compression=None) as ws:
        ws.send(P.pack({"type": "step", "id": 1, "observation": {"image": np.zeros((64, 64, 3), np.uint8)}}))
        r = P.unpack(ws.recv(10), 1 << 30)
        assert r["code"] == "unauthorized" and "hello" in r["message"]
        for token in (None, "wrong-token-xxxxxxx", TOKEN[:-1]):
            ws.send(P.pack({"type": "hello", "version": 1, "token": token}))
            r = P.unpack(ws.recv(10), 1 << 30)
            assert r["type"] == "error" and r["code"] == "unauthorized"
        with pytest.raises(Exception):  # closed after repeated failures
            ws.recv(10)
    with pytest.raises(RemotePolicyError, match="unauthorized"):
        PolicyClient(url, token="nope-nope-nope")
    assert proc.poll() is None
    _assert_alive(url)


def test_rate_limit_and_hard_size_cap(server):
    url, proc = server
    with connect(url, compression=None, max_size=None) as ws:
        ws.send(P.pack({"type": "hello", "version": 1, "token": TOKEN}))
        ws.recv(10)
        for i in range(400):  # pipelined: no waiting for replies
            ws.send(P.pack({"type": "nop", "id": i}))
        codes = [P.unpack(ws.recv(10), 1 << 30)["code"] for _ in range(400)]
        assert "rate_limited" in codes and "bad_request" in codes
    with connect(url, compression=None, max_size=None) as ws:
        ws.send(b"\x00" * (4 * MAX_BYTES + 1))  # beyond the hard cap: the connection is closed (1009)
        with pytest.raises(Exception):
            ws.recv(10)
    assert proc.poll() is None
    _assert_alive(url)


def test_binding_beyond_loopback_needs_a_token():
    with pytest.raises(ValueError, match="--token: required when the server listens beyond loopback"):
        ServerConfig(host="0.0.0.0").validate()
    ServerConfig(host="0.0.0.0", token="long-enough-token").validate()
    ServerConfig(host="::1").validate()
    with pytest.raises(ValueError, match="--token: expected at least 8"):
        ServerConfig(token="short").validate()


def test_bench_serve_reports_json(tmp_path):
    """Structure only (no timing asserted): in-process vs loopback percentiles, fleet, load average."""
    import json

    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "bench", "serve", "--clients", "2",
                           "--rate", "20", "--image-size", "64x80", "--steps", "5", "--flood", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["image_shape"] == [64, 80, 3] and res["fleet"]["steps_total"] == 10 and not res["fleet"]["errors"]
    for key in ("in_process_step_ms", "loopback_round_trip_ms", "server_step_ms", "server_step_cpu_ms"):
        assert res[key]["n"] == 5 and 0 < res[key]["p50"] <= res[key]["max"]
    assert 0 <= res["fleet"]["missed_deadlines"] <= 10 and len(res["machine"]["loadavg_before"]) == 3
    flood = res["flood"]  # one client quiet, then beside 2 flooding sessions
    assert flood["flooding_sessions"] == 2 and not flood["errors"] and flood["flood_steps_per_s"] > 0
    for case in ("quiet", "flooded"):
        assert flood[case]["round_trip_ms"]["n"] == 5 and flood[case]["round_trip_ms"]["p50"] > 0
    assert flood["flooded_over_quiet"]["p50"] == round(flood["flooded"]["round_trip_ms"]["p50"]
                                                       / flood["quiet"]["round_trip_ms"]["p50"], 3)
    bad = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "bench", "serve", "--image-size", "64by80"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--image-size: expected HxW" in bad.stderr


def test_a_failed_reset_leaves_the_session_without_an_episode(server, policy_dir):
    url, _ = server
    local = PolicyRunner.load(policy_dir)  # in process: the same rule
    local.reset("pick up the red block")
    local.step(OBS)
    with pytest.raises(ValueError, match="instruction"):
        local.reset("   ")
    with pytest.raises(RuntimeError, match="before reset"):
        local.step(OBS)
    with PolicyClient(url, token=TOKEN) as c:
        c.reset("pick up the red block")
        c.step(OBS)
        assert c.step(OBS) is not None and c.steps == 2
        for bad in ("", "   "):  # refused by the protocol check and by the runner
            with pytest.raises(RemotePolicyError, match="bad_request|bad_observation"):
                c.reset(bad)
            with pytest.raises(RemotePolicyError, match="not_ready"):  # not step 3 of the old episode
                c.step(OBS)
        c.reset("pick up the red block")
        c.step(OBS)
        assert c.steps == 1


def test_a_client_timeout_closes_the_client_instead_of_pairing_later_replies_wrongly(policy_dir):
    runner = PolicyRunner.load(policy_dir)
    slow = threading.Event()
    step = runner.model.step

    def model_step(*args, **kwargs):
        if slow.is_set():
            time.sleep(0.4)
        return step(*args, **kwargs)

    runner.model.step = model_step  # shared by the server's sessions (forks share the model)
    with _server_in_thread(runner) as (url, server):
        c = PolicyClient(url)
        c.reset("pick up the red block")
        c.step(OBS)
        c.timeout = 0.1
        slow.set()
        with pytest.raises(TimeoutError):
            c.step(OBS)
        slow.clear()
        time.sleep(0.4)  # the late reply would be waiting by now
        for _ in range(2):
            with pytest.raises(ClientBrokenError, match="new PolicyClient and reset"):
                c.step(OBS)
        assert c.broken
        c.close()
        assert _wait_until(lambda: not server.sessions)  # the server ended the old session
        with PolicyClient(url) as fresh:
            fresh.reset("pick up the red block")
            fresh.step(OBS)
            assert fresh.steps == 1


def test_idle_connections_cannot_take_the_session_slots(policy_dir):
    with _server_in_thread(PolicyRunner.load(policy_dir), max_sessions=2, max_pending=3, hello_timeout_s=1.0) as (url, server):
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(connect(url, compression=None)) for _ in range(2)]  # never say hello
            with PolicyClient(url) as c:  # gets in: slots are for sessions past hello
                c.reset("pick up the red block")
                c.step(OBS)
            for ws in idle:  # closed once the hello timeout passes
                r = P.unpack(ws.recv(10), 1 << 30)
                assert r["code"] == "unauthorized" and "'hello' within 1 s" in r["message"]
                with pytest.raises(Exception):
                    ws.recv(10)
        assert _wait_until(lambda: not server.pending)
        # The cap counts sessions past hello...
        a, b = PolicyClient(url), PolicyClient(url)
        with pytest.raises(RemotePolicyError, match="busy"):
            PolicyClient(url)
        a.close()
        b.close()
        # ...and connections waiting for hello have their own cap: a new one is let in, the one
        # that waited longest is dropped to make room.
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(connect(url, compression=None)) for _ in range(3)]
            assert _wait_until(lambda: len(server.pending) == 3)
            with connect(url, compression=None) as ws:  # younger than the others' grace: refused
                r = P.unpack(ws.recv(10), 1 << 30)
                assert r["code"] == "busy" and "waiting to say hello" in r["message"]
            time.sleep(0.3)  # a quarter of the hello timeout: now the longest-waiting one makes room
            with connect(url, compression=None) as ws:
                r = P.unpack(idle[0].recv(10), 1 << 30)
                assert r["code"] == "busy" and "waiting to say hello" in r["message"]
                assert len(server.pending) == 3
                ws.send(P.pack({"type": "hello", "version": 1, "token": None}))
                assert P.unpack(ws.recv(10), 1 << 30)["type"] == "ready"
    with pytest.raises(ValueError, match="hello_timeout_s"):
        ServerConfig(hello_timeout_s=0).validate()


def test_bench_serve_kills_a_server_that_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    t = time.monotonic()
    assert stop_server(proc, timeout=0.3) == -9  # SIGKILL after the grace period
    assert time.monotonic() - t < 10 and proc.poll() == -9
