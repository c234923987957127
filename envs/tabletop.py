"""Language-conditioned MuJoCo tabletop environment with a dm_env interface."""

from __future__ import annotations

import time
from typing import Any

import dm_env
import mujoco
import numpy as np
from dm_env import specs

from envs.scene import (
    BLOCK_HALF,
    COLORS,
    FINGER_OPEN,
    MAX_DELTA,
    SUBSTEPS,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    build_mjcf,
)
from envs.tasks import TASKS, Task

CAMERAS = ("front", "wrist")
ACTION_MIN = np.array([-1, -1, -1, -1, 0], dtype=np.float32)
ACTION_MAX = np.ones(5, dtype=np.float32)

# Where blocks and the tray may start (centre xy), and how far apart: far enough that the open
# fingers never touch a neighbour while grasping.
LAYOUT_LOW = np.array([-0.2, -0.12])
LAYOUT_HIGH = np.array([0.2, 0.16])
BLOCK_GAP = 0.10
TRAY_GAP = 0.16
MAX_YAW = 0.3  # blocks start roughly square to the fingers


class TabletopEnv(dm_env.Environment):
    """A floating parallel-jaw gripper, three coloured blocks and a tray; one task per env.

    Reward is sparse: 1.0 on the final step of a successful episode, else 0.
    """

    def __init__(
        self,
        task: str,
        image_size: int = 64,
        camera: str = "front",
        seed: int | None = None,
        max_steps: int = 60,
        end_on_success: bool = True,
        render: bool = True,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self._task = TASKS[task]
        self.image_size = image_size
        self.camera = camera
        self.max_steps = max_steps
        self.end_on_success = end_on_success
        self._rng = np.random.default_rng(seed)

        self.model = mujoco.MjModel.from_xml_string(build_mjcf())
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._gripper_body = m.body("gripper").id
        self._gripper_qpos = m.joint("gripper").qposadr[0]
        self._mocap = m.body_mocapid[m.body("gripper_target").id]
        self._tray_mocap = m.body_mocapid[m.body("tray").id]
        self._finger_qpos = [m.joint(f"finger_{s}").qposadr[0] for s in ("left", "right")]
        self._finger_geoms = {m.geom(f"finger_{s}").id for s in ("left", "right")}
        self._block_qpos = {c: m.joint(f"block_{c}").qposadr[0] for c in COLORS}
        self._block_geom = {c: m.geom(f"block_{c}").id for c in COLORS}

        self._renderer = _make_renderer(m, image_size) if render else None
        self._blank = np.zeros((image_size, image_size, 3), np.uint8)

        self._episode_seed = 0
        self._target = COLORS[0]
        self._instruction = ""
        self._block_start: dict[str, np.ndarray] = {}
        self._step_count = 0
        self._needs_reset = True
        self._last_info: dict[str, Any] = {}

    # ---- dm_env API -------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> dm_env.TimeStep:
        """Start an episode; the whole episode is a function of `seed` (drawn from the env RNG if None)."""
        self._episode_seed = int(self._rng.integers(2**31)) if seed is None else int(seed)
        rng = np.random.default_rng(self._episode_seed)
        target = int(rng.integers(len(COLORS)))
        self._target = COLORS[target]
        template = self._task.templates[rng.integers(len(self._task.templates))]
        self._instruction = template.format(color=self._target)
        blocks, tray = self._sample_layout(rng, target)

        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        for (c, xy) in zip(COLORS, blocks):
            yaw = rng.uniform(-MAX_YAW, MAX_YAW)
            q = self._block_qpos[c]
            d.qpos[q : q + 7] = [xy[0], xy[1], BLOCK_HALF, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
        d.mocap_pos[self._tray_mocap] = [tray[0], tray[1], 0.0]
        start = rng.uniform([-0.05, -0.14, 0.16], [0.05, -0.08, 0.20])
        d.mocap_pos[self._mocap] = start
        d.qpos[self._gripper_qpos : self._gripper_qpos + 3] = start
        d.qpos[self._finger_qpos] = FINGER_OPEN
        d.ctrl[:] = FINGER_OPEN
        mujoco.mj_forward(m, d)
        self._block_start = {c: self.block_pos(c) for c in COLORS}

        self._step_count = 0
        self._needs_reset = False
        self._last_info = self._info(self._task.success(self))
        return dm_env.restart(self._observation())

    def step(self, action: Any) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        a = _validate_action(action)
        d = self.data
        d.mocap_pos[self._mocap] = np.clip(d.mocap_pos[self._mocap] + a[:3] * MAX_DELTA, WORKSPACE_LOW, WORKSPACE_HIGH)
        d.ctrl[:] = 0.0 if a[3] > 0 else FINGER_OPEN
        mujoco.mj_step(self.model, d, nstep=SUBSTEPS)
        self._step_count += 1

        success = self._task.success(self)
        self._last_info = self._info(success)
        obs = self._observation()
        reward = 1.0 if success else 0.0
        if (success and self.end_on_success) or a[4] > 0.5:
            self._needs_reset = True
            return dm_env.termination(reward, obs)
        if self._step_count >= self.max_steps:
            self._needs_reset = True
            return dm_env.truncation(reward, obs)
        return dm_env.transition(0.0, obs)

    def observation_spec(self) -> dict[str, specs.Array]:
        n = self.image_size
        return {
            "image": specs.BoundedArray((n, n, 3), np.uint8, 0, 255, name="image"),
            "state": specs.Array((4,), np.float32, name="state"),
            "instruction": specs.StringArray((), name="instruction"),
        }

    def action_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((5,), np.float32, ACTION_MIN, ACTION_MAX, name="action")

    def close(self) -> None:
        # Explicit close: mujoco's EGL renderer otherwise raises during interpreter teardown.
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ---- episode properties -----------------------------------------------------------------

    @property
    def task(self) -> str:
        return self._task.name

    @property
    def task_spec(self) -> Task:
        return self._task

    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def target_color(self) -> str:
        return self._target

    @property
    def episode_seed(self) -> int:
        return self._episode_seed

    @property
    def success(self) -> bool:
        return bool(self._last_info.get("success", False))

    @property
    def last_info(self) -> dict[str, Any]:
        return dict(self._last_info)

    @property
    def step_count(self) -> int:
        return self._step_count

    # ---- privileged state (experts and success checks) -------------------------------------

    def gripper_pos(self) -> np.ndarray:
        """World position of the fingertip centre."""
        return self.data.xpos[self._gripper_body].copy()

    def gripper_opening(self) -> float:
        """0 = closed, 1 = fully open."""
        return float(np.clip(self.data.qpos[self._finger_qpos].mean() / FINGER_OPEN, 0.0, 1.0))

    def block_pos(self, color: str) -> np.ndarray:
        q = self._block_qpos[color]
        return self.data.qpos[q : q + 3].copy()

    def block_start_pos(self, color: str) -> np.ndarray:
        return self._block_start[color].copy()

    def tray_pos(self) -> np.ndarray:
        return self.data.mocap_pos[self._tray_mocap].copy()

    def _finger_contacts(self, color: str) -> set[int]:
        geoms = self.data.contact.geom[: self.data.ncon]
        block = self._block_geom[color]
        touching = set()
        for g1, g2 in geoms:
            if g1 == block and g2 in self._finger_geoms:
                touching.add(int(g2))
            elif g2 == block and g1 in self._finger_geoms:
                touching.add(int(g1))
        return touching

    def touching_fingers(self, color: str) -> bool:
        return bool(self._finger_contacts(color))

    def grasped(self, color: str) -> bool:
        """Both finger pads touch the block."""
        return len(self._finger_contacts(color)) == 2

    # ---- rendering --------------------------------------------------------------------------

    def render(self, camera: str | None = None) -> np.ndarray:
        """An RGB frame from `camera` (default: the observation camera)."""
        if self._renderer is None:
            raise RuntimeError("this env was created with render=False")
        camera = self.camera if camera is None else camera
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render()

    # ---- internals --------------------------------------------------------------------------

    def _observation(self) -> dict[str, np.ndarray]:
        image = self.render() if self._renderer is not None else self._blank.copy()
        state = np.append(self.gripper_pos(), self.gripper_opening()).astype(np.float32)
        return {"image": image, "state": state, "instruction": np.array(self._instruction, dtype=object)}

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "success": success,
            "task": self._task.name,
            "target_color": self._target,
            "instruction": self._instruction,
            "episode_seed": self._episode_seed,
            "step": self._step_count,
        }

    def _sample_layout(self, rng: np.random.Generator, target: int) -> tuple[np.ndarray, np.ndarray]:
        """Block and tray centres (xy), non-overlapping, satisfying the task's constraint."""
        for _ in range(10_000):
            tray = rng.uniform(LAYOUT_LOW, LAYOUT_HIGH)
            blocks: list[np.ndarray] = []
            for _ in range(100):
                xy = rng.uniform(LAYOUT_LOW, LAYOUT_HIGH)
                if np.linalg.norm(xy - tray) >= TRAY_GAP and all(np.linalg.norm(xy - b) >= BLOCK_GAP for b in blocks):
                    blocks.append(xy)
                    if len(blocks) == len(COLORS):
                        break
            if len(blocks) == len(COLORS) and self._task.layout_ok(np.array(blocks), target, tray):
                return np.array(blocks), tray
        raise RuntimeError(f"could not sample a layout for task {self._task.name!r}")


def _validate_action(action: Any) -> np.ndarray:
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (5,):
        raise ValueError(f"action must have shape (5,) = [dx, dy, dz, gripper, terminate], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action must be finite (5,) floats, got {a.tolist()}")
    return np.clip(a, ACTION_MIN, ACTION_MAX)


def _make_renderer(model: mujoco.MjModel, size: int) -> mujoco.Renderer:
    try:
        return mujoco.Renderer(model, size, size)
    except Exception as e:
        raise RuntimeError(
            "Headless MuJoCo rendering failed. Set MUJOCO_GL=egl (before mujoco is imported) and install "
            "the EGL/Mesa libraries, e.g. `apt-get install libegl1 libgl1-mesa-dri`; or use MUJOCO_GL=osmesa "
            f"with `apt-get install libosmesa6`. Or pass render=False. Original error: {e!r}"
        ) from e


def benchmark_env(task: str = "lift", steps: int = 1000, render: bool = False, image_size: int = 64) -> dict:
    """Control steps per second with random actions (episodes reset as they end)."""
    env = TabletopEnv(task, image_size=image_size, seed=0, render=render)
    try:
        rng = np.random.default_rng(0)
        actions = rng.uniform(ACTION_MIN, ACTION_MAX, size=(steps, 5)).astype(np.float32)
        actions[:, 4] = 0.0  # never terminate early, so resets stay rare
        env.reset(seed=0)
        start = time.perf_counter()
        for a in actions:
            env.step(a)
        seconds = time.perf_counter() - start
    finally:
        env.close()
    return {
        "task": task,
        "steps": steps,
        "render": render,
        "image_size": image_size,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
    }
