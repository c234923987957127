import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import BRIDGE  # noqa: E402


@pytest.fixture
def bridge_dir() -> Path:
    if not (BRIDGE / "dataset_info.json").is_file():
        pytest.skip(f"the shared Bridge RLDS sample is absent ({BRIDGE}); it lives in ../shared/fixtures beside the repo")
    return BRIDGE
