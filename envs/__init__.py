"""Simulation environments: the MuJoCo tabletop suite behind dm_env and gymnasium interfaces."""

from __future__ import annotations

import os

# Headless rendering by default; must be set before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

from typing import Any  # noqa: E402

from envs.gym_wrapper import TabletopGymEnv  # noqa: E402
from envs.tabletop import TabletopEnv  # noqa: E402
from envs.tasks import TASKS  # noqa: E402

ENV_NAMES: tuple[str, ...] = ("tabletop",)
ACTION_NAMES: tuple[str, ...] = (
    "world_vector_x",
    "world_vector_y",
    "world_vector_z",
    "gripper_closedness",
    "terminate_episode",
)


def _check_name(name: str) -> None:
    if name not in ENV_NAMES:
        raise ValueError(f"name must be one of {list(ENV_NAMES)}, got {name!r}")


def make(
    name: str, task: str, image_size: int = 64, camera: str = "front", seed: int | None = None, **kwargs: Any
) -> TabletopEnv:
    """A dm_env environment; kwargs go to the env (max_steps, end_on_success, render)."""
    _check_name(name)
    return TabletopEnv(task, image_size=image_size, camera=camera, seed=seed, **kwargs)


def make_gym(
    name: str, task: str, image_size: int = 64, camera: str = "front", seed: int | None = None, **kwargs: Any
) -> TabletopGymEnv:
    """The same environment behind the gymnasium API (render_mode "rgb_array")."""
    return TabletopGymEnv(make(name, task, image_size=image_size, camera=camera, seed=seed, **kwargs))


def list_tasks(name: str = "tabletop") -> dict[str, list[str]]:
    """Task name -> instruction templates (each with a {color} slot)."""
    _check_name(name)
    return {t.name: list(t.templates) for t in TASKS.values()}


__all__ = ["ACTION_NAMES", "ENV_NAMES", "TabletopEnv", "TabletopGymEnv", "list_tasks", "make", "make_gym"]
