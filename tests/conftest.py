import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BRIDGE = ROOT.parent / "shared" / "fixtures" / "rlds" / "bridge_dataset" / "1.0.0"


@pytest.fixture
def bridge_dir() -> Path:
    if not (BRIDGE / "dataset_info.json").is_file():
        pytest.skip(f"the shared Bridge RLDS sample is absent ({BRIDGE}); it lives in ../shared/fixtures beside the repo")
    return BRIDGE
