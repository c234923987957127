"""RLDS writing and reading with real TFDS files on disk."""
import json
import subprocess
import sys

import numpy as np
import pytest
from dm_env import specs

from datasets.rlds_dataset import RLDSDataset
from datasets.sequences import SequenceSpec, make_sequences
from datasets.source import DatasetError
from datasets.standardize import from_keys
from datasets.torch_batches import TorchBatches
from datasets.rlds_writer import AtomicRLDSWriter, Episode, write_episodes
from tests.helpers import ROOT

OBS_SPEC = {
    "image": specs.BoundedArray((16, 16, 3), np.uint8, 0, 255, name="image"),
    "state": specs.Array((4,), np.float32, name="state"),
    "instruction": specs.StringArray((), name="instruction"),
}
ACT_SPEC = specs.BoundedArray((5,), np.float32, [-1, -1, -1, -1, 0], [1, 1, 1, 1, 1], name="action")


def make_episode(rng, n_actions: int, instruction: str, seed: int) -> Episode:
    obs = [{"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
            "state": rng.normal(size=4).astype(np.float32),
            "instruction": np.array(instruction, dtype=object)} for _ in range(n_actions + 1)]
    acts = [rng.uniform(-1, 1, 5).astype(np.float32) for _ in range(n_actions)]
    return Episode(obs, acts, [0.0] * (n_actions - 1) + [1.0], [1.0] * (n_actions - 1) + [0.0], True,
                   {"task": "reach", "instruction": instruction, "seed": seed, "success": True,
                    "env": "test", "env_version": "1"})


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    eps = [make_episode(rng, n, f"touch the {c} block", i)
           for i, (n, c) in enumerate([(5, "red"), (8, "blue"), (3, "red"), (6, "green")])]
    out = write_episodes(tmp_path / "ds", eps, OBS_SPEC, ACT_SPEC, {"env": "test", "action_names": list("abcde")})
    return out, eps


def test_tfds_imports_beside_our_datasets_package():
    code = "import datasets, tensorflow_datasets as tfds; print(datasets.__file__); tfds.builder_from_directory"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert str(ROOT / "datasets") in out.stdout


def test_roundtrip_steps_stats_and_metadata(dataset):
    path, eps = dataset
    ds = RLDSDataset(path)
    assert ds.num_episodes == 4 and ds.image_shape == (16, 16, 3) and ds.proprio_dim == 4 and ds.action_dim == 5
    assert ds.instructions == ["touch the blue block", "touch the green block", "touch the red block"]
    all_actions = np.concatenate([np.stack(e.actions) for e in eps])
    stats = ds.action_stats
    np.testing.assert_allclose(stats["mean"], all_actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["max"], all_actions.max(0), rtol=1e-6)
    assert stats["count"] == len(all_actions)  # the is_last step (invalid action) is excluded
    first = next(iter(ds.episodes()))
    steps = list(first["steps"].as_numpy_iterator())
    assert steps[0]["is_first"] and steps[-1]["is_last"] and steps[-1]["is_terminal"]
    assert first["task"].numpy() == b"reach"
    # episodes come back in write order for a single shard; images are lossless (PNG)
    np.testing.assert_array_equal(steps[1]["observation"]["image"], eps[0].observations[1]["image"])
    np.testing.assert_array_equal(steps[1]["action"], eps[0].actions[1])


def test_episode_sequences_pad_at_the_end(dataset):
    path, eps = dataset
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    seq = make_sequences(ds, SequenceSpec("episode", 7, 0), ids, shuffle=False, seed=0, cache=False)
    b = next(iter(TorchBatches(seq, 4, repeat=False)))
    assert tuple(b["image"].shape) == (4, 7, 16, 16, 3) and tuple(b["action"].shape) == (4, 7, 5)
    assert b["mask"].sum(1).tolist() == [5, 7, 3, 6]  # the 8-step episode is truncated to T=7
    assert b["mask"][0].tolist() == [True] * 5 + [False] * 2
    np.testing.assert_array_equal(b["action"][0, :5].numpy(), np.stack(eps[0].actions))
    assert not b["action"][0, 5:].any()
    assert b["instruction"][0] == ids["touch the red block"]
    short = next(iter(TorchBatches(seq.skip(2), 2, repeat=False)))
    assert tuple(short["image"].shape) == (2, 6, 16, 16, 3)  # padded only to the batch's longest episode


def test_window_sequences_pad_at_the_start(dataset):
    path, eps = dataset
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    seq = list(make_sequences(ds, SequenceSpec("window", 3, 8), ids, shuffle=False, seed=0, cache=False).as_numpy_iterator())
    assert len(seq) == 5 + 8 + 3 + 6  # one window per valid step
    w0, w1, w4 = seq[0], seq[1], seq[4]
    assert w0["mask"].tolist() == [False, False, True] and w1["mask"].tolist() == [False, True, True]
    assert w4["mask"].all()
    np.testing.assert_array_equal(w4["action"], np.stack(eps[0].actions[2:5]))
    assert w0["image"].shape == (3, 8, 8, 3)  # resized inside tf.data
    batch = next(iter(TorchBatches(make_sequences(ds, SequenceSpec("window", 3, 0), ids, True, 0, True), 4)))
    assert tuple(batch["image"].shape) == (4, 3, 16, 16, 3) and batch["mask"].dtype.is_floating_point is False


def test_interrupted_write_leaves_no_dataset(tmp_path):
    rng = np.random.default_rng(1)

    def episodes():
        yield make_episode(rng, 3, "touch the red block", 0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_episodes(tmp_path / "ds", episodes(), OBS_SPEC, ACT_SPEC, {})
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []  # staging removed too


def test_writer_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("user data")
    for overwrite in (False, True):  # --overwrite replaces a dataset, never other files
        with pytest.raises(FileExistsError, match="it holds other files"):
            AtomicRLDSWriter(tmp_path / "ds", OBS_SPEC, ACT_SPEC, {}, overwrite=overwrite)
    assert (tmp_path / "ds" / "keep.txt").read_text() == "user data"


def test_not_an_rlds_directory_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        RLDSDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"missing dataset_info\.json, features\.json"):
        RLDSDataset(tmp_path / "empty")


def test_bad_key_names_available_keys(dataset):
    path, _ = dataset
    with pytest.raises(DatasetError, match=r"camera field .steps/observation/wrist.*observation/image"):
        RLDSDataset(path, camera="observation/wrist")


def test_bridge_sample_without_is_last(bridge_dir):
    keys = from_keys(camera="observation/image_0", proprio="observation/state", instruction="language_instruction")
    ds = RLDSDataset(bridge_dir, standardization=keys)
    assert ds.num_episodes == 25 and ds.image_shape == (64, 64, 3) and ds.action_dim == 7
    assert ds.scan()["num_transitions"] == 250  # is_last is never set: every step is kept
    ids = {s: i for i, s in enumerate(ds.instructions)}
    seq = next(make_sequences(ds, SequenceSpec("episode", 12, 32), ids, False, 0, False).as_numpy_iterator())
    assert seq["image"].shape == (10, 32, 32, 3) and seq["mask"].sum() == 10
