"""Dataset standardisations: where a dataset keeps the policy's inputs, and how its action becomes a vector.

An entry names, by paths inside an RLDS step (e.g. 'observation/image_0'): the camera(s), the instruction
(text, or UTF-8 code points as language_table stores it), an optional precomputed instruction embedding,
optional proprio, and the action: either one float vector key, or a dict action flattened into a vector
in the order of `action_fields` (a `discrete` field is a one-hot vector and becomes one value, the index
of its hot entry, as RT-1's action tokenizer reads it). Built-in entries cover our tabletop and
Meta-World datasets, Bridge, RT-1's fractal20220817_data and language_table; users add theirs in YAML:

    my_robot:                       # entry name (what data.standardization selects)
      match: [my_robot_dataset]     # TFDS dataset names that select this entry under "auto"
      cameras: [observation/front, observation/wrist]
      instruction: language_instruction
      proprio: observation/state    # optional
      action: action                # a float vector ...
      action_names: [x, y, z, gripper]
      action_low: [-1, -1, -1, 0]
      action_high: [1, 1, 1, 1]

See docs/DATA.md for every key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.action_interface import action_interface
from common.yaml_files import YamlFileError, parse_yaml, short_repr


class StandardizationError(ValueError):
    """A standardisation entry that cannot be used; the message names the entry and the key."""


ENTRY_KEYS = {
    "description": "free text",
    "match": "TFDS dataset names this entry serves under standardization 'auto'",
    "match_env": "values of the 'env' field in our sidecar (policy_stack.json) this entry serves",
    "cameras": "step keys of camera images; the first is the default camera",
    "instruction": "step key of the instruction",
    "instruction_encoding": "'text' (a string feature) or 'codepoints' (int array of UTF-8 code points, 0-padded)",
    "instruction_embedding": "optional step key of a precomputed instruction embedding (float vector)",
    "proprio": "optional step key of proprioception (float vector)",
    "action": "step key of the action: a float vector, or a dict when action_fields is given",
    "action_fields": "for dict actions: list of {key, size, low, high, discrete} flattened in this order",
    "action_names": "one name per action dimension (vector actions)",
    "action_low": "lower bound per action dimension (vector actions)",
    "action_high": "upper bound per action dimension (vector actions)",
}
FIELD_KEYS = {"key", "size", "low", "high", "discrete"}
@dataclass(frozen=True)
class ActionFieldSpec:
    key: str
    size: int
    low: float | tuple[float, ...] = -1.0
    high: float | tuple[float, ...] = 1.0
    discrete: bool = False  # one-hot of `size` classes -> one value (the class index)

    @property
    def dim(self) -> int:
        return 1 if self.discrete else self.size

    def names(self) -> list[str]:
        return [self.key] if self.discrete else [f"{self.key}_{i}" for i in range(self.size)]

    def bounds(self) -> tuple[list[float], list[float]]:
        if self.discrete:
            return [0.0], [float(self.size - 1)]
        lo = [float(v) for v in (self.low if isinstance(self.low, tuple) else (self.low,) * self.size)]
        hi = [float(v) for v in (self.high if isinstance(self.high, tuple) else (self.high,) * self.size)]
        return lo, hi


@dataclass(frozen=True)
class Standardization:
    name: str
    cameras: tuple[str, ...]
    instruction: str
    action: str = "action"
    instruction_encoding: str = "text"
    instruction_embedding: str | None = None
    proprio: str | None = None
    action_fields: tuple[ActionFieldSpec, ...] = ()
    action_names: tuple[str, ...] | None = None
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None
    match: tuple[str, ...] = ()
    match_env: tuple[str, ...] = ()
    description: str = ""

    @property
    def is_dict_action(self) -> bool:
        return bool(self.action_fields)

    def flat_action_names(self) -> list[str] | None:
        if self.action_fields:
            return [n for f in self.action_fields for n in f.names()]
        return list(self.action_names) if self.action_names else None

    def flat_action_bounds(self) -> tuple[list[float], list[float]] | None:
        if self.action_fields:
            lo, hi = [], []
            for f in self.action_fields:
                a, b = f.bounds()
                lo += a
                hi += b
            return lo, hi
        if self.action_low is not None and self.action_high is not None:
            return list(self.action_low), list(self.action_high)
        return None


def _fail(entry: str, key: str, expected: str, got: Any) -> StandardizationError:
    return StandardizationError(f"standardization entry {short_repr(entry)}, key {key!r}: expected {expected}, "
                                f"got {short_repr(got)}")


def _str_list(entry: str, key: str, v: Any, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v) or (not v and not allow_empty):
        raise _fail(entry, key, "a non-empty list of strings", v)
    return tuple(v)


def _float_list(entry: str, key: str, v: Any) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise _fail(entry, key, "a list of numbers", v)
    return tuple(float(x) for x in v)


def _opt_str(entry: str, key: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise _fail(entry, key, "a step key such as 'observation/state'", v)
    return v


def _field(entry: str, i: int, d: Any) -> ActionFieldSpec:
    where = f"action_fields[{i}]"
    if not isinstance(d, Mapping):
        raise _fail(entry, where, "a mapping {key, size, low, high, discrete}", d)
    unknown = sorted(set(d) - FIELD_KEYS, key=str)  # key=str: YAML keys may be numbers
    if unknown:
        raise StandardizationError(f"standardization entry {short_repr(entry)}, key {where}: unknown key "
                                   f"{short_repr(unknown[0])} (expected some of {sorted(FIELD_KEYS)})")
    if not isinstance(d.get("key"), str) or not d["key"]:
        raise _fail(entry, f"{where}.key", "a field name such as 'world_vector'", d.get("key"))
    size = d.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _fail(entry, f"{where}.size", "an integer >= 1", size)
    bounds = {}
    for b, default in (("low", -1.0), ("high", 1.0)):
        v = d.get(b, default)
        if isinstance(v, (list, tuple)):
            v = _float_list(entry, f"{where}.{b}", v)
            if len(v) != size:
                raise _fail(entry, f"{where}.{b}", f"{size} values (the field's size)", list(v))
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _fail(entry, f"{where}.{b}", "a number or one per dimension", v)
        else:
            v = float(v)
        bounds[b] = v
    discrete = d.get("discrete", False)
    if not isinstance(discrete, bool):
        raise _fail(entry, f"{where}.discrete", "true or false", discrete)
    return ActionFieldSpec(d["key"], size, bounds["low"], bounds["high"], discrete)


def entry_from_dict(name: str, d: Any) -> Standardization:
    """Validate one entry (a mapping of ENTRY_KEYS) into a Standardization."""
    if not isinstance(name, str) or not name:
        raise StandardizationError("standardization entry name: expected a non-empty string, "
                                   f"got {short_repr(name)}")
    if not isinstance(d, Mapping):
        raise _fail(name, "<entry>", "a mapping of " + ", ".join(ENTRY_KEYS), d)
    unknown = sorted(set(d) - set(ENTRY_KEYS), key=str)
    if unknown:
        raise StandardizationError(f"standardization entry {short_repr(name)}: unknown key "
                                   f"{short_repr(unknown[0])} (expected some of {sorted(ENTRY_KEYS)})")
    for required in ("cameras", "instruction"):
        if required not in d:
            raise StandardizationError(f"standardization entry {short_repr(name)}: missing key {required!r} "
                                       f"({ENTRY_KEYS[required]})")
    enc = d.get("instruction_encoding", "text")
    if enc not in ("text", "codepoints"):
        raise _fail(name, "instruction_encoding", "'text' or 'codepoints'", enc)
    fields = d.get("action_fields") or ()
    if fields and not isinstance(fields, (list, tuple)):
        raise _fail(name, "action_fields", "a list of {key, size, low, high, discrete}", fields)
    fields = tuple(_field(name, i, f) for i, f in enumerate(fields))
    names = _str_list(name, "action_names", d["action_names"]) if d.get("action_names") is not None else None
    low = _float_list(name, "action_low", d["action_low"]) if d.get("action_low") is not None else None
    high = _float_list(name, "action_high", d["action_high"]) if d.get("action_high") is not None else None
    if fields and (names or low or high):
        raise StandardizationError(f"standardization entry {short_repr(name)}: action_names/action_low/action_high "
                                   "are for vector actions; a dict action takes its names and bounds from "
                                   "action_fields")
    if (low is None) != (high is None) or (low is not None and len(low) != len(high)):
        raise _fail(name, "action_low/action_high", "both given, with the same length", (low, high))
    if names is not None and low is not None and len(names) != len(low):
        raise _fail(name, "action_names", f"{len(low)} names (one per bound)", list(names))
    desc = d.get("description", "")
    if not isinstance(desc, str):
        raise _fail(name, "description", "a string", desc)
    return Standardization(
        name=name, cameras=_str_list(name, "cameras", d["cameras"]),
        instruction=_opt_str(name, "instruction", d["instruction"]) or "",
        action=_opt_str(name, "action", d.get("action", "action")) or "action",
        instruction_encoding=enc,
        instruction_embedding=_opt_str(name, "instruction_embedding", d.get("instruction_embedding")),
        proprio=_opt_str(name, "proprio", d.get("proprio")),
        action_fields=fields, action_names=names, action_low=low, action_high=high,
        match=_str_list(name, "match", d.get("match", []), allow_empty=True),
        match_env=_str_list(name, "match_env", d.get("match_env", []), allow_empty=True),
        description=desc)


# -- built-in entries (the same schema a user's YAML uses) -------------------------------------------
def _ours(family: str) -> dict[str, Any]:
    """The action part of an entry for datasets our `collect` writes: names and bounds from the env's interface."""
    act = action_interface(family)
    return {"action": "action", "action_names": list(act.names), "action_low": list(act.low),
            "action_high": list(act.high)}


BUILTIN: dict[str, dict[str, Any]] = {
    "tabletop": {
        "description": "our MuJoCo tabletop suite, written by `collect`",
        "match_env": ["tabletop"], "cameras": ["observation/image"], "instruction": "observation/instruction",
        "proprio": "observation/state", **_ours("tabletop"),
    },
    "metaworld": {
        "description": "Meta-World tasks written by `collect --env metaworld-mt10|mt50` (our 5-d action: "
                       "Meta-World's 4 and terminate)",
        "match_env": ["metaworld-mt10", "metaworld-mt50"], "cameras": ["observation/image"], "instruction": "observation/instruction",
        "proprio": "observation/state", **_ours("metaworld"),
    },
    "bridge": {
        "description": "BridgeData V2 (WidowX) in Open X-Embodiment RLDS",
        "match": ["bridge", "bridge_dataset", "bridge_data_v2"],
        "cameras": ["observation/image_0", "observation/image_1", "observation/image_2", "observation/image_3"],
        "instruction": "language_instruction", "instruction_embedding": "language_embedding",
        "proprio": "observation/state", "action": "action",
        "action_names": ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
        "action_low": [-1, -1, -1, -math.pi, -math.pi, -math.pi, 0], "action_high": [1, 1, 1, math.pi, math.pi, math.pi, 1],
    },
    "fractal20220817_data": {
        "description": "RT-1's robot data (Open X-Embodiment); dict action in RT-1's token order (11 values)",
        "match": ["fractal20220817_data"],
        "cameras": ["observation/image"], "instruction": "observation/natural_language_instruction",
        "instruction_embedding": "observation/natural_language_embedding",
        "proprio": None, "action": "action",
        "action_fields": [
            {"key": "terminate_episode", "size": 3, "discrete": True},
            {"key": "world_vector", "size": 3, "low": -1.0, "high": 1.0},
            {"key": "rotation_delta", "size": 3, "low": -math.pi / 2, "high": math.pi / 2},
            {"key": "gripper_closedness_action", "size": 1, "low": -1.0, "high": 1.0},
            {"key": "base_displacement_vertical_rotation", "size": 1, "low": -math.pi, "high": math.pi},
            {"key": "base_displacement_vector", "size": 2, "low": -1.0, "high": 1.0},
        ],
    },
    "language_table": {
        "description": "Language-Table (2-d end-effector deltas; instruction as UTF-8 code points)",
        "match": ["language_table", "language_table_sim"],
        "cameras": ["observation/rgb"], "instruction": "observation/instruction", "instruction_encoding": "codepoints",
        "proprio": "observation/effector_translation", "action": "action",
        "action_names": ["dx", "dy"], "action_low": [-0.1, -0.1], "action_high": [0.1, 0.1],
    },
}


def load_registry(extra: str | Path | Mapping[str, Any] | None = None) -> dict[str, Standardization]:
    """Built-in entries plus a user's (a YAML file path or a mapping name -> entry); users' entries win."""
    raw: dict[str, Any] = dict(BUILTIN)
    if extra is not None:
        if isinstance(extra, (str, Path)):
            p = Path(extra)
            if not p.is_file():
                raise StandardizationError(f"data.standardization {str(p)!r}: expected a YAML file of entries, "
                                           "found nothing there")
            try:  # refuses alias bombs before anything is built (common/yaml_files.py)
                extra = parse_yaml(p.read_text(), f"data.standardization {str(p)!r}")
            except YamlFileError as exc:
                raise StandardizationError(str(exc)) from None
        if not isinstance(extra, Mapping) or not extra:
            raise StandardizationError(f"standardization entries: expected a mapping name -> entry, "
                                       f"got {short_repr(extra)}")
        raw.update(extra)
    return {n: entry_from_dict(n, d) for n, d in raw.items()}


def is_entry_file(value: str) -> bool:
    return value.endswith((".yaml", ".yml"))


def select(value: str | Standardization, dataset_name: str, sidecar: Mapping[str, Any],
           feature_keys: Sequence[str], where: str) -> Standardization:
    """Resolve data.standardization ('auto', an entry name, or a YAML file: its single entry, or the one that
    matches) for a dataset. `where` names the dataset in errors."""
    if isinstance(value, Standardization):
        return value
    if not isinstance(value, str) or not value:
        raise StandardizationError("data.standardization: expected 'auto', an entry name or a YAML file, "
                                   f"got {short_repr(value)}")
    user = None
    if is_entry_file(value):
        user = load_registry(value)
        own = [n for n in user if n not in BUILTIN or user[n] != entry_from_dict(n, BUILTIN[n])]
        reg = user
        if len(own) == 1:
            return reg[own[0]]
        candidates = [reg[n] for n in own]
    else:
        reg = load_registry()
        if value != "auto":
            if value not in reg:
                raise StandardizationError(f"data.standardization: unknown entry {value!r} for {where}; "
                                           f"known: {sorted(reg)} (or 'auto', or a YAML file of entries)")
            return reg[value]
        candidates = list(reg.values())
    env = str(sidecar.get("env", "")) if sidecar else ""
    for s in candidates:
        if env and env in s.match_env:
            return s
    for s in candidates:
        if dataset_name in s.match:
            return s
    # Unknown name: the first entry whose keys the dataset has (e.g. a renamed copy of Bridge).
    keys = set(feature_keys)
    for s in candidates:
        if s.cameras[0] in keys and s.instruction in keys and (s.action in keys or any(
                k.startswith(s.action + "/") for k in keys)):
            return s
    raise StandardizationError(
        f"data.standardization 'auto': no entry matches {where} (TFDS name {dataset_name!r}, env {env or None!r}); "
        f"known entries: {sorted(reg)}; name one, or add an entry in a YAML file (docs/DATA.md)")


def from_keys(camera: str, instruction: str, proprio: str | None, action: str = "action",
              base: Standardization | None = None) -> Standardization:
    """An ad-hoc entry from explicit keys (our own datasets read with data.camera / proprio_key / instruction_key:
    datasets/training_inputs.config_keys_entry)."""
    names = base.action_names if base and base.action == action and not base.action_fields else None
    low = base.action_low if names else None
    high = base.action_high if names else None
    return Standardization(name=base.name if base else "custom", cameras=(camera,), instruction=instruction,
                           proprio=proprio, action=action, action_names=names, action_low=low, action_high=high,
                           instruction_embedding=None)


__all__ = ["ActionFieldSpec", "BUILTIN", "ENTRY_KEYS", "Standardization", "StandardizationError",
           "entry_from_dict", "from_keys", "load_registry", "select"]
