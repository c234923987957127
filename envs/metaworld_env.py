"""Meta-World MT10 / MT50 tasks as language-conditioned dm_env environments.

Same observation and action layout as the tabletop suite, so one policy, one RLDS writer and one
evaluation loop serve both:
  observation: image (uint8 HxWx3, upright), state (tcp xyz, gripper opening in [0, 1], goal xyz),
               instruction (a sentence written by us, the phrasing drawn from the episode seed)
  action:      [dx, dy, dz, gripper, terminate]; xyz in [-1, 1] (1 = 1 cm of mocap motion, Meta-World's
               action scale), gripper in [-1, 1] (> 0 closes, Meta-World's sign), terminate in [0, 1]
               (> 0.5 ends the episode). Out-of-bounds values are clipped; wrong shapes and NaN raise.

Task variants are Meta-World's benchmark train tasks (50 goals per task, drawn once by
`metaworld.MT10(seed=0)` / `MT50(seed=0)` and cached on disk): episode seed s plays goal s % 50 with
an instruction phrasing drawn from s. `goals="random"` instead draws a fresh goal from the same
distribution for every seed. Episodes last at most `max_steps` (default 200; Meta-World allows 500,
its experts finish in 50-150 steps) and end on `info["success"]` unless end_on_success=False.
"""

from __future__ import annotations

import os
import pickle
import warnings
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dm_env
import mujoco
import numpy as np
from dm_env import specs
from metaworld.policies import ENV_POLICY_MAP, SawyerDoorOpenV3Policy, SawyerPegInsertionSideV3Policy

from common.action_interface import ACTION_MAX, ACTION_MIN, validate_action
from common.atomic import atomic_output
from envs.render_lifetime import own_renderer

BENCHMARKS = ("MT10", "MT50")
BENCHMARK_SEED = 0
GOALS = ("benchmark", "random")
# "fast": no shadows, reflections or multisampling: ~10x the frame rate of "full" (Meta-World's own
# look) on a software (llvmpipe) EGL renderer, with the same geometry, colours and textures.
RENDER_QUALITIES = ("fast", "full")
MW_MAX_STEPS = 500  # Meta-World's max_path_length: stepping past it raises inside Meta-World
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
DEFAULT_CAMERA = "corner2"
# The tcp stays inside Meta-World's hand space (x in [-0.525, 0.525], y in [0.348, 1.025], z >= 0).
# state = tcp xyz, gripper opening, goal xyz. The MT benchmarks are fully observable (the goal is in
# Meta-World's own observation); reach, push and pick-place do not draw their goal in the image, so an
# image policy without it can only guess (MT10 at 64 px without the goal: 6-14% on those three).
STATE_MIN = np.array([-1, 0, -0.1, 0, -1, 0, -0.1], dtype=np.float32)
STATE_MAX = np.array([1, 1.5, 1, 1, 1, 1.5, 1], dtype=np.float32)

# Instructions we wrote, several phrasings per task; the names drop Meta-World's "-v3" suffix.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "assembly": ("put the ring on the peg", "assemble the ring onto the peg", "place the nut over the peg"),
    "basketball": ("put the ball in the hoop", "dunk the basketball", "score a basket with the ball"),
    "bin-picking": ("move the cube to the other bin", "pick the block out of the bin and put it in the other one",
                    "transfer the cube between the bins"),
    "box-close": ("close the box with its lid", "put the lid on the box", "cover the box"),
    "button-press-topdown": ("press the button from the top", "push the button down", "press down on the button"),
    "button-press-topdown-wall": ("press the button from the top behind the wall", "push down the button past the wall",
                                  "press down on the button over the wall"),
    "button-press": ("press the button", "push the button in", "press the button on the box"),
    "button-press-wall": ("press the button behind the wall", "push the button past the wall",
                          "reach around the wall and press the button"),
    "coffee-button": (
        "press the coffee machine button",
        "push the button on the coffee machine",
        "start the coffee machine",
    ),
    "coffee-pull": ("pull the mug away from the coffee machine", "take the mug out of the coffee machine",
                    "slide the cup back from the coffee machine"),
    "coffee-push": ("push the mug under the coffee machine", "slide the cup into the coffee machine",
                    "put the mug under the coffee spout"),
    "dial-turn": ("turn the dial", "rotate the dial", "spin the knob a quarter turn"),
    "disassemble": ("take the ring off the peg", "lift the nut off the peg", "disassemble the ring from the peg"),
    "door-close": ("close the door", "shut the door", "push the door closed"),
    "door-lock": ("lock the door", "turn the door lock down", "rotate the lock to lock the door"),
    "door-open": ("open the door", "pull the door open", "swing the door open"),
    "door-unlock": ("unlock the door", "turn the door lock up", "rotate the lock to unlock the door"),
    "hand-insert": ("put your hand in the hole", "insert the gripper into the hole", "reach into the hole"),
    "drawer-close": ("close the drawer", "push the drawer shut", "slide the drawer closed"),
    "drawer-open": ("open the drawer", "pull the drawer open", "slide the drawer out"),
    "faucet-open": ("open the faucet", "turn on the tap", "rotate the faucet handle to open it"),
    "faucet-close": ("close the faucet", "turn off the tap", "rotate the faucet handle to close it"),
    "hammer": ("hammer the nail in", "hit the nail with the hammer", "use the hammer to drive in the nail"),
    "handle-press-side": ("press the handle down from the side", "push the side handle down",
                          "press down on the handle from the side"),
    "handle-press": ("press the handle down", "push the handle down", "press down on the handle"),
    "handle-pull-side": ("pull the handle up from the side", "lift the side handle", "raise the handle from the side"),
    "handle-pull": ("pull the handle up", "lift the handle", "raise the handle"),
    "lever-pull": ("pull the lever up", "lift the lever", "raise the lever"),
    "pick-place-wall": ("pick up the puck and place it behind the wall", "move the puck over the wall to the goal",
                        "put the puck on the target past the wall"),
    "pick-out-of-hole": (
        "pick the peg out of the hole",
        "pull the peg up out of the hole",
        "take the peg out of the hole",
    ),
    "pick-place": ("pick up the puck and place it at the goal", "move the puck to the target",
                   "put the puck on the goal spot"),
    "plate-slide": ("slide the plate into the goal", "push the plate into the net", "slide the puck into the goal"),
    "plate-slide-side": ("slide the plate sideways into the goal", "push the plate into the net from the side",
                         "slide the puck sideways into the goal"),
    "plate-slide-back": ("slide the plate back out of the goal", "pull the plate back out of the net",
                         "get the puck back out of the goal"),
    "plate-slide-back-side": ("slide the plate back out of the goal sideways", "pull the plate sideways out of the net",
                              "get the puck out of the goal from the side"),
    "peg-insert-side": ("insert the peg into the hole from the side", "push the peg sideways into the hole",
                        "put the peg in the hole"),
    "peg-unplug-side": ("unplug the peg", "pull the peg out sideways", "remove the peg from the socket"),
    "soccer": ("kick the ball into the goal", "push the soccer ball into the net", "score a goal with the ball"),
    "stick-push": ("use the stick to push the thermos", "grab the stick and push the bottle with it",
                   "push the thermos with the stick"),
    "stick-pull": ("use the stick to pull the thermos", "grab the stick and pull the bottle with it",
                   "pull the thermos with the stick"),
    "push": ("push the puck to the goal", "slide the puck to the target", "push the puck onto the goal spot"),
    "push-wall": ("push the puck around the wall to the goal", "slide the puck past the wall to the target",
                  "push the puck to the goal behind the wall"),
    "push-back": (
        "push the puck back to the goal",
        "slide the puck backwards to the target",
        "pull the puck back to the goal",
    ),
    "reach": ("reach the goal", "move your hand to the target", "touch the goal position"),
    "reach-wall": ("reach the goal behind the wall", "move your hand over the wall to the target",
                   "reach past the wall to the goal"),
    "shelf-place": ("put the block on the shelf", "place the cube on the shelf", "pick up the block and shelve it"),
    "sweep-into": ("sweep the puck into the hole", "push the puck into the hole", "slide the block into the hole"),
    "sweep": (
        "sweep the puck off the table",
        "push the puck off the edge of the table",
        "sweep the block off the table",
    ),
    "window-open": ("open the window", "slide the window open", "push the window open"),
    "window-close": ("close the window", "slide the window closed", "push the window shut"),
}


def mw_name(task: str) -> str:
    return f"{task}-v3"


@lru_cache(maxsize=None)
def benchmark_tasks(benchmark: str) -> tuple[str, ...]:
    """The task names (our spelling) of MT10 or MT50, in Meta-World's order."""
    import metaworld.env_dict as ed

    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")
    classes = ed.MT10_V3 if benchmark == "MT10" else ed.MT50_V3
    return tuple(name.removesuffix("-v3") for name in classes)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ttm_policy" / "metaworld"


@lru_cache(maxsize=None)
def benchmark_goals(benchmark: str) -> dict[str, np.ndarray]:
    """Task -> (50, k) goal vectors of the benchmark's train tasks.

    Building MT50 resets every env 50 times (~30 s on one core), so the vectors are cached on disk,
    keyed by Meta-World version and benchmark seed; they are a pure function of both.
    """
    benchmark_tasks(benchmark)  # validates the name
    path = _cache_dir() / f"{benchmark}-seed{BENCHMARK_SEED}-metaworld{version('metaworld')}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    import metaworld

    bench = getattr(metaworld, benchmark)(seed=BENCHMARK_SEED)
    goals: dict[str, list[np.ndarray]] = {}
    for t in bench.train_tasks:
        goals.setdefault(t.env_name.removesuffix("-v3"), []).append(pickle.loads(t.data)["rand_vec"])
    out = {k: np.stack(v) for k, v in goals.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # parallel workers may race here: each renames a whole file
        with open(tmp, "wb") as f:
            np.savez(f, **out)
    return out


def _mw_class(task: str) -> type:
    import metaworld.env_dict as ed

    return ed.ALL_V3_ENVIRONMENTS[mw_name(task)]


class MetaWorldEnv(dm_env.Environment):
    """One Meta-World task; reward is sparse (1.0 on the final step of a successful episode)."""

    VERSION = "1"

    def __init__(
        self,
        task: str,
        benchmark: str = "MT10",
        image_size: int = 64,
        camera: str | None = None,
        seed: int | None = None,
        max_steps: int = 200,
        end_on_success: bool = True,
        render: bool = True,
        goals: str = "benchmark",
        render_quality: str = "fast",
    ):
        known = benchmark_tasks(benchmark)
        task = task.removesuffix("-v3") if isinstance(task, str) else task
        if task not in known:
            raise ValueError(f"task must be one of {sorted(known)} (Meta-World {benchmark}), got {task!r}")
        camera = DEFAULT_CAMERA if camera is None else camera
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(max_steps, int) or not 1 <= max_steps <= MW_MAX_STEPS:
            raise ValueError(f"max_steps must be an int in [1, {MW_MAX_STEPS}] (Meta-World's limit), got {max_steps!r}")
        if goals not in GOALS:
            raise ValueError(f"goals must be one of {list(GOALS)}, got {goals!r}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"render_quality must be one of {list(RENDER_QUALITIES)}, got {render_quality!r}")
        self._task = task
        self.benchmark = benchmark
        self.image_size = image_size
        self.camera = camera
        self.max_steps = max_steps
        self.end_on_success = end_on_success
        self.goals = goals
        self.render_quality = render_quality
        self._rng = np.random.default_rng(seed)
        self._goal_vecs = benchmark_goals(benchmark)[task] if goals == "benchmark" else None

        self.mw = _mw_class(task)()  # render_mode None: we render ourselves, at our size
        # Fully observable like Meta-World's MT benchmarks: the goal is in the flat obs, the experts read it.
        self.mw._partially_observable = False
        self.mw.__dict__.pop("sawyer_observation_space", None)  # cached with zero goal bounds: recompute
        self.mw._set_task_called = True
        self.model, self.data = self.mw.model, self.mw.data
        self._cam_id = {c: mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, c) for c in CAMERAS}
        # Decided once from the initial pose, so a camera never flips orientation mid-episode.
        self._rotate = {c: bool(self.data.cam_xmat[i].reshape(3, 3)[2, 1] < 0) for c, i in self._cam_id.items()}
        self._renderer = _make_renderer(self.model, image_size, render_quality) if render else None
        self._release_renderer = own_renderer(self, self._renderer)  # freed when dropped, or at exit
        self._blank = np.zeros((image_size, image_size, 3), np.uint8)

        self._episode_seed = 0
        self._variant = 0
        self._instruction = ""
        self._raw_obs = np.zeros(39)
        self._step_count = 0
        self._needs_reset = True
        self._last_info: dict[str, Any] = {}

    # ---- dm_env API -------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> dm_env.TimeStep:
        """Start an episode; the whole episode is a function of `seed` (drawn from the env RNG if None)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self._episode_seed = int(self._rng.integers(2**31)) if seed is None else int(seed)
        rng = np.random.default_rng(self._episode_seed)
        phrasings = INSTRUCTIONS[self._task]
        self._instruction = phrasings[int(rng.integers(len(phrasings)))]
        mw = self.mw
        if self._goal_vecs is not None:
            self._variant = self._episode_seed % len(self._goal_vecs)
            mw._freeze_rand_vec, mw._last_rand_vec = True, self._goal_vecs[self._variant].copy()
        else:
            self._variant = -1
            mw._freeze_rand_vec, mw.seeded_rand_vec = False, True
        mw.seed(self._episode_seed % 2**32)
        self._raw_obs, _ = mw.reset()
        self._step_count = 0
        self._needs_reset = False
        # Meta-World only evaluates success inside step(); at reset no task is done by construction.
        self._last_info = self._info(False)
        return dm_env.restart(self._observation())

    def step(self, action: Any) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        a = validate_action(action)
        self._raw_obs, mw_reward, _, _, mw_info = self.mw.step(to_metaworld_action(a))
        self._step_count += 1
        success = bool(mw_info.get("success", 0.0))
        self._last_info = self._info(success, float(mw_reward))
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
            "state": specs.BoundedArray((7,), np.float32, STATE_MIN, STATE_MAX, name="state"),
            "instruction": specs.StringArray((), name="instruction"),
        }

    def action_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((5,), np.float32, ACTION_MIN, ACTION_MAX, name="action")

    def close(self) -> None:
        self._release_renderer()  # runs once; the finalizer then does nothing at exit
        self._renderer = None
        if self.mw is not None:
            self.mw.close()

    # ---- episode properties -----------------------------------------------------------------

    @property
    def task(self) -> str:
        return self._task

    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def episode_seed(self) -> int:
        return self._episode_seed

    @property
    def variant(self) -> int:
        """Index of the benchmark goal this episode plays (-1 with goals="random")."""
        return self._variant

    @property
    def success(self) -> bool:
        return bool(self._last_info.get("success", False))

    @property
    def last_info(self) -> dict[str, Any]:
        return dict(self._last_info)

    @property
    def step_count(self) -> int:
        return self._step_count

    @property
    def raw_observation(self) -> np.ndarray:
        """Meta-World's 39-d state observation (hand, objects, previous frame, goal): for the experts."""
        return self._raw_obs.copy()

    # ---- rendering --------------------------------------------------------------------------

    def render(self, camera: str | None = None) -> np.ndarray:
        """An upright RGB frame from `camera` (default: the observation camera)."""
        return upright(self.render_raw(camera), self.needs_rotation(camera))

    def render_raw(self, camera: str | None = None) -> np.ndarray:
        """The frame as MuJoCo renders it (Meta-World's corner cameras are upside down)."""
        if self._renderer is None:
            raise RuntimeError("this env was created with render=False")
        camera = self.camera if camera is None else camera
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        self._renderer.update_scene(self.data, camera=self._cam_id[camera])
        return self._renderer.render()

    def needs_rotation(self, camera: str | None = None) -> bool:
        """True when the camera's image-up axis points below the horizon: its frames are upside down.

        Meta-World defines corner/corner2/corner3/corner4 with a downward "up" axis. Negating both
        camera axes keeps the view direction, so the fix is a 180-degree rotation (not a mirror flip).
        """
        camera = self.camera if camera is None else camera
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {list(CAMERAS)}, got {camera!r}")
        return self._rotate[camera]

    # ---- internals --------------------------------------------------------------------------

    def _observation(self) -> dict[str, np.ndarray]:
        image = self.render() if self._renderer is not None else self._blank.copy()
        # tcp (fingertip centre) + Meta-World's normalised finger distance (1 = open), like the tabletop
        # state, + the goal (the last 3 values of Meta-World's fully observable 39-d observation).
        state = np.concatenate([self.mw.tcp_center, self._raw_obs[3:4], self._raw_obs[-3:]]).astype(np.float32)
        return {"image": image, "state": state, "instruction": np.array(self._instruction, dtype=object)}

    def _info(self, success: bool, mw_reward: float = 0.0) -> dict[str, Any]:
        return {
            "success": success,
            "task": self._task,
            "benchmark": self.benchmark,
            "instruction": self._instruction,
            "episode_seed": self._episode_seed,
            "variant": self._variant,
            "step": self._step_count,
            "metaworld_reward": mw_reward,  # Meta-World's dense shaped reward, for analysis only
        }


def upright(frame: np.ndarray, rotate: bool) -> np.ndarray:
    return np.ascontiguousarray(frame[::-1, ::-1]) if rotate else frame


def to_metaworld_action(a: np.ndarray) -> np.ndarray:
    """Our [dx, dy, dz, gripper, terminate] -> Meta-World's [dx, dy, dz, grab effort]: same scale and sign."""
    return np.asarray(a[:4], dtype=np.float32)


def from_metaworld_action(mw_action: np.ndarray, terminate: float = 0.0) -> np.ndarray:
    """Meta-World's 4-d action -> ours, clipped as Meta-World clips it (the env clips xyz; ctrlrange clips the grip)."""
    mw_action = np.asarray(mw_action, dtype=np.float64)
    return np.clip(np.append(mw_action[:4], terminate), ACTION_MIN, ACTION_MAX).astype(np.float32)


class MetaWorldExpert:
    """Meta-World's scripted policy for the env's task, acting through our 5-d action.

    Same interface as the tabletop experts: act(timestep) -> action, `clean_action` (the noise-free
    action, recorded in demonstrations under DART noise), reset(). `noise` is the std of Gaussian
    noise on dx, dy, dz in action units; `seed` makes it reproducible per episode.
    """

    def __init__(self, env: MetaWorldEnv, noise: float = 0.0, seed: int | None = None):
        if not isinstance(env, MetaWorldEnv):
            raise TypeError(f"env must be a MetaWorldEnv, got {type(env).__name__}")
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
        self.env = env
        self.noise = float(noise)
        self.seed = seed
        self.policy = expert_policy(env.task)
        self.clean_action = np.zeros(5, np.float32)
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Meta-World's policies are stateless; only the noise stream restarts at the next first step."""

    def act(self, timestep: dm_env.TimeStep) -> np.ndarray:
        env = self.env
        if timestep.first():
            seed = None if self.seed is None else [self.seed, env.episode_seed]
            self._rng = np.random.default_rng(seed)
        with warnings.catch_warnings():
            # Upstream's move() warns whenever its gain saturates the action, i.e. on most steps.
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            mw_action = self.policy.get_action(env.raw_observation)
        done = env.success and not env.end_on_success
        self.clean_action = from_metaworld_action(mw_action, 1.0 if done else 0.0)
        if self.noise <= 0:
            return self.clean_action.copy()
        noisy = self.clean_action.copy()
        noisy[:3] += self.noise * self._rng.standard_normal(3)
        return np.clip(noisy, ACTION_MIN, ACTION_MAX).astype(np.float32)


# ---- patched experts: subclasses of upstream policies where upstream is below 95% (docs/METAWORLD.md) ----


class DoorOpenPolicy(SawyerDoorOpenV3Policy):
    """Upstream starts descending once the hand is within 12 cm (xy) of the handle. On some goals the
    fingers then land on top of the handle, the hand stays on its far side and pushes the door shut
    (46/50 over the MT10 goals). We line up above the handle's front edge before descending."""

    @staticmethod
    def _desired_pos(o_d: dict[str, np.ndarray]) -> np.ndarray:
        hand = o_d["hand_pos"]
        door = o_d["door_pos"] + np.array([-0.05, 0.0, 0.0])
        front = door + np.array([0.06, 0.02, 0.0])
        if abs(hand[2] - door[2]) <= 0.04 and np.linalg.norm(hand[:2] - door[:2]) <= 0.12:
            return door  # low and at the handle: push it open (upstream's last phase)
        if np.linalg.norm(hand[:2] - front[:2]) > 0.02:
            return front + np.array([0.0, 0.0, 0.2])
        return front


class PegInsertSidePolicy(SawyerPegInsertionSideV3Policy):
    """Upstream decides "at the peg" by |hand z - peg z| <= 2.5 cm, but a held peg hangs ~2.5 cm below
    the hand: on some goals the offset is just over, so the carried peg is lowered back to the table;
    and it switches to inserting on the peg's yz error (< 3 cm), which jitters in and out while moving
    (43/50 over the MT10 goals). We detect the grasp from the lifted peg, align the hand (not the peg)
    with the hole, and keep inserting within a looser tolerance once past the approach point."""

    @staticmethod
    def _desired_pos(o_d: dict[str, np.ndarray]) -> np.ndarray:
        hand, peg = o_d["hand_pos"], o_d["peg_pos"]
        hole = np.array([-0.35, o_d["goal_pos"][1], 0.16])  # upstream's hand height for the hole
        near = np.linalg.norm(hand[:2] - peg[:2]) <= 0.04
        lifted = peg[2] > 0.045  # resting, the peg's centre is at ~0.025-0.03
        if not near:
            return peg + np.array([0.0, 0.0, 0.3])
        # 3.2 cm, not 2.5: at the far end of the table the arm cannot bring the hand lower than ~6 cm.
        if not lifted and abs(hand[2] - peg[2]) > 0.032:
            return peg
        inserting = hand[0] < hole[0] + 0.3
        if np.linalg.norm(hand[1:] - hole[1:]) > (0.04 if inserting else 0.02):
            return hole + np.array([0.4, 0.0, 0.0])
        return hole


PATCHED_POLICIES: dict[str, type] = {"door-open": DoorOpenPolicy, "peg-insert-side": PegInsertSidePolicy}


def expert_policy(task: str):
    """The scripted Meta-World policy for `task` (patched where upstream falls short)."""
    cls = PATCHED_POLICIES.get(task) or ENV_POLICY_MAP[mw_name(task)]
    return cls()



def _make_renderer(model: mujoco.MjModel, size: int, quality: str = "fast") -> mujoco.Renderer:
    # The offscreen buffer must be at least the image size.
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
    model.vis.global_.offheight = max(model.vis.global_.offheight, size)
    if quality == "fast":
        model.vis.quality.offsamples = 0  # read when the GL context is made
    try:
        renderer = mujoco.Renderer(model, size, size)
    except Exception as e:
        raise RuntimeError(
            "Headless MuJoCo rendering failed. Set MUJOCO_GL=egl (before mujoco is imported) and install "
            "the EGL/Mesa libraries, e.g. `apt-get install libegl1 libgl1-mesa-dri`; or use MUJOCO_GL=osmesa "
            f"with `apt-get install libosmesa6`. Or pass render=False. Original error: {e!r}"
        ) from e
    if quality == "fast":
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer
