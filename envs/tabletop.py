"""Language-conditioned MuJoCo tabletop environment with a dm_env interface.

A 6-joint arm with a parallel-jaw gripper is driven in end-effector space: every control step
the commanded tcp point moves by the action's displacement (clipped to the workspace), damped
least-squares IK turns it into joint targets (gripper pointing down, fixed yaw), and joint
position servos track them over SUBSTEPS physics steps.
"""

from __future__ import annotations

from typing import Any

import dm_env
import mujoco
import numpy as np
from dm_env import specs

from common.action_interface import ACTION_MAX, ACTION_MIN, ACTION_SPEC_TEXT, validate_action
from envs.ik import DampedLeastSquaresIK
from envs.render_lifetime import own_renderer
from envs.scene import (
    ARM_JOINTS,
    BLOCK_HALF,
    COLORS,
    DRAWER_KEEPOUT_HIGH,
    DRAWER_KEEPOUT_LOW,
    FINGER_OPEN,
    GO_BAR_POS,
    MAX_DELTA,
    NEUTRAL,
    OBJECTS,
    PADS,
    PAINT_RGB,
    RGB,
    SHAPES,
    SUBSTEPS,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    build_mjcf,
)
from envs.task_spec import Episode, Task, describe
from envs.tasks import TASKS

CAMERAS = ("front", "wrist")

# Where objects, pads and the tray may start (centre xy), and how far apart: far enough that the
# open fingers never touch a neighbour while grasping.
LAYOUT_LOW = np.array([-0.2, -0.12])
LAYOUT_HIGH = np.array([0.2, 0.16])
BLOCK_GAP = 0.10
TRAY_GAP = 0.16
PAD_GAP = 0.11  # pad centre to anything else
MAX_YAW = 0.3  # objects start roughly square to the fingers
GRIPPER_DOWN = np.eye(3)  # hand frame = world frame: fingers point down, slide along y
ARM_HOME = np.array([0.0, -0.9, 1.9, 0.0, -1.0, 0.0])  # elbow-up seed for the reset IK
HIDDEN = np.array([0.0, 0.0, -0.2])  # unused pads sit under the table top
# Keep-out radius around each placed thing's centre for the drawer box: tray, pad, object.
TRAY_RADIUS, PAD_RADIUS, OBJECT_RADIUS = 0.085, 0.05, 0.03


def task_names() -> list[str]:
    return list(TASKS)


def task_max_steps(task: str) -> int:
    """The task's own episode limit (used when max_steps=None)."""
    return _task(task).max_steps


def _task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


class TabletopEnv(dm_env.Environment):
    """A 6-joint arm with a gripper, two cubes, a cylinder, a tray, pads, a drawer and a cue lamp; one task per env.

    Reward is sparse: 1.0 on the final step of a successful episode, else 0.
    """

    def __init__(
        self,
        task: str,
        image_size: int = 64,
        camera: str = "front",
        seed: int | None = None,
        max_steps: int | None = None,
        end_on_success: bool = True,
        render: bool = True,
        wrist_image: bool = False,
        shadows: bool = False,
    ):
        self._task = _task(task)
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None (the task's limit), got {max_steps!r}")
        if wrist_image and not render:
            raise ValueError("wrist_image=True needs render=True")
        self.image_size = image_size
        self.camera = camera
        self.max_steps = self._task.max_steps if max_steps is None else max_steps
        self.end_on_success = end_on_success
        self.wrist_image = bool(wrist_image)
        self._rng = np.random.default_rng(seed)

        self.model = mujoco.MjModel.from_xml_string(build_mjcf())
        self.model.light_castshadow[:] = bool(shadows)
        self.data = mujoco.MjData(self.model)
        m = self.model
        self.ik = DampedLeastSquaresIK(m, "tcp", ARM_JOINTS)
        self._arm_qpos = self.ik.qpos_idx
        self._arm_ctrl = np.array([m.actuator(j).id for j in ARM_JOINTS])
        self._finger_ctrl = np.array([m.actuator(f"finger_{s}").id for s in ("left", "right")])
        self._tcp = m.site("tcp").id
        self._tray_mocap = m.body_mocapid[m.body("tray").id]
        self._pad_mocap = {p: m.body_mocapid[m.body(p).id] for p in PADS}
        self._pad_geom = {p: m.geom(p).id for p in PADS}
        self._lamp_geom = m.geom("lamp").id
        self._go_bar_geom = m.geom("go_bar").id
        self._go_bar_mocap = m.body_mocapid[m.body("go_bar").id]
        self._drawer_qpos = m.joint("drawer").qposadr[0]
        self._handle = m.site("handle").id
        self._finger_qpos = [m.joint(f"finger_{s}").qposadr[0] for s in ("left", "right")]
        self._finger_geoms = {m.geom(f"finger_{s}").id for s in ("left", "right")}
        self._obj_qpos = {s: m.joint(s).qposadr[0] for s in OBJECTS}
        self._obj_geom = {s: m.geom(s).id for s in OBJECTS}

        self._renderer = _make_renderer(m, image_size) if render else None
        self._release_renderer = own_renderer(self, self._renderer)  # freed when dropped, or at exit
        self._blank = np.zeros((image_size, image_size, 3), np.uint8)

        self._episode_seed = 0
        self._episode = Episode(target=OBJECTS[0])
        self._colors: dict[str, str] = {s: COLORS[0] for s in OBJECTS}
        self._pad_colors: dict[str, str] = {p: COLORS[0] for p in PADS}
        self._instruction = ""
        self._obj_start: dict[str, np.ndarray] = {}
        self._tcp_target = np.zeros(3)
        self._q_cmd = ARM_HOME.copy()
        self.task_state: dict[str, Any] = {}  # per-episode memory of stateful success checks, and first_grasped
        self._step_count = 0
        self._needs_reset = True
        self._last_info: dict[str, Any] = {}

    # ---- dm_env API -------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> dm_env.TimeStep:
        """Start an episode; the whole episode is a function of `seed` (drawn from the env RNG if None)."""
        self._episode_seed = int(self._rng.integers(2**31)) if seed is None else int(seed)
        rng = np.random.default_rng(self._episode_seed)
        self._colors = self._sample_colors(rng)
        pad_colors = rng.permutation(len(COLORS))[: len(PADS)]
        self._pad_colors = {p: COLORS[i] for p, i in zip(PADS, pad_colors)}
        self._episode = self._task.choose(rng, self._colors)
        template = self._task.templates[rng.integers(len(self._task.templates))]
        ep = self._episode
        self._instruction = template.format(
            obj=describe(ep.target, self._colors),
            other=describe(ep.other, self._colors) if ep.other else "",
            pad=self._pad_colors[ep.pad] if ep.pad else "",
            direction=ep.direction or "",
        )
        objects, tray, pads = self._sample_layout(rng)

        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        for s in OBJECTS:
            m.geom_rgba[self._obj_geom[s], :3] = RGB[self._colors[s]]
            yaw = rng.uniform(-MAX_YAW, MAX_YAW)
            q = self._obj_qpos[s]
            d.qpos[q : q + 7] = [objects[s][0], objects[s][1], BLOCK_HALF, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
        for p in PADS:
            m.geom_rgba[self._pad_geom[p], :3] = RGB[self._pad_colors[p]]
            d.mocap_pos[self._pad_mocap[p]] = [*pads[p], 0.0] if p in pads else HIDDEN
        d.mocap_pos[self._tray_mocap] = [tray[0], tray[1], 0.0]
        d.mocap_pos[self._go_bar_mocap] = GO_BAR_POS if self._task.go_bar else HIDDEN
        d.qpos[self._drawer_qpos] = self._task.drawer_start(rng)
        start = rng.uniform([-0.05, -0.14, 0.16], [0.05, -0.08, 0.20])
        self._tcp_target = start
        self._q_cmd = self.ik.solve(ARM_HOME, start, GRIPPER_DOWN, iterations=50)
        d.qpos[self._arm_qpos] = self._q_cmd
        d.ctrl[self._arm_ctrl] = self._q_cmd
        d.qpos[self._finger_qpos] = FINGER_OPEN
        d.ctrl[self._finger_ctrl] = FINGER_OPEN
        mujoco.mj_forward(m, d)
        self._obj_start = {s: self.object_pos(s) for s in OBJECTS}

        self.task_state = {}
        self._step_count = 0
        self._needs_reset = False
        success = self._task.success(self)
        self._update_signals()
        self._last_info = self._info(success)
        return dm_env.restart(self._observation())

    def step(self, action: Any) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        a = validate_action(action, ACTION_SPEC_TEXT)
        d = self.data
        self._tcp_target = np.clip(self._tcp_target + a[:3] * MAX_DELTA, WORKSPACE_LOW, WORKSPACE_HIGH)
        self._q_cmd = self.ik.solve(self._q_cmd, self._tcp_target, GRIPPER_DOWN)
        d.ctrl[self._arm_ctrl] = self._q_cmd
        d.ctrl[self._finger_ctrl] = 0.0 if a[3] > 0 else FINGER_OPEN
        mujoco.mj_step(self.model, d, nstep=SUBSTEPS)
        self._step_count += 1
        if "first_grasped" not in self.task_state:
            held = self._first_grasped_slot()
            if held is not None:  # for the eval record: a wrong object taken vs. the right one not placed
                self.task_state["first_grasped"] = held

        success = self._task.success(self)
        self._update_signals()
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
        spec = {
            "image": specs.BoundedArray((n, n, 3), np.uint8, 0, 255, name="image"),
            "state": specs.Array((4,), np.float32, name="state"),
            "instruction": specs.StringArray((), name="instruction"),
        }
        if self.wrist_image:
            spec["wrist_image"] = specs.BoundedArray((n, n, 3), np.uint8, 0, 255, name="wrist_image")
        return spec

    def action_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((5,), np.float32, ACTION_MIN, ACTION_MAX, name="action")

    def close(self) -> None:
        self._release_renderer()  # runs once; the finalizer then does nothing at exit
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
    def episode(self) -> Episode:
        return self._episode

    @property
    def target(self) -> str:
        """Object slot the task is about (see scene.OBJECTS)."""
        return self._episode.target

    @property
    def target_color(self) -> str:
        return self._colors[self._episode.target]

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
        return self.data.site_xpos[self._tcp].copy()

    def gripper_opening(self) -> float:
        """0 = closed, 1 = fully open."""
        return float(np.clip(self.data.qpos[self._finger_qpos].mean() / FINGER_OPEN, 0.0, 1.0))

    def arm_qpos(self) -> np.ndarray:
        return self.data.qpos[self._arm_qpos].copy()

    def joint_limits(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ik.low.copy(), self.ik.high.copy()

    def color_of(self, slot: str) -> str:
        return self._colors[slot]

    def shape_of(self, slot: str) -> str:
        return SHAPES[slot]

    def pad_color(self, pad: str) -> str:
        return self._pad_colors[pad]

    def object_pos(self, slot: str) -> np.ndarray:
        q = self._obj_qpos[slot]
        return self.data.qpos[q : q + 3].copy()

    def object_start_pos(self, slot: str) -> np.ndarray:
        return self._obj_start[slot].copy()

    def tray_pos(self) -> np.ndarray:
        return self.data.mocap_pos[self._tray_mocap].copy()

    def pad_pos(self, pad: str) -> np.ndarray:
        return self.data.mocap_pos[self._pad_mocap[pad]].copy()

    def drawer_opening(self) -> float:
        """How far the drawer is pulled out (m): 0 = closed."""
        return float(self.data.qpos[self._drawer_qpos])

    def handle_pos(self) -> np.ndarray:
        """World position of the middle of the drawer's handle bar."""
        return self.data.site_xpos[self._handle].copy()

    def lamp_rgb(self) -> np.ndarray:
        return self.model.geom_rgba[self._lamp_geom, :3].copy()

    def _finger_touches(self) -> set[tuple[int, int]]:
        """(finger pad geom, other geom) for every contact of a finger pad, in one pass over the contacts."""
        touches = set()
        for g1, g2 in self.data.contact.geom[: self.data.ncon].tolist():
            if g1 in self._finger_geoms:
                touches.add((g1, g2))
            if g2 in self._finger_geoms:
                touches.add((g2, g1))
        return touches

    def _finger_contacts(self, slot: str) -> set[int]:
        obj = self._obj_geom[slot]
        return {f for f, other in self._finger_touches() if other == obj}

    def _first_grasped_slot(self) -> str | None:
        """The first object (in OBJECTS order) that both finger pads touch, from one pass over the contacts."""
        touches = self._finger_touches()
        return next((s for s in OBJECTS if all((f, self._obj_geom[s]) in touches for f in self._finger_geoms)), None)

    def touching_fingers(self, slot: str) -> bool:
        return bool(self._finger_contacts(slot))

    def grasped(self, slot: str) -> bool:
        """Both finger pads touch the object."""
        return len(self._finger_contacts(slot)) == 2

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

    def _update_signals(self) -> None:
        """What the task shows in this step's observation: the lamp, and (memory benchmark) the paint of
        objects and pads, which then also is what color_of / pad_color / target_color report."""
        m = self.model
        m.geom_rgba[self._lamp_geom, :3] = m.geom_rgba[self._go_bar_geom, :3] = self._task.lamp(self)
        if self._task.paint is None:
            return
        shown = self._task.paint(self)
        for s in OBJECTS:
            self._colors[s] = shown.get(s, NEUTRAL)
            m.geom_rgba[self._obj_geom[s], :3] = PAINT_RGB[self._colors[s]]
        for p in PADS:
            self._pad_colors[p] = shown.get(p, NEUTRAL)
            m.geom_rgba[self._pad_geom[p], :3] = PAINT_RGB[self._pad_colors[p]]

    def _observation(self) -> dict[str, np.ndarray]:
        image = self.render() if self._renderer is not None else self._blank.copy()
        state = np.append(self.gripper_pos(), self.gripper_opening()).astype(np.float32)
        obs = {"image": image, "state": state, "instruction": np.array(self._instruction, dtype=object)}
        if self.wrist_image:
            obs["wrist_image"] = self.render("wrist")
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "success": success,
            "task": self._task.name,
            "target_color": self.target_color,
            "target_shape": SHAPES[self.target],
            "instruction": self._instruction,
            "episode_seed": self._episode_seed,
            "step": self._step_count,
        }

    def _sample_colors(self, rng: np.random.Generator) -> dict[str, str]:
        # The two cubes always differ, so "the red cube" is unambiguous; the cylinder may share a
        # cube's colour, which is what makes the shape word matter.
        a, b, c = rng.permutation(len(COLORS))[:3]
        cyl = c if self._task.distinct_colors else rng.integers(len(COLORS))
        return {"cube_a": COLORS[a], "cube_b": COLORS[b], "cylinder": COLORS[cyl]}

    def _sample_layout(
        self, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """Object, tray and pad centres (xy), non-overlapping, satisfying the task's constraint."""
        for _ in range(10_000):
            tray = rng.uniform(LAYOUT_LOW, LAYOUT_HIGH)
            if not _clear_of_drawer(tray, TRAY_RADIUS):
                continue
            placed: list[tuple[np.ndarray, float]] = [(tray, TRAY_GAP)]
            pads: dict[str, np.ndarray] = {}
            for p in PADS if self._task.uses_pads else ():
                xy = _place(rng, placed, PAD_GAP, PAD_RADIUS)
                if xy is None:
                    break
                pads[p] = xy
                placed.append((xy, PAD_GAP))
            objects: dict[str, np.ndarray] = {}
            if self._task.target_on_pad and self._episode.pad in pads:
                objects[self._episode.target] = pads[self._episode.pad].copy()  # its pad keeps the others away
            for s in OBJECTS:
                if s in objects:
                    continue
                xy = _place(rng, placed, BLOCK_GAP, OBJECT_RADIUS)
                if xy is None:
                    break
                objects[s] = xy
                placed.append((xy, BLOCK_GAP))
            if len(objects) == len(OBJECTS) and len(pads) == (len(PADS) if self._task.uses_pads else 0):
                if self._task.layout_ok(objects, tray, pads, self._episode):
                    return objects, tray, pads
        raise RuntimeError(f"could not sample a layout for task {self._task.name!r}")


def _clear_of_drawer(xy: np.ndarray, radius: float) -> bool:
    return bool(np.any(xy + radius < DRAWER_KEEPOUT_LOW) or np.any(xy - radius > DRAWER_KEEPOUT_HIGH))


def _place(
    rng: np.random.Generator, placed: list[tuple[np.ndarray, float]], gap: float, radius: float
) -> np.ndarray | None:
    for _ in range(100):
        xy = rng.uniform(LAYOUT_LOW, LAYOUT_HIGH)
        apart = all(np.linalg.norm(xy - other) >= max(gap, other_gap) for other, other_gap in placed)
        if apart and _clear_of_drawer(xy, radius):
            return xy
    return None



def _make_renderer(model: mujoco.MjModel, size: int) -> mujoco.Renderer:
    try:
        return mujoco.Renderer(model, size, size)
    except Exception as e:
        raise RuntimeError(
            "Headless MuJoCo rendering failed. Set MUJOCO_GL=egl (before mujoco is imported) and install "
            "the EGL/Mesa libraries, e.g. `apt-get install libegl1 libgl1-mesa-dri`; or use MUJOCO_GL=osmesa "
            f"with `apt-get install libosmesa6`. Or pass render=False. Original error: {e!r}"
        ) from e
