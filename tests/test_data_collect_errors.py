"""Collection into RLDS and back, re-run behaviour, and bad datasets named by dataset, file and field."""
import json

import numpy as np
import pytest

from datasets.collect import EpisodeRequest, collect, demo_seed, iter_episodes
from datasets.rlds_loader import DatasetError, RLDSDataset, SequenceSpec, make_sequences
from datasets.rlds_writer import write_episodes
from tests.test_data_helpers import write_dataset


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTM_POLICY_CACHE", str(tmp_path / "cache"))


def test_env_to_rlds_to_loader_gives_back_exact_actions_and_images(tmp_path):
    import envs

    reqs = [EpisodeRequest("tabletop", "reach", demo_seed(0, 0, i), 32, "front", 0.2) for i in range(2)]
    eps = list(iter_episodes(reqs, workers=1))
    probe = envs.make("tabletop", task="reach", image_size=32)
    path = write_episodes(tmp_path / "rt", eps, probe.observation_spec(), probe.action_spec(),
                          {"env": "tabletop", "action_names": list(envs.ACTION_NAMES)}, episodes_per_shard=1)
    probe.close()
    ds = RLDSDataset(path)
    assert ds.entry.name == "tabletop" and ds.builder.info.splits["train"].num_shards == 2
    ids = {s: i for i, s in enumerate(ds.instructions)}
    got = list(make_sequences(ds, SequenceSpec("episode", 500, 0), ids, shuffle=False, seed=0, cache=False)
               .as_numpy_iterator())
    assert len(got) == 2
    for e, g in zip(eps, got):
        n = len(e.actions)
        np.testing.assert_array_equal(g["action"], np.stack(e.actions))
        np.testing.assert_array_equal(g["image"], np.stack([o["image"] for o in e.observations[:n]]))
        np.testing.assert_array_equal(g["proprio"], np.stack([o["state"] for o in e.observations[:n]]))
        assert ds.instructions[g["instruction"]] == e.metadata["instruction"]


def test_collect_metadata_shards_and_rerun(tmp_path):
    out = tmp_path / "demos"
    res = collect("tabletop", ["reach"], 3, out, image_size=32, workers=1, progress=False, episodes_per_shard=2,
                  image_encoding="jpeg", keep_failures=True)
    assert res.episodes_written == 3
    ds = RLDSDataset(out)
    assert ds.builder.info.splits["train"].num_shards == 2 and ds.image_encoding == "jpeg"
    ep = next(iter(ds.episodes()))
    assert ep["env"].numpy() == b"tabletop" and ep["task"].numpy() == b"reach" and "success" in ep
    assert json.loads((out / "policy_stack.json").read_text())["keep_failures"] is True
    with pytest.raises(FileExistsError, match="already holds a complete dataset; pass --overwrite"):
        collect("tabletop", ["reach"], 1, out, image_size=32, workers=1, progress=False)
    res2 = collect("tabletop", ["reach"], 1, out, image_size=32, workers=1, progress=False, overwrite=True)
    assert res2.episodes_written == 1 and RLDSDataset(out).num_episodes == 1
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["demos"]  # no staging or old copy left


@pytest.fixture
def small(tmp_path):
    path, _ = write_dataset(tmp_path / "ds", [3, 4, 5, 2], ["touch the red block"], episodes_per_shard=2)
    return path


def _shards(path):
    return sorted(path.glob("*.tfrecord*"))


def test_missing_shard_is_named(small):
    victim = _shards(small)[1]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"dataset '{small}': shard file '{victim.name}' is missing"):
        RLDSDataset(small)


def test_truncated_shard_is_named(small):
    victim = _shards(small)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=rf"dataset '{small}': shard file '{victim.name}' is truncated"):
        RLDSDataset(small)


def test_dataset_without_steps_is_named(small):
    f = small / "features.json"
    f.write_text(f.read_text().replace('"steps"', '"frames"'))
    with pytest.raises(DatasetError, match=rf"dataset '{small}': file 'features.json', field 'steps': not an RLDS"):
        RLDSDataset(small)


def test_image_of_unexpected_shape_is_named_at_open(small):
    f = small / "features.json"
    spec = json.loads(f.read_text())
    img = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"][
        "featuresDict"]["features"]["image"]
    img["image"]["shape"]["dimensions"] = ["12", "12", "3"]  # the files hold 16x16 frames
    f.write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=rf"dataset '{small}': field 'steps/observation/image': a frame does not "
                                           r"have the declared shape \(12, 12, 3\)"):
        RLDSDataset(small)


def test_grey_or_variable_images_are_refused(small):
    f = small / "features.json"
    spec = json.loads(f.read_text())
    img = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"][
        "featuresDict"]["features"]["image"]
    img["image"]["shape"]["dimensions"] = ["-1", "-1", "3"]
    f.write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=r"field 'steps/observation/image' \(standardization 'tabletop'\): "
                                           r"expected RGB frames of a fixed size"):
        RLDSDataset(small)
