"""MJCF for the tabletop scene: a table, a 6-joint arm with a parallel-jaw gripper, three
objects (two cubes and a cylinder), a tray, two coloured pads, a drawer cabinet and a cue lamp.

Frame convention: the table top is the plane z = 0, +y points away from the "front" camera
("forward"), +x to its right. The arm stands on a pedestal behind the table (+y) and reaches
toward the camera. The hand body's origin is the fingertip centre (the "tcp"), so the IK
target, the workspace box and the observed gripper position all refer to one point.

Every body of the arm has a world-aligned frame when all joints are zero, so joint axes read
directly in world terms: pan about z, pitch joints about x, forearm roll about y.
"""

from __future__ import annotations

import numpy as np

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.92, 0.80, 0.08),
}
# The memory benchmark paints objects and pads (envs/memory_tasks.py): one neutral for "nothing to see"
# (dark, so it stands out from the light table) besides the colours above.
NEUTRAL = "grey"
PAINT_RGB: dict[str, tuple[float, float, float]] = {**RGB, NEUTRAL: (0.22, 0.22, 0.24)}
# Object slots: the scene always has these three bodies; colours are assigned per episode.
OBJECTS: tuple[str, ...] = ("cube_a", "cube_b", "cylinder")
SHAPES: dict[str, str] = {"cube_a": "cube", "cube_b": "cube", "cylinder": "cylinder"}
PADS: tuple[str, ...] = ("pad_a", "pad_b")
# Push and slide directions in table coordinates (x, y).
DIRECTIONS: dict[str, np.ndarray] = {
    "forward": np.array([0.0, 1.0]),  # away from the front camera
    "left": np.array([-1.0, 0.0]),
    "right": np.array([1.0, 0.0]),
}
# Memory tasks: the control step at which the lamp turns white ("go"); envs/tasks.py has the rest of
# the timing (CUE_STEPS, HOLD_STEPS).
GO_STEP = 12

BLOCK_HALF = 0.02  # 4 cm cubes; the cylinder has radius and half-height BLOCK_HALF too
PAD_HALF = 0.045
FINGER_OPEN = 0.045  # finger joint position (half-opening, m) when fully open
TRAY_INNER_HALF = 0.07  # inner half-width of the square tray: wider than the open fingers
TRAY_WALL = 0.006  # wall half-thickness
TRAY_WALL_HEIGHT = 0.03
TRAY_FLOOR_TOP = 0.006
LAMP_POS = np.array([-0.24, 0.30, 0.06])  # cue lamp: back-left corner, on a post
LAMP_DARK = (0.08, 0.08, 0.08)
# Memory benchmark go signal: a 32 x 4 cm bar flat on the table's front edge that shows the lamp's colour.
# The lamp on its post can be hidden behind the arm (in ~1 of 10 holds over the tray); nothing the tcp can
# reach lies between the front camera and the bar. Other tasks keep it under the table.
GO_BAR_POS = np.array([0.0, -0.29, 0.0])
GO_BAR_HALF = (0.16, 0.02, 0.004)

# Drawer cabinet at the back right: closed drawer front at y = CABINET_FRONT_Y, the handle bar
# HANDLE_GAP in front of it (room for the closed fingers between bar and front), opens along -y.
CABINET_XY = np.array([0.24, 0.30])
CABINET_FRONT_Y = 0.22
HANDLE_Y = 0.175  # bar centre line when closed
HANDLE_Z = 0.035
DRAWER_TRAVEL = 0.12
# Objects, pads and the tray keep out of this xy box (the open drawer, its handle and the hand's approach).
DRAWER_KEEPOUT_LOW = np.array([0.15, 0.03])
DRAWER_KEEPOUT_HIGH = np.array([0.34, 0.40])

# Box the tcp is kept in: above the table (fingertips 5 mm clear) and inside the camera view.
WORKSPACE_LOW = np.array([-0.28, -0.22, 0.015])
WORKSPACE_HIGH = np.array([0.28, 0.26, 0.30])

MAX_DELTA = 0.02  # tcp displacement (m) per control step at |action| = 1
TIMESTEP = 0.005  # physics step (s)
CONTROL_DT = 0.1  # 10 Hz control
SUBSTEPS = round(CONTROL_DT / TIMESTEP)

# ---- the arm ------------------------------------------------------------------------------
ARM_BASE = np.array([0.0, 0.46, 0.0])
SHOULDER_HEIGHT = 0.25
UPPER_ARM = 0.44
FOREARM = 0.40
WRIST_TO_TCP = 0.16  # spherical wrist centre to fingertip centre
ARM_JOINTS: tuple[str, ...] = ("pan", "shoulder", "elbow", "forearm_roll", "wrist_pitch", "tool_roll")
# Joint ranges (rad). The IK clamps to them and the position actuators cannot exceed them.
JOINT_RANGE: dict[str, tuple[float, float]] = {
    "pan": (-1.3, 1.3),
    "shoulder": (-2.2, 0.3),
    "elbow": (0.05, 2.9),
    "forearm_roll": (-1.0, 1.0),
    "wrist_pitch": (-2.6, 1.0),
    "tool_roll": (-2.0, 2.0),
}
JOINT_KP = (1500.0, 3000.0, 2000.0, 500.0, 500.0, 300.0)


def rgba(color: str, alpha: float = 1.0) -> str:
    return " ".join(f"{v:g}" for v in (*RGB[color], alpha))


def _objects() -> str:
    h = BLOCK_HALF
    common = 'mass="0.05" friction="1.0 0.01 0.001" rgba="0.5 0.5 0.5 1"'
    out = []
    for name in OBJECTS:
        geom = (
            f'type="box" size="{h} {h} {h}"' if SHAPES[name] == "cube" else f'type="cylinder" size="{h} {h}"'
        )
        out.append(
            f"""
    <body name="{name}" pos="0 0 {h}">
      <freejoint name="{name}"/>
      <geom name="{name}" {geom} {common}/>
    </body>"""
        )
    return "".join(out)


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


def _pads() -> str:
    # Flat, visual-only squares (no collision): a block pushed or placed onto one just sits there.
    return "".join(
        f"""
    <body name="{p}" mocap="true" pos="0 0 0">
      <geom name="{p}" type="box" size="{PAD_HALF} {PAD_HALF} 0.0008" pos="0 0 0.0008"
            contype="0" conaffinity="0" rgba="0.5 0.5 0.5 1"/>
    </body>"""
        for p in PADS
    )


def _go_bar() -> str:
    hx, hy, hz = GO_BAR_HALF
    dark = " ".join(f"{v:g}" for v in LAMP_DARK)
    return f"""
    <body name="go_bar" mocap="true" pos="0 0 -0.2">
      <geom name="go_bar" type="box" size="{hx} {hy} {hz}" pos="0 0 {hz}" rgba="{dark} 1" contype="0" conaffinity="0"/>
    </body>"""


def _lamp() -> str:
    x, y, z = LAMP_POS
    dark = " ".join(f"{v:g}" for v in LAMP_DARK)
    return f"""
    <body name="lamp" pos="{x} {y} 0">
      <geom type="cylinder" size="0.008 {z / 2}" pos="0 0 {z / 2}" rgba="0.3 0.3 0.32 1" contype="0" conaffinity="0"/>
      <geom name="lamp" type="sphere" size="0.03" pos="0 0 {z}" rgba="{dark} 1" contype="0" conaffinity="0"/>
    </body>"""


def _cabinet() -> str:
    """A static open-front cabinet with one drawer on a slide joint and a bar handle."""
    cx, cy = CABINET_XY
    hx, hy = 0.08, (0.38 - CABINET_FRONT_Y) / 2  # outer half sizes; back flush with the table edge
    h = 0.08  # half height: tall enough that the hand's palm (6 cm deep) fits under the top at the handle
    wall = 'rgba="0.45 0.47 0.52 1"'
    front = CABINET_FRONT_Y - cy  # local y of the closed drawer front
    return f"""
    <body name="cabinet" pos="{cx} {cy} 0">
      <geom type="box" size="{hx} {hy} 0.0025" pos="0 0 0.0025" {wall}/>
      <geom type="box" size="{hx} {hy} 0.0025" pos="0 0 {2 * h - 0.0025}" {wall}/>
      <geom type="box" size="0.0025 {hy} {h}" pos="{-hx + 0.0025} 0 {h}" {wall}/>
      <geom type="box" size="0.0025 {hy} {h}" pos="{hx - 0.0025} 0 {h}" {wall}/>
      <geom type="box" size="{hx} 0.0025 {h}" pos="0 {hy - 0.0025} {h}" {wall}/>
      <body name="drawer" pos="0 0 0">
        <joint name="drawer" type="slide" axis="0 -1 0" range="0 {DRAWER_TRAVEL}" damping="4" frictionloss="0.3"
               armature="0.05"/>
        <geom type="box" size="0.07 0.07 0.0025" pos="0 {front + 0.075} 0.01" rgba="0.80 0.62 0.40 1" mass="0.2"/>
        <geom type="box" size="0.0025 0.07 0.022" pos="-0.0675 {front + 0.075} 0.032" rgba="0.80 0.62 0.40 1"/>
        <geom type="box" size="0.0025 0.07 0.022" pos="0.0675 {front + 0.075} 0.032" rgba="0.80 0.62 0.40 1"/>
        <geom type="box" size="0.07 0.0025 0.022" pos="0 {front + 0.145} 0.032" rgba="0.80 0.62 0.40 1"/>
        <geom name="drawer_front" type="box" size="0.075 0.0025 0.03" pos="0 {front + 0.0025} 0.033"
              rgba="0.62 0.40 0.22 1"/>
        <geom name="handle" type="capsule" fromto="-0.05 {HANDLE_Y - cy} {HANDLE_Z} 0.05 {HANDLE_Y - cy} {HANDLE_Z}"
              size="0.005" rgba="0.75 0.75 0.78 1"/>
        <geom type="box" size="0.004 {(CABINET_FRONT_Y - HANDLE_Y) / 2} 0.004"
              pos="-0.05 {(CABINET_FRONT_Y + HANDLE_Y) / 2 - cy} {HANDLE_Z}" rgba="0.75 0.75 0.78 1"/>
        <geom type="box" size="0.004 {(CABINET_FRONT_Y - HANDLE_Y) / 2} 0.004"
              pos="0.05 {(CABINET_FRONT_Y + HANDLE_Y) / 2 - cy} {HANDLE_Z}" rgba="0.75 0.75 0.78 1"/>
        <site name="handle" pos="0 {HANDLE_Y - cy} {HANDLE_Z}" size="0.004" rgba="1 1 0 0"/>
      </body>
    </body>"""


def _hand() -> str:
    # Fingers slide along the hand's y axis; joint value = distance of the pad's inner face
    # from the centre line, so the opening is readable straight from qpos.
    finger = (
        'type="box" size="0.022 0.005 0.022" friction="1.5 0.02 0.002" condim="4" '
        'rgba="0.25 0.25 0.28 1" mass="0.02"'
    )
    lo, hi = JOINT_RANGE["tool_roll"]
    return f"""
                <body name="gripper" gravcomp="1" pos="0 0 {-WRIST_TO_TCP}">
                  <joint name="tool_roll" axis="0 0 1" range="{lo} {hi}"/>
                  <site name="tcp" size="0.006" rgba="1 1 0 0"/>
                  <geom name="palm" type="box" size="0.02 0.06 0.01" pos="0 0 0.045" rgba="0.35 0.35 0.38 1"
                        mass="0.3"/>
                  <geom name="flange" type="cylinder" size="0.03 0.05" pos="0 0 0.105" rgba="0.6 0.6 0.62 1"
                        mass="0.2" contype="0" conaffinity="0"/>
                  <camera name="wrist" pos="0 0 0.03" xyaxes="1 0 0 0 1 0" fovy="75"/>
                  <body name="finger_left" gravcomp="1">
                    <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="30"/>
                    <geom name="finger_left" {finger} pos="0 0.005 0.012"/>
                  </body>
                  <body name="finger_right" gravcomp="1">
                    <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="30"/>
                    <geom name="finger_right" {finger} pos="0 -0.005 0.012"/>
                  </body>
                </body>"""


def _arm() -> str:
    r = JOINT_RANGE
    link = 'contype="0" conaffinity="0"'  # links are visual only: cheaper, and they stay above the table
    grey, dark = 'rgba="0.85 0.85 0.87 1"', 'rgba="0.25 0.27 0.30 1"'
    x, y, _ = ARM_BASE
    return f"""
    <geom name="pedestal" type="box" size="0.09 0.09 0.375" pos="{x} {y} -0.375" rgba="0.3 0.3 0.33 1"/>
    <body name="arm_base" pos="{x} {y} 0" childclass="arm">
      <geom type="cylinder" size="0.07 0.03" pos="0 0 0.03" {dark} {link}/>
      <body name="link_pan" gravcomp="1" pos="0 0 0.06">
        <joint name="pan" axis="0 0 1" range="{r['pan'][0]} {r['pan'][1]}"/>
        <geom type="cylinder" size="0.055 0.05" pos="0 0 0.05" {grey} {link} mass="2"/>
        <body name="link_upper" gravcomp="1" pos="0 0 {SHOULDER_HEIGHT - 0.06}">
          <joint name="shoulder" axis="1 0 0" range="{r['shoulder'][0]} {r['shoulder'][1]}"/>
          <geom type="capsule" fromto="0 0 0 0 {-UPPER_ARM} 0" size="0.04" {grey} {link} mass="1.5"/>
          <geom type="cylinder" fromto="-0.05 0 0 0.05 0 0" size="0.05" {dark} {link} mass="0.2"/>
          <body name="link_fore" gravcomp="1" pos="0 {-UPPER_ARM} 0">
            <joint name="elbow" axis="1 0 0" range="{r['elbow'][0]} {r['elbow'][1]}"/>
            <geom type="cylinder" fromto="-0.045 0 0 0.045 0 0" size="0.042" {dark} {link} mass="0.2"/>
            <geom type="capsule" fromto="0 0 0 0 {-FOREARM + 0.05} 0" size="0.032" {grey} {link} mass="0.8"/>
            <body name="link_roll" gravcomp="1" pos="0 {-FOREARM} 0">
              <joint name="forearm_roll" axis="0 1 0" range="{r['forearm_roll'][0]} {r['forearm_roll'][1]}"/>
              <geom type="cylinder" fromto="0 0.05 0 0 0.0 0" size="0.03" {dark} {link} mass="0.2"/>
              <body name="link_wrist" gravcomp="1" pos="0 0 0">
                <joint name="wrist_pitch" axis="1 0 0" range="{r['wrist_pitch'][0]} {r['wrist_pitch'][1]}"/>
                <geom type="cylinder" fromto="-0.035 0 0 0.035 0 0" size="0.03" {grey} {link} mass="0.2"/>
{_hand()}
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>"""


def _actuators() -> str:
    lines = [
        f'    <position name="{j}" joint="{j}" kp="{kp}" kv="{2 * np.sqrt(kp) * 1.0:.1f}" '
        f'ctrlrange="{JOINT_RANGE[j][0]} {JOINT_RANGE[j][1]}"/>'
        for j, kp in zip(ARM_JOINTS, JOINT_KP)
    ]
    lines += [
        f'    <position name="finger_{s}" joint="finger_{s}" kp="400" ctrlrange="0 {FINGER_OPEN}"/>'
        for s in ("left", "right")
    ]
    return "\n".join(lines)


def build_mjcf() -> str:
    return f"""
<mujoco model="tabletop">
  <compiler angle="radian" autolimits="true"/>
  <!-- elliptic cones + high impratio: stiff friction, so a grasped block does not creep out of the pads -->
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <headlight ambient="0.38 0.38 0.38" diffuse="0.42 0.42 0.42" specular="0 0 0"/>
    <!-- no multisampling: 2-3x faster software (llvmpipe) rendering at 64-128 px -->
    <quality shadowsize="1024" offsamples="0"/>
  </visual>
  <default>
    <default class="arm">
      <joint damping="5" armature="0.05"/>
    </default>
  </default>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.82 0.80 0.76" rgb2="0.76 0.74 0.70"
             width="256" height="256"/>
    <material name="tabletop" texture="grid" texrepeat="6 6"/>
  </asset>
  <worldbody>
    <light name="key" pos="0.3 -0.4 1.2" dir="-0.25 0.35 -1" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.75" rgba="0.3 0.3 0.33 1"/>
    <geom name="table" type="box" size="0.4 0.36 0.02" pos="0 0.02 -0.02" material="tabletop"
          friction="0.6 0.005 0.0001"/>
    <camera name="front" pos="0 -0.78 0.62" xyaxes="1 0 0 0 0.62 0.785" fovy="31"/>
{_arm()}
{_objects()}
{_tray()}
{_pads()}
{_lamp()}
{_go_bar()}
{_cabinet()}
  </worldbody>
  <contact>
    <exclude body1="finger_left" body2="finger_right"/>
    <exclude body1="cabinet" body2="drawer"/>
  </contact>
  <actuator>
{_actuators()}
  </actuator>
</mujoco>
"""
