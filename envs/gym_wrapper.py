"""gymnasium.Env view of any of our dm_env environments (same physics, same seeding).

Spaces are derived from the dm_env specs: BoundedArray -> bounded Box, Array -> unbounded Box,
StringArray -> Text (the instruction).
"""

from __future__ import annotations

import string
from typing import Any

import dm_env
import gymnasium
import numpy as np
from dm_env import specs
from gymnasium import spaces

INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
MAX_INSTRUCTION_LENGTH = 200


class DmEnvGymWrapper(gymnasium.Env):
    """terminated/truncated follow the dm_env step type and discount; info carries "success".

    The wrapped env must offer reset(seed=), last_info and render() besides the dm_env API
    (TabletopEnv and MetaWorldEnv do).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        env: dm_env.Environment,
        render_mode: str | None = "rgb_array",
        bounds: dict[str, tuple[Any, Any]] | None = None,
    ):
        """`bounds`: {observation key: (low, high)} for keys whose dm_env spec is unbounded."""
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.env = env
        self.render_mode = render_mode
        self.action_space = spec_to_space(env.action_spec())
        bounds = bounds or {}
        self.observation_space = spaces.Dict(
            {k: spec_to_space(s, bounds.get(k)) for k, s in env.observation_spec().items()}
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


TabletopGymEnv = DmEnvGymWrapper  # the former name, kept for existing imports


def spec_to_space(spec: specs.Array, bounds: tuple[Any, Any] | None = None) -> spaces.Space:
    if isinstance(spec, specs.StringArray):
        return spaces.Text(MAX_INSTRUCTION_LENGTH, charset=INSTRUCTION_CHARSET)
    if isinstance(spec, specs.BoundedArray):
        low = np.broadcast_to(spec.minimum, spec.shape).astype(spec.dtype)
        high = np.broadcast_to(spec.maximum, spec.shape).astype(spec.dtype)
        return spaces.Box(low, high, spec.shape, spec.dtype)
    if bounds is not None:
        low, high = (np.broadcast_to(np.asarray(b, spec.dtype), spec.shape) for b in bounds)
        return spaces.Box(low, high, spec.shape, spec.dtype)
    return spaces.Box(-np.inf, np.inf, spec.shape, spec.dtype)


def _convert(obs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: (str(v.item()) if v.dtype == object else v) for k, v in obs.items()}
