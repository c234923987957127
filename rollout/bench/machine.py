"""The machine a benchmark ran on, as every bench's JSON reports it under "machine"."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's model name: `lscpu`'s "Model name", else /proc/cpuinfo's "model name", else platform's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5,
                             env=dict(os.environ, LC_ALL="C")).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """CPU, cores, threads, environment and versions. The load average says how noisy the numbers are
    on a shared machine; OMP_NUM_THREADS and MUJOCO_GL how the simulator and its renderer ran."""
    import numpy as np
    import torch

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "mujoco_gl": os.environ.get("MUJOCO_GL"),
            "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d")}
