"""Thread settings for running a trained policy (the step runner, the server, evaluation), chosen so a
loaded machine degrades gracefully rather than stalling (measured with `bench step --load K`,
docs/ROBOT.md).

OpenMP's default is to let idle worker threads spin for their work-mates. On a robot's shared
computer the cores are busy: a spinning thread holds a core another process needs, and every step
waits for its slowest thread. Passive waiting (threads sleep) and one intra-op thread keep the step
time near the idle case. OMP_WAIT_POLICY is read once, when the OpenMP runtime loads with torch, so
run_policy.py sets it before importing torch; Python users set it in their environment.
"""
from __future__ import annotations

import os

RUNTIME_WAIT_POLICY = "PASSIVE"
RUNTIME_THREADS = 1


def runtime_threads() -> int:
    """Torch intra-op threads for stepping a policy at batch 1."""
    return RUNTIME_THREADS


def wait_policy_in_effect() -> str:
    """The OMP_WAIT_POLICY this process's OpenMP runtime started with ('unset' if none)."""
    return os.environ.get("OMP_WAIT_POLICY") or "unset"
