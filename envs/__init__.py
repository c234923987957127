"""Simulation environments behind one registry: the MuJoCo tabletop suite and Meta-World MT10 / MT50.

Every env is a `dm_env.Environment` with the same observation (image, state, instruction) and action
([dx, dy, dz, gripper, terminate]) layout; `make_gym` / `make_vec` give the gymnasium views.
"""

from __future__ import annotations

import os

# Headless rendering by default; must be set before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

from functools import partial  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import gymnasium  # noqa: E402

from common.action_interface import ACTION_NAMES, action_interface  # noqa: E402

from envs.gym_wrapper import DmEnvGymWrapper, TabletopGymEnv  # noqa: E402
from envs.tabletop import TabletopEnv  # noqa: E402
from envs.tasks import TASKS  # noqa: E402

ENV_NAMES: tuple[str, ...] = ("tabletop", "metaworld-mt10", "metaworld-mt50")
_FAMILY = {"tabletop": "tabletop", "metaworld-mt10": "metaworld", "metaworld-mt50": "metaworld"}
_BENCHMARK = {"metaworld-mt10": "MT10", "metaworld-mt50": "MT50"}
DEFAULT_CAMERAS = {"tabletop": "front", "metaworld": "corner2"}
# The tabletop state spec is unbounded; the gripper stays within a metre of the table centre, opening in [0, 1].
TABLETOP_STATE_BOUNDS = ([-1, -1, -1, 0], [1, 1, 1, 1])


def _check_name(name: str) -> None:
    if name not in ENV_NAMES:
        raise ValueError(f"name must be one of {list(ENV_NAMES)}, got {name!r}")


def env_family(name: str) -> str:
    """'tabletop' or 'metaworld': which simulator (and expert family) an env name uses."""
    _check_name(name)
    return _FAMILY[name]


def default_camera(name: str) -> str:
    return DEFAULT_CAMERAS[env_family(name)]


def action_names(name: str) -> tuple[str, ...]:
    """Names of the env's action dimensions (common.action_interface; the same 5 for every env)."""
    return action_interface(env_family(name)).names


def memory_facts(name: str, task: str) -> dict[str, Any]:
    """What the memory benchmark states about a task (envs/memory_tasks.py): `chance` (success without
    memory) for a memory task, `control_of` for a control; {} for every other task."""
    if env_family(name) != "tabletop" or task not in TASKS:
        return {}
    t = TASKS[task]
    return {k: v for k, v in (("chance", t.chance), ("control_of", t.control_of)) if v is not None}


def list_tasks(name: str = "tabletop") -> dict[str, list[str]]:
    """Task name -> instructions (tabletop: templates with slots such as {obj}, {pad}, {direction}; memory tasks
    name no answer; Meta-World: sentences)."""
    if env_family(name) == "tabletop":
        return {t.name: list(t.templates) for t in TASKS.values()}
    from envs.metaworld_env import INSTRUCTIONS, benchmark_tasks

    return {t: list(INSTRUCTIONS[t]) for t in benchmark_tasks(_BENCHMARK[name])}


def parse_tasks(name: str, spec: str) -> list[str]:
    """A --tasks value: 'all' or a comma list of the env's tasks -> the task names, checked."""
    known = list(list_tasks(name))
    if spec == "all":
        return known
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown} for env {name!r}; expected 'all' or a comma list of {known}")
    return tasks


def _check_task(name: str, task: str) -> str:
    known = list_tasks(name)
    if env_family(name) == "metaworld" and isinstance(task, str):
        task = task.removesuffix("-v3")  # Meta-World's own spelling is accepted too
    if task not in known:
        raise ValueError(f"task must be one of {sorted(known)} for env {name!r}, got {task!r}")
    return task


def make(
    name: str, task: str, image_size: int = 64, camera: str | None = None, seed: int | None = None, **kwargs: Any
) -> Any:
    """A dm_env environment (TabletopEnv or MetaWorldEnv; Meta-World is imported lazily, it is slow).

    camera=None is the env's default (tabletop "front", Meta-World "corner2");
    kwargs go to the env (max_steps, end_on_success, render; Meta-World also goals="benchmark"|"random")."""
    task = _check_task(name, task)
    camera = default_camera(name) if camera is None else camera
    if env_family(name) == "tabletop":
        return TabletopEnv(task, image_size=image_size, camera=camera, seed=seed, **kwargs)
    from envs.metaworld_env import MetaWorldEnv

    return MetaWorldEnv(task, benchmark=_BENCHMARK[name], image_size=image_size, camera=camera, seed=seed, **kwargs)


def make_gym(
    name: str, task: str, image_size: int = 64, camera: str | None = None, seed: int | None = None, **kwargs: Any
) -> DmEnvGymWrapper:
    """The same environment behind the gymnasium API (render_mode "rgb_array")."""
    env = make(name, task, image_size=image_size, camera=camera, seed=seed, **kwargs)
    return DmEnvGymWrapper(env, bounds={"state": TABLETOP_STATE_BOUNDS} if env_family(name) == "tabletop" else None)


def make_expert(env: Any, noise: float = 0.0, seed: int | None = None) -> Any:
    """The scripted expert for `env` (a tabletop or Meta-World env from `make`): act(timestep) -> action."""
    from envs.metaworld_env import MetaWorldEnv, MetaWorldExpert

    if isinstance(env, MetaWorldEnv):
        return MetaWorldExpert(env, noise=noise, seed=seed)
    if isinstance(env, TabletopEnv):
        from envs.experts import make_expert as tabletop_expert

        return tabletop_expert(env, noise=noise, seed=seed)
    raise TypeError(f"env must be a TabletopEnv or MetaWorldEnv from envs.make, got {type(env).__name__}")


def make_vec(
    name: str,
    tasks: str | Sequence[str],
    n: int,
    image_size: int = 64,
    camera: str | None = None,
    seed: int = 0,
    asynchronous: bool = True,
    **kwargs: Any,
) -> gymnasium.vector.VectorEnv:
    """`n` gymnasium envs for parallel evaluation; env i runs tasks[i % len(tasks)] with env seed seed + i.

    asynchronous=True: one spawned worker process per env (AsyncVectorEnv); False: all in this process.
    Observations are batched per key; instructions come back as a tuple of strings.
    """
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise ValueError("tasks must name at least one task, got an empty list")
    task_list = [_check_task(name, t) for t in task_list]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (number of envs), got {n!r}")
    fns = [
        partial(make_gym, name, task_list[i % len(task_list)], image_size=image_size, camera=camera, seed=seed + i,
                **kwargs)
        for i in range(n)
    ]
    if asynchronous:
        # Spawned, not forked: the parent may hold TensorFlow/EGL state. Text spaces need no shared memory.
        return gymnasium.vector.AsyncVectorEnv(fns, shared_memory=False, context="spawn")
    return gymnasium.vector.SyncVectorEnv(fns)


__all__ = [
    "ACTION_NAMES",
    "DEFAULT_CAMERAS",
    "ENV_NAMES",
    "DmEnvGymWrapper",
    "TabletopEnv",
    "TabletopGymEnv",
    "action_names",
    "default_camera",
    "env_family",
    "list_tasks",
    "make",
    "make_expert",
    "make_gym",
    "make_vec",
    "parse_tasks",
]
