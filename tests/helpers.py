"""Shared test helpers (no tests here): the repository paths, small real RLDS datasets written to tmp
dirs, a fractal20220817_data-shaped dataset, and FiLM weights for checks. Heavy imports stay inside
the functions: conftest imports this module for every test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from dm_env import specs

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT.parent / "shared" / "fixtures" / "rlds" / "bridge_dataset" / "1.0.0"

OBS_SPEC = {
    "image": specs.BoundedArray((16, 16, 3), np.uint8, 0, 255, name="image"),
    "state": specs.Array((4,), np.float32, name="state"),
    "instruction": specs.StringArray((), name="instruction"),
}
ACT_SPEC = specs.BoundedArray((5,), np.float32, [-1, -1, -1, -1, 0], [1, 1, 1, 1, 1], name="action")


def make_episode(rng, n_actions: int, instruction: str, seed: int, obs_keys=("image", "state", "instruction")):
    from datasets.rlds_writer import Episode  # TensorFlow: imported only by the tests that write data

    img, state, instr = obs_keys
    obs = [{img: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
            state: rng.normal(size=4).astype(np.float32),
            instr: np.array(instruction, dtype=object)} for _ in range(n_actions + 1)]
    acts = [rng.uniform(-1, 1, 5).astype(np.float32) for _ in range(n_actions)]
    return Episode(obs, acts, [0.0] * n_actions, [1.0] * n_actions, True,
                   {"task": "reach", "instruction": instruction, "seed": seed, "success": True,
                    "env": "tabletop", "env_version": "1"})


def write_dataset(out: Path, lengths, instructions, seed: int = 0, episodes_per_shard: int = 100,
                  env: str = "tabletop", obs_keys=("image", "state", "instruction")):
    rng = np.random.default_rng(seed)
    eps = [make_episode(rng, n, instructions[i % len(instructions)], i, obs_keys) for i, n in enumerate(lengths)]
    spec = dict(zip(obs_keys, OBS_SPEC.values()))
    sidecar = {"env": env, "action_names": list("abcde")} if env else {}
    from datasets.rlds_writer import write_episodes

    path = write_episodes(out, eps, spec, ACT_SPEC, sidecar, episodes_per_shard=episodes_per_shard)
    return path, eps


FRACTAL_FIELDS = {"world_vector": 3, "rotation_delta": 3, "gripper_closedness_action": 1,
                  "base_displacement_vector": 2, "base_displacement_vertical_rotation": 1}


def write_fractal(root, n_episodes=3, n_steps=4, seed=0):
    """A small dataset with exactly fractal20220817_data's schema, written by rlds' EpisodeWriter."""
    import tensorflow_datasets as tfds
    from rlds.tfds import episode_writer

    obs = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(256, 320, 3), encoding_format="jpeg"),
        "natural_language_instruction": tfds.features.Text(),
        "natural_language_embedding": tfds.features.Tensor(shape=(512,), dtype=np.float32),
        "base_pose_tool_reached": tfds.features.Tensor(shape=(7,), dtype=np.float32),
        "gripper_closed": tfds.features.Tensor(shape=(1,), dtype=np.float32),
    })
    action = tfds.features.FeaturesDict({
        **{k: tfds.features.Tensor(shape=(n,), dtype=np.float32) for k, n in FRACTAL_FIELDS.items()},
        "terminate_episode": tfds.features.Tensor(shape=(3,), dtype=np.int32)})
    cfg = episode_writer.DatasetConfig(name="fractal20220817_data", observation_info=obs, action_info=action,
                                       reward_info=tfds.features.Scalar(dtype=np.float32),
                                       discount_info=tfds.features.Scalar(dtype=np.float32))
    out = root / "fractal20220817_data" / "0.1.0"
    out.mkdir(parents=True)
    writer = episode_writer.EpisodeWriter(data_directory=str(out), ds_config=cfg, max_episodes_per_file=2,
                                          version="0.1.0")
    rng = np.random.default_rng(seed)
    written = []
    for e in range(n_episodes):
        steps, acts = [], []
        for t in range(n_steps):
            a = {k: rng.uniform(-1, 1, n).astype(np.float32) for k, n in FRACTAL_FIELDS.items()}
            a["terminate_episode"] = np.eye(3, dtype=np.int32)[2 if t == n_steps - 1 else 1]
            acts.append(a)
            steps.append({"observation": {"image": rng.integers(0, 255, (256, 320, 3), dtype=np.uint8),
                                          "natural_language_instruction": f"pick object {e}",
                                          "natural_language_embedding": np.full(512, e, np.float32),
                                          "base_pose_tool_reached": np.zeros(7, np.float32),
                                          "gripper_closed": np.zeros(1, np.float32)},
                          "action": a, "reward": np.float32(0), "discount": np.float32(1),
                          "is_first": t == 0, "is_last": False, "is_terminal": False})
        writer.add_episode({"steps": steps})
        written.append(acts)
    writer.close()
    return out, written


def randomise_film(model) -> None:
    """FiLM starts as the identity (no gradient to the text encoder); give it weights for checks."""
    import torch

    from policy.film import FiLM

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FiLM):
                for lin in (m.gamma, m.beta):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
