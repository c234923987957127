"""Standardisation registry: built-in entries, users' YAML entries, real datasets read through them."""
import json
import math

import numpy as np
import pytest

from datasets.rlds_dataset import RLDSDataset
from datasets.standardize import BUILTIN, StandardizationError, entry_from_dict, load_registry
from datasets.tf_setup import tfds
from tests.helpers import write_dataset, write_fractal


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTM_POLICY_CACHE", str(tmp_path / "cache"))  # never write beside shared fixtures


def test_builtin_entries_are_valid():
    reg = load_registry()
    assert {"tabletop", "metaworld", "bridge", "fractal20220817_data", "language_table"} <= set(reg)
    frac = reg["fractal20220817_data"]
    assert len(frac.flat_action_names()) == 11 and frac.flat_action_names()[0] == "terminate_episode"
    lo, hi = frac.flat_action_bounds()
    assert lo[0] == 0 and hi[0] == 2 and math.isclose(hi[4], math.pi / 2)


def test_unknown_key_names_entry_and_key():
    with pytest.raises(StandardizationError, match=r"entry 'my_robot': unknown key 'camera'"):
        entry_from_dict("my_robot", {"camera": "observation/image", "instruction": "x"})
    with pytest.raises(StandardizationError, match=r"entry 'r2', key action_fields\[0\]: unknown key 'min'"):
        entry_from_dict("r2", {"cameras": ["image"], "instruction": "x", "action_fields": [{"key": "a", "size": 1, "min": 0}]})
    with pytest.raises(StandardizationError, match=r"entry 'r3': missing key 'instruction'"):
        entry_from_dict("r3", {"cameras": ["image"]})
    with pytest.raises(StandardizationError, match=r"entry 'r4', key 'action_names': expected 2 names"):
        entry_from_dict("r4", {"cameras": ["i"], "instruction": "x", "action_names": ["a"], "action_low": [0, 0],
                               "action_high": [1, 1]})


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path, _ = write_dataset(tmp_path / "ds", [3], ["touch the red block"])
    f = tmp_path / "entries.yaml"
    f.write_text("my_robot:\n  cameras: [observation/image]\n  instruction: observation/instruction\n  proprioo: x\n")
    with pytest.raises(StandardizationError, match=r"entry 'my_robot': unknown key 'proprioo'"):
        RLDSDataset(path, standardization=str(f))


def test_user_yaml_entry_reads_renamed_keys(tmp_path):
    keys = ("front_cam", "joints", "task_text")
    path, eps = write_dataset(tmp_path / "ds", [4, 6], ["stack the cups"], env="", obs_keys=keys)
    f = tmp_path / "entries.yaml"
    f.write_text("my_robot:\n  cameras: [observation/front_cam]\n  instruction: observation/task_text\n"
                 "  proprio: observation/joints\n  action: action\n  action_names: [x, y, z, grip, stop]\n")
    ds = RLDSDataset(path, standardization=str(f))
    assert ds.entry.name == "my_robot" and ds.camera == "observation/front_cam" and ds.proprio_dim == 4
    assert ds.action_names == ["x", "y", "z", "grip", "stop"] and ds.instructions == ["stack the cups"]
    assert ds.scan()["num_transitions"] == 10


def test_auto_picks_our_entry_from_the_sidecar(tmp_path):
    path, _ = write_dataset(tmp_path / "ds", [3], ["touch the red block"], env="metaworld-mt10")
    assert RLDSDataset(path).entry.name == "metaworld"
    with pytest.raises(StandardizationError, match=r"unknown entry 'nope'.*known: \["):
        RLDSDataset(path, standardization="nope")


def test_bridge_fixture_reads_through_its_entry(bridge_dir):
    ds = RLDSDataset(bridge_dir)  # "auto": by the TFDS name bridge_dataset
    assert ds.entry.name == "bridge" and ds.camera == "observation/image_0"
    assert ds.image_shape == (64, 64, 3) and ds.action_dim == 7 and ds.proprio_dim == 7 and ds.embedding_dim == 512
    assert ds.scan()["num_transitions"] == 250 and len(ds.instructions) == 4  # is_last is never set
    assert not (bridge_dir / f"scan-train-{ds._cache_digest()}.json").exists()  # read-only: user cache
    wrist = RLDSDataset(bridge_dir, camera="image_1", split="val")
    assert wrist.camera == "observation/image_1" and wrist.num_episodes == 25


def test_fractal_schema_reads_through_its_entry(tmp_path):
    path, written = write_fractal(tmp_path)
    ds = RLDSDataset(path)
    assert ds.entry.name == "fractal20220817_data" and ds.image_shape == (256, 320, 3)
    assert ds.action_dim == 11 and ds.embedding_dim == 512 and ds.proprio_dim == 0
    assert ds.action_names[:5] == ["terminate_episode", "world_vector_0", "world_vector_1", "world_vector_2",
                                   "rotation_delta_0"]
    assert ds.scan()["num_transitions"] == 12  # is_last never set: all steps kept
    eps = list(ds.episode_tensors(decode_images=False).as_numpy_iterator())
    assert [e["instruction"][0].decode() for e in eps] == ["pick object 0", "pick object 1", "pick object 2"]
    a = written[1][3]
    expect = np.concatenate([[2.0], a["world_vector"], a["rotation_delta"], a["gripper_closedness_action"],
                             a["base_displacement_vertical_rotation"], a["base_displacement_vector"]])
    np.testing.assert_allclose(eps[1]["action"][3], expect, rtol=1e-6)  # RT-1's token order, terminate as index
    assert eps[1]["action"][0, 0] == 1.0
    np.testing.assert_array_equal(eps[2]["instruction_embedding"][0], np.full(512, 2.0))
    info = json.loads((path / "dataset_info.json").read_text())
    assert info["name"] == "fractal20220817_data"


def test_builtin_schema_keys_documented():
    for name, d in BUILTIN.items():
        entry_from_dict(name, d)  # every built-in entry passes the same validation a user's does


def test_codepoint_instructions_and_proprio_off(tmp_path):
    """language_table stores the instruction as 0-padded UTF-8 code points; an entry decodes them."""
    from dm_env import specs

    from datasets.rlds_writer import Episode, write_episodes

    text = "push the red star to the left"
    codes = np.zeros(64, np.int32)
    codes[:len(text)] = [ord(c) for c in text]
    rng = np.random.default_rng(0)
    obs = [{"rgb": rng.integers(0, 255, (12, 20, 3), dtype=np.uint8), "instruction": codes,
            "effector_translation": np.zeros(2, np.float32)} for _ in range(4)]
    ep = Episode(obs, [np.full(2, 0.01 * i, np.float32) for i in range(3)], [0.0] * 3, [1.0] * 3, False, {
        "task": "push", "instruction": text, "seed": 0, "success": True, "env": "lt", "env_version": "1"})
    spec = {"rgb": specs.Array((12, 20, 3), np.uint8, name="rgb"), "instruction": specs.Array((64,), np.int32),
            "effector_translation": specs.Array((2,), np.float32)}
    path = write_episodes(tmp_path / "lt", [ep], spec, specs.Array((2,), np.float32), {})
    f = tmp_path / "e.yaml"
    f.write_text(json.dumps({"lt": {k: v for k, v in BUILTIN["language_table"].items() if k != "match"}}))
    ds = RLDSDataset(path, standardization=str(f), use_proprio=False)
    assert ds.instructions == [text] and ds.image_shape == (12, 20, 3) and ds.proprio_dim == 0
    assert ds.action_names == ["dx", "dy"] and ds.scan()["num_transitions"] == 3
