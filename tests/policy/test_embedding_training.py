"""Training on an Open X-Embodiment dataset's precomputed instruction embedding, end to end:
a fractal20220817_data-schema RLDS dataset -> train (model.language.source=embedding) -> policy directory
-> the step runner, which takes the embedding at reset and returns RT-1's 11 action values."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.helpers import write_fractal

CONFIG = ROOT / "configs" / "quickstart.yaml"


def _cfg(*overrides: str):
    from policy.config import load_config

    return load_config(CONFIG, ["train.steps=2", "train.batch_size=4", "train.num_threads=1", "train.log_every=1",
                                "model.language.source=embedding", "model.use_proprio=false", *overrides])


def test_policy_trains_on_dataset_embeddings_and_runs_with_one(tmp_path):
    from policy.runner import ObservationError, PolicyRunner
    from policy.train import train

    data, _ = write_fractal(tmp_path / "data", n_episodes=3, n_steps=4)
    res = train(_cfg(), data, tmp_path / "run", progress=False)
    assert res.steps == 2 and np.isfinite(res.final_loss)

    runner = PolicyRunner.load(res.policy_dir)
    assert len(runner.action_names) == 11  # world_vector(3) rotation_delta(3) gripper(1) terminate(1) base(3)
    with pytest.raises(ObservationError, match="embedding: expected 1 float arrays of shape \\(512,\\)"):
        runner.reset("pick object 0")
    runner.reset("pick object 0", embedding=np.zeros(512, np.float32))
    image = np.zeros(runner.spec.image_shape, np.uint8)
    action = runner.step({runner.spec.camera_key: image})
    assert action.shape == (11,) and np.isfinite(action).all()


def test_embedding_source_needs_a_dataset_with_embeddings(tmp_path):
    from policy.config import ConfigError
    from policy.train import train
    from tests.helpers import write_dataset

    data, _ = write_dataset(tmp_path / "data", [4, 4], ["pick the red cube", "push the blue cube"])
    with pytest.raises(ConfigError, match="model.language.source: 'embedding' expects every dataset to ship"):
        train(_cfg("model.image.image_size=16"), data, tmp_path / "run", progress=False)
