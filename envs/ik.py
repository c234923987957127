"""Damped-least-squares inverse kinematics for the arm's tool centre point (position + orientation).

The solver works on its own MjData (kinematics only), so it never disturbs the simulation.
It is warm-started from the previous solution: the target moves at most a few cm per control
step, so two or three iterations land within a fraction of a millimetre.
"""

from __future__ import annotations

import mujoco
import numpy as np


class DampedLeastSquaresIK:
    """dq = J^T (J J^T + lambda^2 I)^-1 e, with e the 6-D pose error, clamped to the joint ranges."""

    def __init__(
        self,
        model: mujoco.MjModel,
        site: str,
        joints: tuple[str, ...],
        damping: float = 0.02,
        iterations: int = 2,
        max_joint_step: float = 0.3,
        rotation_weight: float = 0.3,
    ):
        self.model = model
        self.data = mujoco.MjData(model)
        self.site = model.site(site).id
        self.qpos_idx = np.array([model.joint(j).qposadr[0] for j in joints])
        self.dof_idx = np.array([model.joint(j).dofadr[0] for j in joints])
        self.low = model.jnt_range[[model.joint(j).id for j in joints], 0].copy()
        self.high = model.jnt_range[[model.joint(j).id for j in joints], 1].copy()
        self.damping = damping
        self.iterations = iterations
        self.max_joint_step = max_joint_step
        # Metres and radians weighed against each other: 0.3 means 1 rad of tilt counts as 30 cm.
        self.rotation_weight = rotation_weight
        self._damping_eye = (damping**2) * np.eye(6)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def forward(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tcp position and rotation matrix for arm joint angles `q`."""
        self.data.qpos[self.qpos_idx] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def pose_error(self, q: np.ndarray, pos: np.ndarray, rot: np.ndarray) -> np.ndarray:
        p, r = self.forward(q)
        # Rotation vector (world frame, small-angle) taking r to rot: 0.5 * sum_i r_i x rot_i,
        # written as the vee of the skew part of rot r^T (cheaper than np.cross in a loop).
        m = rot @ r.T
        w = 0.5 * np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
        return np.concatenate([pos - p, w])

    def solve(self, q0: np.ndarray, pos: np.ndarray, rot: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Joint angles near `q0` that put the tcp at `pos` with orientation `rot` (3x3)."""
        q = np.clip(np.asarray(q0, dtype=np.float64), self.low, self.high)
        m, d = self.model, self.data
        scale = np.array([1.0, 1.0, 1.0, self.rotation_weight, self.rotation_weight, self.rotation_weight])
        for _ in range(self.iterations if iterations is None else iterations):
            e = self.pose_error(q, pos, rot)  # leaves kinematics of q in self.data
            mujoco.mj_comPos(m, d)
            mujoco.mj_jacSite(m, d, self._jacp, self._jacr, self.site)
            jac = np.vstack([self._jacp[:, self.dof_idx], self._jacr[:, self.dof_idx]]) * scale[:, None]
            e = e * scale
            jjt = jac @ jac.T + self._damping_eye
            mujoco.mju_cholFactor(jjt, 0.0)
            x = np.empty(6)
            mujoco.mju_cholSolve(x, jjt, e)
            dq = jac.T @ x
            dq *= min(1.0, self.max_joint_step / max(1e-9, float(np.abs(dq).max())))
            q = np.clip(q + dq, self.low, self.high)
        return q
