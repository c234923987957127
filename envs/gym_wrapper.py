"""gymnasium.Env view of a TabletopEnv (same physics, same seeding)."""

from __future__ import annotations

import string
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from envs.tabletop import TabletopEnv

INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
MAX_INSTRUCTION_LENGTH = 200


class TabletopGymEnv(gymnasium.Env):
    """terminated/truncated follow the dm_env step type and discount; info carries "success"."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, env: TabletopEnv, render_mode: str | None = "rgb_array"):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.env = env
        self.render_mode = render_mode
        n = env.image_size
        spec = env.action_spec()
        self.action_space = spaces.Box(spec.minimum, spec.maximum, (5,), np.float32)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (n, n, 3), np.uint8),
                # Gripper xyz stays within a metre of the table centre; opening is in [0, 1].
                "state": spaces.Box(
                    np.array([-1, -1, -1, 0], np.float32), np.array([1, 1, 1, 1], np.float32), (4,), np.float32
                ),
                "instruction": spaces.Text(MAX_INSTRUCTION_LENGTH, charset=INSTRUCTION_CHARSET),
            }
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        # Unseeded resets draw the episode seed from gymnasium's RNG, so reset(seed=s) then reset()
        # replays the same sequence of episodes.
        episode_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        ts = self.env.reset(seed=episode_seed)
        return _convert(ts.observation), self.env.last_info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        ts = self.env.step(action)
        terminated = bool(ts.last() and ts.discount == 0.0)
        truncated = bool(ts.last() and ts.discount != 0.0)
        return _convert(ts.observation), float(ts.reward or 0.0), terminated, truncated, self.env.last_info

    def render(self) -> np.ndarray | None:
        return None if self.render_mode is None else self.env.render()

    def close(self) -> None:
        self.env.close()


def _convert(obs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"image": obs["image"], "state": obs["state"], "instruction": str(obs["instruction"].item())}
