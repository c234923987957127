"""MJCF for the tabletop scene: table, mocap-driven parallel-jaw gripper, three blocks, a tray.

Frame convention: the table top is the plane z = 0, +y points away from the "front" camera
("forward"), +x to its right. The gripper body's origin is the fingertip centre (the "tcp"),
so the mocap target, the workspace box and the observed gripper position all refer to one point.
"""

from __future__ import annotations

import numpy as np

COLORS: tuple[str, ...] = ("red", "green", "blue")
RGBA: dict[str, str] = {"red": "0.85 0.12 0.10 1", "green": "0.10 0.70 0.15 1", "blue": "0.12 0.25 0.90 1"}

BLOCK_HALF = 0.02  # 4 cm cubes
FINGER_OPEN = 0.045  # finger joint position (half-opening, m) when fully open
TRAY_INNER_HALF = 0.07  # inner half-width of the square tray: wider than the open fingers
TRAY_WALL = 0.006  # wall half-thickness
TRAY_WALL_HEIGHT = 0.03
TRAY_FLOOR_TOP = 0.006

# Box the tcp is kept in: above the table (fingertips 5 mm clear) and inside the camera view.
WORKSPACE_LOW = np.array([-0.28, -0.22, 0.015])
WORKSPACE_HIGH = np.array([0.28, 0.26, 0.30])

MAX_DELTA = 0.02  # tcp displacement (m) per control step at |action| = 1
TIMESTEP = 0.005  # physics step (s)
CONTROL_DT = 0.1  # 10 Hz control
SUBSTEPS = round(CONTROL_DT / TIMESTEP)


def _block(color: str) -> str:
    h = BLOCK_HALF
    return f"""
    <body name="block_{color}" pos="0 0 {h}">
      <freejoint name="block_{color}"/>
      <geom name="block_{color}" type="box" size="{h} {h} {h}" rgba="{RGBA[color]}" mass="0.05"
            friction="1.0 0.01 0.001"/>
    </body>"""


def _tray() -> str:
    """A shallow square tray on a mocap body, so reset can move it without a joint."""
    i, w, ht = TRAY_INNER_HALF, TRAY_WALL, TRAY_WALL_HEIGHT
    o = i + w  # wall centre line
    col = 'rgba="0.55 0.42 0.30 1"'
    walls = "\n".join(
        f'      <geom type="box" size="{sx} {sy} {ht / 2}" pos="{px} {py} {ht / 2}" {col}/>'
        for sx, sy, px, py in ((w, o + w, o, 0), (w, o + w, -o, 0), (o + w, w, 0, o), (o + w, w, 0, -o))
    )
    return f"""
    <body name="tray" mocap="true" pos="0.12 0.08 0">
      <geom name="tray_floor" type="box" size="{o + w} {o + w} {TRAY_FLOOR_TOP / 2}"
            pos="0 0 {TRAY_FLOOR_TOP / 2}" rgba="0.65 0.50 0.36 1"/>
{walls}
    </body>"""


def _gripper() -> str:
    # Fingers slide along the gripper's y axis; joint value = distance of the pad's inner face
    # from the centre line, so the opening is readable straight from qpos.
    finger = (
        'type="box" size="0.018 0.005 0.022" friction="1.5 0.02 0.002" condim="4" '
        'rgba="0.25 0.25 0.28 1" mass="0.02"'
    )
    return f"""
    <body name="gripper_target" mocap="true" pos="0 0 0.2"/>
    <body name="gripper" pos="0 0 0.2" gravcomp="1">
      <freejoint name="gripper"/>
      <site name="tcp" size="0.006" rgba="1 1 0 0"/>
      <geom name="palm" type="box" size="0.02 0.06 0.01" pos="0 0 0.045" rgba="0.35 0.35 0.38 1" mass="0.3"/>
      <geom name="wrist" type="cylinder" size="0.018 0.04" pos="0 0 0.095" rgba="0.6 0.6 0.62 1" mass="0.1"/>
      <camera name="wrist" pos="0 0 0.03" xyaxes="1 0 0 0 1 0" fovy="75"/>
      <body name="finger_left" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="2"/>
        <geom name="finger_left" {finger} pos="0 0.005 0.012"/>
      </body>
      <body name="finger_right" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="2"/>
        <geom name="finger_right" {finger} pos="0 -0.005 0.012"/>
      </body>
    </body>"""


def build_mjcf() -> str:
    return f"""
<mujoco model="tabletop">
  <compiler angle="radian"/>
  <!-- elliptic cones + high impratio: stiff friction, so a grasped block does not creep out of the pads -->
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
    <quality shadowsize="1024"/>
  </visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.82 0.80 0.76" rgb2="0.76 0.74 0.70"
             width="256" height="256"/>
    <material name="tabletop" texture="grid" texrepeat="6 6"/>
  </asset>
  <worldbody>
    <light name="key" pos="0.3 -0.4 1.2" dir="-0.25 0.35 -1" diffuse="0.55 0.55 0.55" castshadow="true"/>
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.75" rgba="0.3 0.3 0.33 1"/>
    <geom name="table" type="box" size="0.4 0.36 0.02" pos="0 0.02 -0.02" material="tabletop"
          friction="0.6 0.005 0.0001"/>
    <camera name="front" pos="0 -0.45 1.0" xyaxes="1 0 0 0 0.905 0.425" fovy="28"/>
{_gripper()}
{''.join(_block(c) for c in COLORS)}
{_tray()}
  </worldbody>
  <equality>
    <weld body1="gripper_target" body2="gripper" solref="0.01 1"/>
  </equality>
  <contact>
    <exclude body1="finger_left" body2="finger_right"/>
  </contact>
  <actuator>
    <position name="finger_left" joint="finger_left" kp="150" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="finger_right" joint="finger_right" kp="150" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>
"""
