"""Small real RLDS datasets written to tmp dirs for the data tests (helpers only; no tests here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from dm_env import specs

from datasets.rlds_writer import Episode, write_episodes

OBS_SPEC = {
    "image": specs.BoundedArray((16, 16, 3), np.uint8, 0, 255, name="image"),
    "state": specs.Array((4,), np.float32, name="state"),
    "instruction": specs.StringArray((), name="instruction"),
}
ACT_SPEC = specs.BoundedArray((5,), np.float32, [-1, -1, -1, -1, 0], [1, 1, 1, 1, 1], name="action")


def make_episode(rng, n_actions: int, instruction: str, seed: int, obs_keys=("image", "state", "instruction")) -> Episode:
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
    path = write_episodes(out, eps, spec, ACT_SPEC, sidecar, episodes_per_shard=episodes_per_shard)
    return path, eps
