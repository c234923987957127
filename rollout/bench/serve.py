"""`bench serve`: what the remote server costs over loopback, and whether K robots at a rate keep their deadlines.

1. In-process: PolicyRunner.step latency (the baseline).
2. One client, back-to-back steps through a real server process: round trip vs in-process; the
   transport overhead is also measured per step as round trip minus the server's own step time.
3. K clients (threads, one session each) at `rate` Hz for `steps` steps each: a step misses its
   deadline when its round trip exceeds the control period.
4. Fair share (--flood N): one client at `rate` Hz alone (quiet), then beside N sessions that step
   back-to-back as fast as the server answers (flooded): its round trips in both cases and their
   ratio (the server's fair-share batching aims at flooded p50 within 2x of quiet).
Without --policy an untrained quickstart policy accepting the requested image size is built in a
temporary directory (rollout/random_policy.py): latency does not depend on training.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.machine import machine

ROOT = A.REPO_ROOT


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 16:
        raise ValueError(f"--image-size: expected HxW with H, W >= 16 (e.g. 256x320), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"min": round(float(a.min()), 3), "p10": round(float(np.percentile(a, 10)), 3),
            "p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3), "n": int(a.size)}


def _observation(spec, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {spec.camera_key: rng.integers(0, 256, tuple(spec.image_shape), dtype=np.uint8)}
    if spec.proprio_key:
        obs[spec.proprio_key] = rng.normal(size=spec.proprio_dim).astype(np.float32)
    return obs


def _start_server(policy_dir: str, threads: int, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_policy.py"), "serve", "--policy", policy_dir,
                             "--port", "0", "--threads", str(threads), "--rate-limit", "10000", "--burst", "1000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    m = re.search(r"(ws://[^ ]+:\d+)", line)
    if not m:
        stop_server(proc, timeout=0)
        raise RuntimeError(f"bench serve: the server did not start (its first line: {line!r})")
    return proc, m.group(1)


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s (a wedged server must not outlive
    the benchmark); reaps it -> its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    code = proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def bench_serve(policy_dir: str | None = None, clients: int = 4, rate: float = 10.0,
                image_size: tuple[int, int] | None = None, steps: int = 100, threads: int = 1,
                flood: int = 8) -> dict:
    import torch

    from policy.runner import PolicyRunner
    from rollout.client import PolicyClient

    for name, v, low in (("--clients", clients, 1), ("--steps", steps, 5), ("--threads", threads, 1),
                         ("--flood", flood, 0)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
    if not rate > 0:
        raise ValueError(f"--rate: expected a control rate in Hz > 0, got {rate!r}")
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    tmp = None
    if policy_dir is None:
        from rollout.random_policy import build_random_policy

        tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
        h, w = image_size or (256, 320)
        policy_dir = str(build_random_policy(Path(tmp.name) / "policy", image_shape=(h, w, 3)))
    try:
        runner = PolicyRunner.load(policy_dir, threads=None)
        shape = tuple(runner.spec.image_shape)
        if image_size is not None and tuple(image_size) != shape[:2]:
            raise ValueError(f"--image-size: the policy at {policy_dir!r} takes {shape[0]}x{shape[1]} frames, "
                             f"got {image_size[0]}x{image_size[1]}; omit --image-size or --policy")
        obs = _observation(runner.spec)
        runner.reset("pick up the red block")
        for _ in range(10):
            runner.step(obs)
        local = []
        for _ in range(steps):
            t = time.perf_counter()
            runner.step(obs)
            local.append(1000 * (time.perf_counter() - t))

        proc, url = _start_server(policy_dir, threads)
        try:
            with PolicyClient(url) as c:
                c.reset("pick up the red block")
                for _ in range(10):
                    c.step(obs)
                rtt, server_ms, server_cpu = [], [], []
                cpu0, srv0 = time.process_time(), _process_cpu_s(proc.pid)
                for _ in range(steps):
                    t = time.perf_counter()
                    c.step(obs)
                    rtt.append(1000 * (time.perf_counter() - t))
                    server_ms.append(c.last_policy_ms)
                    server_cpu.append(c.last_cpu_ms)
                client_cpu_s, srv1 = time.process_time() - cpu0, _process_cpu_s(proc.pid)
            transport = [r - s for r, s in zip(rtt, server_ms)]
            fleet = _fleet(url, obs, clients, rate, steps)
            flooded = _flooded(url, obs, flood, rate, steps) if flood else None
        finally:
            stop_server(proc)
    finally:
        if tmp is not None:
            tmp.cleanup()
    frame_bytes = int(np.prod(shape))
    local_p, rtt_p = _pct(local), _pct(rtt)
    return {
        "benchmark": "serve", "policy": policy_dir if tmp is None else "untrained quickstart (rollout/random_policy.py)",
        "image_shape": list(shape), "frame_bytes": frame_bytes, "steps": steps, "threads": threads,
        "in_process_step_ms": local_p,
        "loopback_round_trip_ms": rtt_p,
        "server_step_ms": _pct(server_ms),
        # CPU time per step is what a loaded machine does not inflate (fleet: server_core_utilisation).
        "server_step_cpu_ms": _pct(server_cpu),
        "overhead_ms": {"p50_round_trip_minus_in_process": round(rtt_p["p50"] - local_p["p50"], 3),
                        "transport_per_step": _pct(transport),
                        # CPU spent on the round trip besides the model step (client + server processes,
                        # all threads): the overhead's cost without the waiting a loaded machine adds.
                        "transport_cpu_per_step": None if srv0 is None or srv1 is None else round(
                            (1000 * (client_cpu_s + srv1 - srv0) - sum(server_cpu)) / steps, 3)},
        "fleet": fleet,
        "flood": flooded,
        "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M")},
    }


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _fleet(url: str, obs: dict, clients: int, rate: float, steps: int) -> dict:
    """K sessions at `rate` Hz each, started together; a step misses when its round trip exceeds the period."""
    from rollout.client import PolicyClient

    period = 1.0 / rate
    rtts: list[list[float]] = [[] for _ in range(clients)]
    cpus: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def robot(i: int) -> None:
        try:
            with PolicyClient(url) as c:
                c.reset("pick up the red block")
                barrier.wait(timeout=30)
                start = time.perf_counter() + i * period / clients  # robots out of phase, as real ones are
                for k in range(steps):
                    wait = start + k * period - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    t = time.perf_counter()
                    c.step(obs)
                    rtts[i].append(1000 * (time.perf_counter() - t))
                    cpus.append(c.last_cpu_ms)
                    batches.append(c.last_batch)
        except Exception as exc:  # reported, not raised: the other robots' numbers still count
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ms = [x for r in rtts for x in r]
    missed = sum(x > 1000 * period for x in all_ms)
    return {"clients": clients, "rate_hz": rate, "period_ms": round(1000 * period, 3), "steps_per_client": steps,
            "round_trip_ms": _pct(all_ms) if all_ms else {}, "missed_deadlines": int(missed),
            "steps_total": len(all_ms), "errors": errors,
            "server_step_cpu_ms": _pct(cpus) if cpus else {},
            "mean_batch": round(float(np.mean(batches)), 3) if batches else None,
            # The share of one core the server's model needs for this fleet (CPU time, load-independent).
            "server_core_utilisation": round(clients * rate * float(np.median(cpus)) / 1000, 3) if cpus else None}


def _paced_client(url: str, obs: dict, rate: float, steps: int, warmup: int = 5) -> dict:
    """One session at `rate` Hz: its round trips (ms), and the batches its steps went in."""
    from rollout.client import PolicyClient

    period = 1.0 / rate
    rtt, batch, waited = [], [], []
    with PolicyClient(url) as c:
        c.reset("pick up the red block")
        start = time.perf_counter()
        for k in range(warmup + steps):
            wait = start + k * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t = time.perf_counter()
            c.step(obs)
            if k >= warmup:
                rtt.append(1000 * (time.perf_counter() - t))
                batch.append(c.last_batch)
                waited.append(c.last_waited_batches)
    return {"round_trip_ms": _pct(rtt), "mean_batch": round(float(np.mean(batch)), 3),
            "max_waited_batches": int(max(waited))}


def _flooded(url: str, obs: dict, flood: int, rate: float, steps: int) -> dict:
    """A client at `rate` Hz alone, then beside `flood` sessions stepping back-to-back (prepacked frames,
    so the flooders cost this process little CPU)."""
    from websockets.sync.client import connect

    from rollout import protocol as P

    quiet = _paced_client(url, obs, rate, steps)
    frame = P.pack({"type": "step", "id": 1, "observation": obs})
    stop, served, batches, errors = threading.Event(), [0] * flood, [[] for _ in range(flood)], []
    started = threading.Barrier(flood + 1)

    def flooder(i: int) -> None:
        try:
            with connect(url, compression=None, max_size=None) as ws:
                for msg in ({"type": "hello", "version": P.PROTOCOL_VERSION},
                            {"type": "reset", "id": 0, "instruction": "pick up the red block"}):
                    ws.send(P.pack(msg))
                    ws.recv(30)
                started.wait(30)
                while not stop.is_set():
                    ws.send(frame)
                    r = P.unpack(ws.recv(30), 1 << 30)
                    if r["type"] != "action":
                        raise RuntimeError(f"{r.get('code')}: {r.get('message')}")
                    served[i] += 1
                    batches[i].append(r["batch"])
        except Exception as exc:  # reported, not raised: the quiet client's numbers still count
            errors.append(f"flooder {i}: {type(exc).__name__}: {exc}")
            stop.set()
            started.abort()  # nobody waits for a flooder that will never start

    threads = [threading.Thread(target=flooder, args=(i,), daemon=True) for i in range(flood)]
    for th in threads:
        th.start()
    try:
        try:
            started.wait(60)
        except threading.BrokenBarrierError:
            return {"flooding_sessions": flood, "errors": errors or ["flooders did not start within 60 s"]}
        time.sleep(1.0)  # flooders at full speed (and their step rates known to the server) first
        t0, n0 = time.perf_counter(), sum(served)
        loud = _paced_client(url, obs, rate, steps)
        seconds, n = time.perf_counter() - t0, sum(served) - n0
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    q, f = quiet["round_trip_ms"], loud["round_trip_ms"]
    all_batches = [b for bs in batches for b in bs]
    return {"flooding_sessions": flood, "client_rate_hz": rate, "client_steps": steps,
            "quiet": quiet, "flooded": loud,
            "flooded_over_quiet": {"p50": round(f["p50"] / q["p50"], 3), "p90": round(f["p90"] / q["p90"], 3)},
            "flood_steps_per_s": round(n / seconds, 1),
            "flood_mean_batch": round(float(np.mean(all_batches)), 3) if all_batches else None,
            "errors": errors}


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_policy(p, "policy directory (default: an untrained quickstart policy for --image-size)")
    p.add_argument("--clients", type=A.positive_int, default=4, help="concurrent robot sessions")
    p.add_argument("--rate", type=A.positive_float, default=10.0, help="control rate per client (Hz)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="frame size HxW, or N for NxN (default 256x320; with --policy: the policy's)")
    A.add_steps(p, 100, "timed steps (in process, one client, and per client of the fleet)")
    p.add_argument("--serve-threads", type=A.positive_int, default=1, help="torch threads (server and in-process)")
    p.add_argument("--flood", type=int, default=8, metavar="N",
                   help="sessions stepping back-to-back beside one client at --rate: its round trips quiet vs "
                        "flooded (0 = skip)")
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    size = a.image_size
    if size is not None and size.strip().isdigit():
        size = f"{size.strip()}x{size.strip()}"
    res = bench_serve(a.policy, a.clients, a.rate, parse_image_size(size), a.steps, threads=a.serve_threads,
                      flood=a.flood)
    print(json.dumps(res, indent=2))
    return res


register("serve", "policy server round trips over loopback versus in-process steps, missed deadlines with "
         "K clients, one client's latency beside N flooding sessions", add_arguments, run)
