"""Collection into RLDS and back, re-run behaviour, and bad datasets named by dataset, file and field."""
import json
import os

import numpy as np
import pytest

from common.seeds import demo_seed, eval_seed
from datasets.collect import EpisodeRequest, collect, iter_episodes
from datasets.rlds_dataset import RLDSDataset
from datasets.sequences import SequenceSpec, make_sequences
from datasets.source import DatasetError
from datasets.rlds_writer import write_episodes
from tests.helpers import write_dataset


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

    # A kill between commit's two renames leaves the old dataset only as a hidden .old-* copy: the next run
    # puts it back instead of losing it.
    os.replace(out, tmp_path / ".demos.old-deadbeef")
    with pytest.raises(FileExistsError, match="already holds a complete dataset"):
        collect("tabletop", ["reach"], 1, out, image_size=32, workers=1, progress=False)
    assert RLDSDataset(out).num_episodes == 1 and not list(tmp_path.glob(".demos.old-*"))

    # --overwrite replaces a dataset, never a directory of other files.
    other = tmp_path / "mine"
    (other / "notes").mkdir(parents=True)
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        collect("tabletop", ["reach"], 1, other, image_size=32, workers=1, progress=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me" and (other / "notes").is_dir()


def test_demonstration_seeds_never_meet_each_other_or_evaluation_seeds(tmp_path):
    blocks = {s: {demo_seed(s, ti, i) for ti in (0, 1, 99) for i in (0, 1, 9_999)} for s in (0, 1, 2, 1000)}
    assert all(not (blocks[a] & blocks[b]) for a in blocks for b in blocks if a < b)
    evals = [eval_seed(0, 0, 0), eval_seed(9_999, 99, 999)]
    assert all(x < min(evals) or x > max(evals) for b in blocks.values() for x in b)
    assert max(blocks[1000]) < 2**31 and demo_seed(0, 3, 7) == 30_007  # --seed 0 seeds are unchanged
    for bad, match in [((-1, 0, 0), "--seed: expected an integer in"), ((1001, 0, 0), "--seed"),
                       ((0, 0, 10_000), "--episodes-per-task: expected at most 10000"),
                       ((0, 100, 0), "--tasks: expected at most 100")]:
        with pytest.raises(ValueError, match=match):
            demo_seed(*bad)
    with pytest.raises(ValueError, match="--seed: expected an integer < 10000"):
        from rollout.evaluate import evaluate
        evaluate(tmp_path / "missing", seed=10_000)
    res = collect("tabletop", ["reach"], 1, tmp_path / "s1", seed=1, image_size=32, workers=1, progress=False)
    assert res.episodes_written == 1
    assert int(next(iter(RLDSDataset(res.path).episodes()))["seed"]) == demo_seed(1, 0, 0)


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
