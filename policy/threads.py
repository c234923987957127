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
RUNTIME_THREADS = 1  # torch intra-op threads for stepping a policy at batch 1


def set_runtime_threads(threads: int) -> None:
    """torch.set_num_threads(threads), with a warning when more than one thread will spin-wait: the OpenMP
    runtime already started without OMP_WAIT_POLICY=PASSIVE (measured: p90 7.6 s instead of 0.65 s for an
    RT-1-scale step at 2 threads beside 2 busy processes)."""
    import warnings

    import torch

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    if threads > 1 and wait_policy_in_effect().upper() != "PASSIVE":
        warnings.warn(f"{threads} torch threads with OMP_WAIT_POLICY={wait_policy_in_effect()}: on a loaded machine "
                      "their spinning makes steps several times slower; set OMP_WAIT_POLICY=PASSIVE in the "
                      "environment before Python starts (docs/ROBOT.md)", RuntimeWarning, stacklevel=3)


def wait_policy_in_effect() -> str:
    """The OMP_WAIT_POLICY this process's OpenMP runtime started with ('unset' if none)."""
    return os.environ.get("OMP_WAIT_POLICY") or "unset"
