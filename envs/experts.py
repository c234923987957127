"""Scripted experts: proportional control through task waypoints, using privileged sim state.

They move like a teleoperator: straight-line motion toward the current waypoint, slowing down
near it, never faster than the action bounds allow. Waypoints are recomputed every step from the
live scene, so the expert follows a block that moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import dm_env
import numpy as np

from envs.scene import BLOCK_HALF, MAX_DELTA, TRAY_FLOOR_TOP

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

OPEN, CLOSE = -1.0, 1.0
GAIN = 0.8  # fraction of the remaining error covered per step: < 1 avoids overshoot from weld lag
HOVER_Z = 0.08  # fingertips clear the blocks at this tcp height
CARRY_Z = 0.15
TRANSPORT_Z = 0.10  # a held block's bottom clears the other blocks and the tray walls


@dataclass(frozen=True)
class Waypoint:
    target: Callable[["TabletopEnv"], np.ndarray]  # tcp goal, re-evaluated every step
    gripper: float
    tol: float = 0.01  # advance once the tcp is this close ...
    wait: int = 0  # ... and at least this many steps were spent here (fingers closing/opening)


class WaypointExpert:
    """Base expert: subclasses give the waypoints; the last one is held until the episode ends."""

    def __init__(self, env: "TabletopEnv", noise: float = 0.0, seed: int | None = None):
        self.env = env
        self.noise = noise
        self.seed = seed
        self.reset()

    def waypoints(self) -> list[Waypoint]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the current episode; the next act() plans afresh."""
        self._plan: list[Waypoint] | None = None

    def act(self, timestep: dm_env.TimeStep) -> np.ndarray:
        if timestep.first() or self._plan is None:
            self._phase, self._steps_in_phase = 0, 0
            self._plan = self.waypoints()
            # Noise depends on (expert seed, episode seed): reproducible per episode, varied across them.
            seed = None if self.seed is None else [self.seed, self.env.episode_seed]
            self._rng = np.random.default_rng(seed)
        env = self.env
        tcp = env.gripper_pos()
        wp = self._plan[self._phase]
        goal = wp.target(env)
        if (
            self._phase < len(self._plan) - 1
            and np.linalg.norm(goal - tcp) < wp.tol
            and self._steps_in_phase >= wp.wait
        ):
            self._phase, self._steps_in_phase = self._phase + 1, 0
            wp = self._plan[self._phase]
            goal = wp.target(env)
        self._steps_in_phase += 1

        move = GAIN * (goal - tcp) / MAX_DELTA
        move /= max(1.0, float(np.abs(move).max()))  # keep the direction when saturating
        done = env.success and not env.end_on_success
        low, high = env.action_spec().minimum, env.action_spec().maximum
        # The noise-free action for this state. With noise, the executed action is perturbed but this
        # is what a demonstration should record (DART): recoveries are shown, the noise is not taught.
        self.clean_action = np.clip(np.concatenate([move, [wp.gripper, 1.0 if done else 0.0]]), low, high).astype(np.float32)
        if self.noise <= 0:
            return self.clean_action.copy()
        noisy = self.clean_action.copy()
        noisy[:3] += self.noise * self._rng.standard_normal(3)
        return np.clip(noisy, low, high).astype(np.float32)


def _above(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        p = env.block_pos(env.target_color)
        return np.array([p[0], p[1], z])

    return target


def _at_start(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        p = env.block_start_pos(env.target_color)
        return np.array([p[0], p[1], z])

    return target


def _above_tray(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        return env.tray_pos() + np.array([0.0, 0.0, z])

    return target


def _grasp() -> list[Waypoint]:
    return [
        Waypoint(_above(HOVER_Z), OPEN, tol=0.012),
        Waypoint(_above(BLOCK_HALF), OPEN, tol=0.006),
        Waypoint(_above(BLOCK_HALF), CLOSE, tol=0.01, wait=3),
    ]


class ReachExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return [Waypoint(_above(HOVER_Z), OPEN, tol=0.012), Waypoint(_above(BLOCK_HALF + 0.01), OPEN)]


class LiftExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return _grasp() + [Waypoint(_at_start(CARRY_Z), CLOSE)]


class PushExpert(WaypointExpert):
    BEHIND = 0.075  # tcp starts this far behind the block centre (closed pads are 1 cm thick)

    def waypoints(self) -> list[Waypoint]:
        def behind(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
            def target(env: "TabletopEnv") -> np.ndarray:
                p = env.block_pos(env.target_color)
                return np.array([p[0], p[1] - self.BEHIND, z])

            return target

        def through(env: "TabletopEnv") -> np.ndarray:
            # Aim past the success distance, tracking the block's sideways drift.
            p, start = env.block_pos(env.target_color), env.block_start_pos(env.target_color)
            return np.array([p[0], start[1] + 0.12 - BLOCK_HALF - 0.01, BLOCK_HALF])

        return [
            Waypoint(behind(HOVER_Z), CLOSE, tol=0.012),
            Waypoint(behind(BLOCK_HALF), CLOSE, tol=0.008),
            Waypoint(through, CLOSE),
        ]


class PlaceExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        release_z = TRAY_FLOOR_TOP + BLOCK_HALF + 0.01
        return _grasp() + [
            Waypoint(_at_start(TRANSPORT_Z), CLOSE, tol=0.02),
            Waypoint(_above_tray(TRANSPORT_Z), CLOSE, tol=0.015),
            Waypoint(_above_tray(release_z), CLOSE, tol=0.008),
            Waypoint(_above_tray(release_z), OPEN, tol=0.02, wait=2),
            Waypoint(_above_tray(CARRY_Z), OPEN),
        ]


def make_expert(env: "TabletopEnv", noise: float = 0.0, seed: int | None = None) -> WaypointExpert:
    """The scripted expert for `env`'s task.

    `noise` is the std of Gaussian noise added to dx, dy, dz (in action units); up to 0.2 the
    experts still succeed >= 98% of the time. `seed` makes the noise reproducible per episode.
    """
    return env.task_spec.expert(env, noise=noise, seed=seed)
