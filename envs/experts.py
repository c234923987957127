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

from envs.scene import BLOCK_HALF, DIRECTIONS, GO_STEP, MAX_DELTA, TRAY_FLOOR_TOP

if TYPE_CHECKING:
    from envs.tabletop import TabletopEnv

OPEN, CLOSE = -1.0, 1.0
GAIN = 0.8  # fraction of the remaining error covered per step: < 1 avoids overshoot from weld lag
HOVER_Z = 0.08  # fingertips clear the blocks at this tcp height
CARRY_Z = 0.15
TRANSPORT_Z = 0.10  # a held block's bottom clears the other blocks and the tray walls
HANDLE_GRIP_Z = 0.03  # fingertips below the handle bar, palm above the drawer front
REGRASP_AFTER = 3  # steps the fingers get to close before a missed grasp is declared


@dataclass(frozen=True)
class Waypoint:
    target: Callable[["TabletopEnv"], np.ndarray]  # tcp goal, re-evaluated every step
    gripper: float
    tol: float = 0.01  # advance once the tcp is this close ...
    wait: int = 0  # ... and at least this many steps were spent here (fingers closing/opening)
    until: Callable[["TabletopEnv"], bool] | None = None  # ... and this holds (e.g. a go signal)
    hold: bool = False  # stand still (zero displacement) while here
    holding: bool = False  # the target must be in the closed fingers here; if it is not, start over
    speed: float = 1.0  # largest |dx|, |dy|, |dz| action while heading here
    abort: Callable[["TabletopEnv"], bool] | None = None  # if true here, start the plan over
    skip: Callable[["TabletopEnv"], bool] | None = None  # passed over when true on arrival (re-plans)


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

    def _skip_done(self) -> Waypoint:
        """The current waypoint, after passing over those whose `skip` holds (e.g. after a regrasp)."""
        while self._phase < len(self._plan) - 1 and (s := self._plan[self._phase].skip) is not None and s(self.env):
            self._phase += 1
        return self._plan[self._phase]

    def _lost_grip(self) -> bool:
        # Fingers (nearly) shut on nothing: an object between the pads keeps them >= 40% open.
        return self.env.gripper_opening() < 0.15 and not self.env.grasped(self.env.target)

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
        lost = wp.holding and self._steps_in_phase >= REGRASP_AFTER and self._lost_grip()
        if lost or (wp.abort is not None and wp.abort(env)):
            # The object slipped out or was never caught (or the push lost contact): start over.
            self._phase, self._steps_in_phase = 0, 0
            wp = self._skip_done()
        goal = wp.target(env)
        if (
            self._phase < len(self._plan) - 1
            and np.linalg.norm(goal - tcp) < wp.tol
            and self._steps_in_phase >= wp.wait
            and (wp.until is None or wp.until(env))
        ):
            self._phase, self._steps_in_phase = self._phase + 1, 0
            wp = self._skip_done()
            goal = wp.target(env)
        self._steps_in_phase += 1

        move = np.zeros(3) if wp.hold else GAIN * (goal - tcp) / MAX_DELTA
        move *= min(1.0, wp.speed / max(1e-9, float(np.abs(move).max())))  # keep the direction when saturating
        done = env.success and not env.end_on_success
        low, high = env.action_spec().minimum, env.action_spec().maximum
        # The noise-free action for this state. With noise, the executed action is perturbed but this
        # is what a demonstration should record (DART): recoveries are shown, the noise is not taught.
        clean = np.concatenate([move, [wp.gripper, 1.0 if done else 0.0]])
        self.clean_action = np.clip(clean, low, high).astype(np.float32)
        if self.noise <= 0:
            return self.clean_action.copy()
        noisy = self.clean_action.copy()
        noisy[:3] += self.noise * self._rng.standard_normal(3)
        return np.clip(noisy, low, high).astype(np.float32)


def _above(z: float, slot: str | None = None) -> Callable[["TabletopEnv"], np.ndarray]:
    """Over an object (the target by default) at tcp height z."""

    def target(env: "TabletopEnv") -> np.ndarray:
        p = env.object_pos(slot or env.target)
        return np.array([p[0], p[1], z])

    return target


def _at_start(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        p = env.object_start_pos(env.target)
        return np.array([p[0], p[1], z])

    return target


def _above_tray(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        return env.tray_pos() + np.array([0.0, 0.0, z])

    return target


def _above_pad(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        p = env.pad_pos(env.episode.pad)
        return np.array([p[0], p[1], z])

    return target


def _above_base(dz: float) -> Callable[["TabletopEnv"], np.ndarray]:
    def target(env: "TabletopEnv") -> np.ndarray:
        return env.object_pos(env.episode.other) + np.array([0.0, 0.0, dz])

    return target


def _here(env: "TabletopEnv") -> np.ndarray:
    return env.gripper_pos()


def _go(env: "TabletopEnv") -> bool:
    return bool(env.task_state.get("go", False))


def _grasp() -> list[Waypoint]:
    return [
        Waypoint(_above(HOVER_Z), OPEN, tol=0.012),
        Waypoint(_above(BLOCK_HALF), OPEN, tol=0.006),
        # Close in place: chasing the object while the pads squeeze it would push it around.
        Waypoint(_above(BLOCK_HALF), CLOSE, tol=1.0, wait=3, hold=True, holding=True),
    ]


def _release(target: Callable[["TabletopEnv"], np.ndarray], drop_z: float) -> list[Waypoint]:
    """Carry the held object over `target` (an xy), lower it to `drop_z`, open and back off upward."""

    def at(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
        def goal(env: "TabletopEnv") -> np.ndarray:
            # Put the object, not the tcp, over the target: it may sit off-centre in the grip.
            offset = (env.gripper_pos() - env.object_pos(env.target))[:2] if env.grasped(env.target) else 0.0
            return np.array([*(target(env)[:2] + offset), z])

        return goal

    return [
        Waypoint(_at_start(TRANSPORT_Z), CLOSE, tol=0.02, holding=True),
        Waypoint(at(TRANSPORT_Z), CLOSE, tol=0.015, holding=True),
        Waypoint(at(drop_z), CLOSE, tol=0.008, holding=True),
        Waypoint(at(drop_z), OPEN, tol=0.02, wait=2),
        Waypoint(at(CARRY_Z), OPEN),
    ]


class ReachExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return [Waypoint(_above(HOVER_Z), OPEN, tol=0.012), Waypoint(_above(BLOCK_HALF + 0.01), OPEN)]


class LiftExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return _grasp() + [Waypoint(_at_start(CARRY_Z), CLOSE, holding=True)]


class PushExpert(WaypointExpert):
    """Pushes along the episode's direction (forward by default) with closed fingers."""

    BEHIND = 0.075  # tcp starts this far behind the object centre (closed pads are 1 cm thick)

    def waypoints(self) -> list[Waypoint]:

        d = np.array([*DIRECTIONS[self.env.episode.direction or "forward"], 0.0])
        # Sideways pushes use the closed fingers' narrow (2 cm) edge: start closer and push slower,
        # so the servo keeps the edge behind a cylinder that tends to roll off it.
        sideways = d[1] == 0
        behind_dist = 0.045 if sideways else self.BEHIND
        push_speed = 0.5 if sideways else 1.0

        def behind(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
            def target(env: "TabletopEnv") -> np.ndarray:
                p = env.object_pos(env.target) - d * behind_dist
                return np.array([p[0], p[1], z])

            return target

        def through(env: "TabletopEnv") -> np.ndarray:
            # Aim past the success distance along d, tracking the object's sideways drift.
            p, start = env.object_pos(env.target), env.object_start_pos(env.target)
            along = start + d * (0.12 - behind_dist + 0.075 - BLOCK_HALF - 0.01)
            goal = np.where(d != 0, along, p)
            return np.array([goal[0], goal[1], BLOCK_HALF])

        def lost_contact(env: "TabletopEnv") -> bool:
            # The fingers rode over the object or it slid off their edge: back off and line up again.
            rel = (env.object_pos(env.target) - env.gripper_pos())[:2]
            return bool(rel @ d[:2] < 0.01 or abs(rel @ np.array([-d[1], d[0]])) > 0.03)

        return [
            Waypoint(behind(HOVER_Z), CLOSE, tol=0.012),
            Waypoint(behind(BLOCK_HALF), CLOSE, tol=0.008),
            Waypoint(through, CLOSE, speed=push_speed, abort=lost_contact),
        ]


class PlaceExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return _grasp() + _release(_above_tray(0.0), TRAY_FLOOR_TOP + BLOCK_HALF + 0.01)


class PadExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return _grasp() + _release(_above_pad(0.0), BLOCK_HALF + 0.008)


class StackExpert(WaypointExpert):
    def waypoints(self) -> list[Waypoint]:
        return _grasp() + _release(_above_base(0.0), 3 * BLOCK_HALF + 0.008)


class OpenDrawerExpert(WaypointExpert):
    """Drops the closed fingers between the handle bar and the drawer front, then pulls toward the camera."""

    def waypoints(self) -> list[Waypoint]:
        from envs.scene import CABINET_FRONT_Y, HANDLE_Y

        gap = (CABINET_FRONT_Y - HANDLE_Y) / 2  # bar centre to the middle of the gap

        def in_gap(z: float, pull: float = 0.0) -> Callable[["TabletopEnv"], np.ndarray]:
            def target(env: "TabletopEnv") -> np.ndarray:
                h = env.handle_pos()
                return np.array([h[0], h[1] + gap - pull, z])

            return target

        return [
            Waypoint(in_gap(HOVER_Z), CLOSE, tol=0.01),
            Waypoint(in_gap(HANDLE_GRIP_Z), CLOSE, tol=0.006),
            Waypoint(in_gap(HANDLE_GRIP_Z, pull=0.04), CLOSE),
        ]


class CloseDrawerExpert(WaypointExpert):
    """Comes down in front of the handle bar and pushes the drawer back in."""

    def waypoints(self) -> list[Waypoint]:
        from envs.scene import HANDLE_Y

        def before_bar(z: float) -> Callable[["TabletopEnv"], np.ndarray]:
            def target(env: "TabletopEnv") -> np.ndarray:
                h = env.handle_pos()
                return np.array([h[0], h[1] - 0.03, z])

            return target

        def shut(env: "TabletopEnv") -> np.ndarray:
            h = env.handle_pos()
            return np.array([h[0], max(h[1], HANDLE_Y) + 0.0, HANDLE_GRIP_Z])

        return [
            Waypoint(before_bar(HOVER_Z), CLOSE, tol=0.01),
            Waypoint(before_bar(HANDLE_GRIP_Z), CLOSE, tol=0.008),
            Waypoint(shut, CLOSE),
        ]


class CueTouchExpert(WaypointExpert):
    """Holds still until the go light, then touches the object whose colour the cue showed."""

    def waypoints(self) -> list[Waypoint]:

        return [
            Waypoint(_here, OPEN, tol=1.0, wait=GO_STEP, hold=True),
            Waypoint(_above(HOVER_Z), OPEN, tol=0.012),
            Waypoint(_above(BLOCK_HALF + 0.01), OPEN),
        ]


class PutBackExpert(WaypointExpert):
    """Lifts the object, holds it over the tray until the go light, then sets it down where it was."""

    def waypoints(self) -> list[Waypoint]:
        return _grasp() + [
            # After a regrasp that follows the go light, go straight back to the start spot.
            Waypoint(_at_start(TRANSPORT_Z + 0.03), CLOSE, tol=0.02, holding=True, skip=_go),
            Waypoint(_above_tray(TRANSPORT_Z + 0.03), CLOSE, tol=0.015, holding=True, skip=_go),
            Waypoint(_above_tray(TRANSPORT_Z + 0.03), CLOSE, tol=1.0, until=_go, holding=True, skip=_go),
            Waypoint(_at_start(TRANSPORT_Z), CLOSE, tol=0.012, holding=True),
            Waypoint(_at_start(BLOCK_HALF + 0.005), CLOSE, tol=0.008, holding=True),
            Waypoint(_at_start(BLOCK_HALF + 0.005), OPEN, tol=0.02, wait=2),
            Waypoint(_at_start(CARRY_Z), OPEN),
        ]


class TouchOrderExpert(WaypointExpert):
    """Holds still until the go light, touches the first object, rises, then touches the second."""

    def waypoints(self) -> list[Waypoint]:
        second = self.env.episode.other
        return [
            Waypoint(_here, OPEN, tol=1.0, wait=GO_STEP, hold=True),
            Waypoint(_above(HOVER_Z), OPEN, tol=0.012),
            Waypoint(_above(BLOCK_HALF + 0.01), OPEN, tol=0.008),
            Waypoint(_above(HOVER_Z), OPEN, tol=0.015),
            Waypoint(_above(HOVER_Z, second), OPEN, tol=0.012),
            Waypoint(_above(BLOCK_HALF + 0.01, second), OPEN),
        ]


class PressAgainExpert(WaypointExpert):
    """Presses the episode's pad with closed fingers, waits over the tray until the go light, presses it again."""

    PRESS_TCP_Z = 0.02  # fingertips 2 cm over the pad: below memory_tasks.PRESS_Z, above the workspace floor

    def waypoints(self) -> list[Waypoint]:
        press = [
            Waypoint(_above_pad(HOVER_Z), CLOSE, tol=0.012),
            Waypoint(_above_pad(self.PRESS_TCP_Z), CLOSE, tol=0.006),
        ]
        return press + [
            Waypoint(_above_pad(CARRY_Z), CLOSE, tol=0.02),
            Waypoint(_above_tray(CARRY_Z), CLOSE, tol=0.015),
            Waypoint(_above_tray(CARRY_Z), CLOSE, tol=1.0, until=_go, hold=True),
        ] + press


def make_expert(env: "TabletopEnv", noise: float = 0.0, seed: int | None = None) -> WaypointExpert:
    """The scripted expert for `env`'s task.

    `noise` is the std of Gaussian noise added to dx, dy, dz (in action units); up to 0.2 the
    experts still succeed >= 98% of the time. `seed` makes the noise reproducible per episode.
    """
    return env.task_spec.expert(env, noise=noise, seed=seed)
