"""RT-1's action tokenizer: each action dimension is clipped to its bounds and cut into `bins` bins.

tokenize:   int((a - low) / (high - low) * (bins - 1))   (truncation, as in RT-1)
detokenize: token / (bins - 1) * (high - low) + low

Both in float32, in the reference's order of operations (google-research/robotics_transformer,
tokenizers/action_tokenizer.py: clip, subtract, divide by the float32 range, multiply by bins - 1,
cast to int), so `tokenization="rt1"` (the default) gives the reference's token for every value, bin
edges included (tests/policy/test_fidelity_rt1.py). A bin edge e_k = detokenize(k) then tokenizes to k
or, where float rounding puts it just below, to k - 1 (RT-1 does the same: 63 of the 256 edges of
[-1, 1], 39 of [-pi/2, pi/2] and of [-pi, pi], none of [0, 1]). `tokenization="edge_safe"` (our earlier
default) adds 1e-4 of a bin before truncating, so that tokenize(detokenize(k)) == k for every k; it
differs from RT-1 only for values within 1e-4 of a bin below an edge.

DictActionTokenizer does the same for Open X-Embodiment dict actions (RT-1's RT1ActionTokenizer): one
token per continuous dimension and one per discrete one-hot field (see RT1_FRACTAL_FIELDS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from policy.config import ACTION_TOKENIZATIONS

# Written by code that predates the option (tokenizer files without "tokenization") and what it did.
_LEGACY_TOKENIZATION = "edge_safe"
_EDGE_SAFE_OFFSET = 1e-4  # of a bin, "edge_safe" only


def _check_tokenization(tokenization: str) -> str:
    if tokenization not in ACTION_TOKENIZATIONS:
        raise ValueError(f"action tokenization: expected one of {list(ACTION_TOKENIZATIONS)}, got {tokenization!r}")
    return tokenization


class ActionTokenizer:
    def __init__(self, low: Sequence[float], high: Sequence[float], bins: int = 256,
                 names: Sequence[str] | None = None, tokenization: str = "rt1"):
        low_a = np.asarray(low, dtype=np.float64).reshape(-1)
        high_a = np.asarray(high, dtype=np.float64).reshape(-1)
        if low_a.shape != high_a.shape or low_a.size == 0:
            raise ValueError(f"action bounds: expected low and high of equal non-zero length, got "
                             f"{low_a.size} and {high_a.size}")
        if not np.all(np.isfinite(low_a)) or not np.all(np.isfinite(high_a)):
            raise ValueError(f"action bounds: expected finite values, got low={low_a.tolist()} high={high_a.tolist()}")
        # A constant dimension (high == low) is widened so that it still tokenises and round-trips.
        same = high_a <= low_a
        high_a = np.where(same, low_a + 1e-6, high_a)
        if bins < 2:
            raise ValueError(f"action bins: expected >= 2, got {bins}")
        self.low = low_a.astype(np.float32)
        self.high = high_a.astype(np.float32)
        self.bins = int(bins)
        self.tokenization = _check_tokenization(tokenization)
        self.names = tuple(names) if names is not None else tuple(f"action_{i}" for i in range(low_a.size))
        if len(self.names) != low_a.size:
            raise ValueError(f"action names: expected {low_a.size} names, got {len(self.names)}")

    @property
    def num_dims(self) -> int:
        return int(self.low.size)

    @property
    def num_tokens(self) -> int:
        """One token per dimension (the same attribute as DictActionTokenizer's)."""
        return self.num_dims

    def tokenize(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        a = torch.as_tensor(actions, dtype=torch.float32)
        if a.shape[-1] != self.num_dims:
            raise ValueError(f"action: expected last dimension {self.num_dims}, got shape {tuple(a.shape)}")
        low = torch.as_tensor(self.low, device=a.device)
        high = torch.as_tensor(self.high, device=a.device)
        a = torch.minimum(torch.maximum(a, low), high)  # tf.clip_by_value(a, minimum, maximum)
        # RT-1, in float32: tf.cast((a - minimum) / (maximum - minimum) * (vocab_size - 1), tf.int32); the
        # cast truncates toward zero, as .to(int64) does (the clipped value is never negative).
        scaled = (a - low) / (high - low) * (self.bins - 1)
        if self.tokenization == "edge_safe":
            scaled = scaled + _EDGE_SAFE_OFFSET  # keeps detokenised values (bin edges) in their own bin
        return scaled.to(torch.int64).clamp_(0, self.bins - 1)

    def detokenize(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(tokens).to(torch.float32)
        low = torch.as_tensor(self.low, device=t.device)
        high = torch.as_tensor(self.high, device=t.device)
        return t / (self.bins - 1) * (high - low) + low

    def to_dict(self) -> dict:
        return {"kind": "vector", "low": self.low.tolist(), "high": self.high.tolist(), "bins": self.bins,
                "names": list(self.names), "tokenization": self.tokenization}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionTokenizer":
        if d.get("kind", "vector") != "vector":
            raise ValueError(f"action tokenizer: expected kind 'vector', got {d.get('kind')!r}")
        return cls(d["low"], d["high"], d["bins"], d.get("names"), d.get("tokenization", _LEGACY_TOKENIZATION))


# --------------------------------------------------------------------------------------------------
# Dict actions (Open X-Embodiment / RLDS): one token per continuous dimension, one per discrete field.
# --------------------------------------------------------------------------------------------------

def _bound(v, name: str, what: str, size: int):
    """A bound is a float or a sequence of `size` floats; stored as float or tuple (hashable)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = tuple(float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1))
        if len(vals) != size:
            raise ValueError(f"action field '{name}': expected {what} of length {size}, got {len(vals)}")
        return vals
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"action field '{name}': expected {what} to be a number or a sequence of {size} "
                         f"numbers, got {v!r}") from None


@dataclass(frozen=True)
class ActionField:
    """One entry of a dict action, e.g. ActionField("world_vector", 3, -1.0, 1.0).

    Continuous fields give `size` tokens, bucketed between `low` and `high` (a float, or one per dimension).
    A discrete field is a one-hot vector of `size` classes (e.g. RT-1's terminate_episode): it gives one
    token, the index of the hot entry; `low`/`high` are kept for the record only (RT-1 uses 0 and 1).
    """
    name: str
    size: int
    low: float | tuple[float, ...]
    high: float | tuple[float, ...]
    discrete: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"action field: expected a non-empty name, got {self.name!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"action field '{self.name}': expected size >= 1, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "discrete", bool(self.discrete))
        low = _bound(self.low, self.name, "low", self.size)
        high = _bound(self.high, self.name, "high", self.size)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        lo = np.broadcast_to(np.asarray(low, dtype=np.float64), (self.size,))
        hi = np.broadcast_to(np.asarray(high, dtype=np.float64), (self.size,))
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ValueError(f"action field '{self.name}': expected finite bounds, got low={low} high={high}")
        if np.any(hi < lo):
            raise ValueError(f"action field '{self.name}': expected low <= high, got low={low} high={high}")

    @property
    def num_tokens(self) -> int:
        return 1 if self.discrete else self.size

    def token_names(self) -> tuple[str, ...]:
        return (self.name,) if self.discrete else tuple(f"{self.name}_{i}" for i in range(self.size))

    def to_dict(self) -> dict:
        b = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {"name": self.name, "size": self.size, "low": b(self.low), "high": b(self.high),
                "discrete": self.discrete}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionField":
        return cls(d["name"], d["size"], d["low"], d["high"], d.get("discrete", False))


# RT-1's fractal20220817_data action spec, in RT-1's token order (11 tokens).
RT1_FRACTAL_FIELDS: tuple[ActionField, ...] = (
    ActionField("terminate_episode", 3, 0.0, 1.0, discrete=True),
    ActionField("world_vector", 3, -1.0, 1.0),
    ActionField("rotation_delta", 3, -math.pi / 2, math.pi / 2),
    ActionField("gripper_closedness_action", 1, -1.0, 1.0),
    ActionField("base_displacement_vertical_rotation", 1, -math.pi, math.pi),
    ActionField("base_displacement_vector", 2, -1.0, 1.0),
)


class DictActionTokenizer:
    """RT-1's action tokenizer for dict actions.

    Tokens follow the order of `fields`. Continuous dimensions use exactly ActionTokenizer's formula
    (clip to bounds, truncate (a - low) / (high - low) * (bins - 1), `tokenization` as there); a discrete
    one-hot field of size k gives one token, its argmax, and needs bins >= k. Inputs may carry any leading
    batch dims, which must be the same for every field; keys not in `fields` are ignored.
    """

    def __init__(self, fields: Sequence[ActionField], bins: int = 256, tokenization: str = "rt1"):
        fields = tuple(fields)
        if not fields:
            raise ValueError("action fields: expected at least one field, got none")
        for f in fields:
            if not isinstance(f, ActionField):
                raise ValueError(f"action fields: expected ActionField entries, got {type(f).__name__}")
        seen: set[str] = set()
        for f in fields:
            if f.name in seen:
                raise ValueError(f"action field '{f.name}': expected unique field names, got it twice")
            seen.add(f.name)
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
            raise ValueError(f"action bins: expected an integer >= 2, got {bins!r}")
        for f in fields:
            if f.discrete and bins < f.size:
                raise ValueError(f"action field '{f.name}': discrete field of size {f.size} needs bins >= "
                                 f"{f.size}, got bins={bins}")
        self.fields = fields
        self.bins = int(bins)
        self.tokenization = _check_tokenization(tokenization)
        self.names = tuple(n for f in fields for n in f.token_names())
        # Continuous dimensions share one ActionTokenizer, so the formula is the same by construction.
        lows, highs, names = [], [], []
        for f in fields:
            if not f.discrete:
                lows += np.broadcast_to(np.asarray(f.low, dtype=np.float64), (f.size,)).tolist()
                highs += np.broadcast_to(np.asarray(f.high, dtype=np.float64), (f.size,)).tolist()
                names += f.token_names()
        self._cont = ActionTokenizer(lows, highs, self.bins, names, self.tokenization) if lows else None
        # Token columns of each field, and of all continuous dims (in order).
        self._slices: dict[str, slice] = {}
        start = 0
        cont_idx: list[int] = []
        for f in fields:
            self._slices[f.name] = slice(start, start + f.num_tokens)
            if not f.discrete:
                cont_idx += list(range(start, start + f.num_tokens))
            start += f.num_tokens
        self._cont_idx = cont_idx

    @property
    def num_tokens(self) -> int:
        return len(self.names)

    # ---- validation ------------------------------------------------------------------------------
    def _get(self, actions: Mapping, f: ActionField) -> torch.Tensor:
        if not isinstance(actions, Mapping):
            raise ValueError(f"action: expected a dict of fields {[g.name for g in self.fields]}, got "
                             f"{type(actions).__name__}")
        if f.name not in actions:
            raise ValueError(f"action field '{f.name}': missing; expected keys {[g.name for g in self.fields]}, "
                             f"got {sorted(map(str, actions.keys()))}")
        v = actions[f.name]
        try:
            t = torch.as_tensor(v) if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        except (TypeError, ValueError) as e:
            raise ValueError(f"action field '{f.name}': expected a numeric array, got {type(v).__name__} "
                             f"({e})") from None
        if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or _is_int(t)):
            raise ValueError(f"action field '{f.name}': expected a numeric array, got dtype {t.dtype}")
        if t.dim() == 0 or t.shape[-1] != f.size:
            raise ValueError(f"action field '{f.name}': expected last dimension {f.size}, got shape "
                             f"{tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)].flatten()[:3].tolist()
            raise ValueError(f"action field '{f.name}': expected finite values, got {bad}")
        return t

    def _collect(self, actions: Mapping) -> list[torch.Tensor]:
        ts = [self._get(actions, f) for f in self.fields]
        lead = tuple(ts[0].shape[:-1])
        for f, t in zip(self.fields, ts):
            if tuple(t.shape[:-1]) != lead:
                raise ValueError(f"action field '{f.name}': expected leading dims {lead} (as "
                                 f"'{self.fields[0].name}'), got shape {tuple(t.shape)}")
        return ts

    def _argmax_one_hot(self, f: ActionField, t: torch.Tensor) -> torch.Tensor:
        x = t.to(torch.float64)
        ok = ((x == 0) | (x == 1)).all(dim=-1) & (x.sum(dim=-1) == 1)
        if not bool(ok.all()):
            row = x.reshape(-1, f.size)[~ok.reshape(-1)][0]
            shown = [int(v) if float(v).is_integer() else float(v) for v in row.tolist()]
            raise ValueError(f"action field '{f.name}': expected a one-hot vector of size {f.size}, got {shown}")
        return x.argmax(dim=-1)

    # ---- flat float vectors ------------------------------------------------------------------------
    def flatten(self, actions: Mapping) -> torch.Tensor:
        """dict -> float32 [..., num_tokens]: continuous values as given (not clipped), discrete as index."""
        cols = []
        for f, t in zip(self.fields, self._collect(actions)):
            if f.discrete:
                cols.append(self._argmax_one_hot(f, t).to(torch.float32).unsqueeze(-1))
            else:
                cols.append(t.to(torch.float32))
        device = cols[0].device
        return torch.cat([c.to(device) for c in cols], dim=-1)

    def unflatten(self, flat: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """float [..., num_tokens] -> dict; discrete indices (rounded) become int32 one-hots."""
        x = torch.as_tensor(flat)
        if x.dim() == 0 or x.shape[-1] != self.num_tokens:
            raise ValueError(f"flat action: expected last dimension {self.num_tokens}, got shape {tuple(x.shape)}")
        out = {}
        for f in self.fields:
            col = x[..., self._slices[f.name]]
            if f.discrete:
                out[f.name] = self._one_hot(f, torch.round(col[..., 0].to(torch.float64)).to(torch.int64))
            else:
                out[f.name] = col.to(torch.float32)
        return out

    @staticmethod
    def _one_hot(f: ActionField, idx: torch.Tensor) -> torch.Tensor:
        # As RT-1: an out-of-range index (a poor model's output) becomes the default class 0.
        idx = torch.where((idx < 0) | (idx >= f.size), torch.zeros_like(idx), idx)
        return torch.nn.functional.one_hot(idx, f.size).to(torch.int32)

    # ---- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, actions: Mapping) -> torch.Tensor:
        """dict of [..., size] arrays -> int64 tokens [..., num_tokens]."""
        ts = self._collect(actions)
        device = ts[0].device
        lead = tuple(ts[0].shape[:-1])
        tokens = torch.empty(lead + (self.num_tokens,), dtype=torch.int64, device=device)
        cont = []
        for f, t in zip(self.fields, ts):
            if f.discrete:
                tokens[..., self._slices[f.name]] = self._argmax_one_hot(f, t).to(device).unsqueeze(-1)
            else:
                cont.append(t.to(device=device, dtype=torch.float32))
        if cont:
            tokens[..., self._cont_idx] = self._cont.tokenize(torch.cat(cont, dim=-1))
        return tokens

    def detokenize(self, tokens: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """int tokens [..., num_tokens] -> dict: float32 values at bin edges, int32 one-hots."""
        t = torch.as_tensor(tokens)
        if t.dim() == 0 or t.shape[-1] != self.num_tokens:
            raise ValueError(f"action tokens: expected last dimension {self.num_tokens}, got shape {tuple(t.shape)}")
        if t.is_floating_point():
            t = torch.round(t)
        t = t.to(torch.int64)
        out: dict[str, torch.Tensor] = {}
        cont = self._cont.detokenize(t[..., self._cont_idx].clamp(0, self.bins - 1)) if self._cont else None
        c = 0
        for f in self.fields:
            if f.discrete:
                out[f.name] = self._one_hot(f, t[..., self._slices[f.name].start])
            else:
                out[f.name] = cont[..., c:c + f.size]
                c += f.size
        return out

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "dict", "bins": self.bins, "fields": [f.to_dict() for f in self.fields],
                "names": list(self.names), "tokenization": self.tokenization}

    @classmethod
    def from_dict(cls, d: dict) -> "DictActionTokenizer":
        if d.get("kind", "dict") != "dict" or "fields" not in d:
            raise ValueError(f"dict action tokenizer: expected kind 'dict' with 'fields', got keys {sorted(d)}")
        return cls([ActionField.from_dict(f) for f in d["fields"]], d["bins"],
                   d.get("tokenization", _LEGACY_TOKENIZATION))


def _is_int(t: torch.Tensor) -> bool:
    return t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def action_tokenizer_from_dict(d: dict) -> "ActionTokenizer | DictActionTokenizer":
    """Rebuild whichever tokenizer wrote `d` (its "kind"; files without one predate dict actions)."""
    if not isinstance(d, dict):
        raise ValueError(f"action tokenizer: expected a JSON object, got {type(d).__name__}")
    kind = d.get("kind", "vector")
    if kind == "vector":
        return ActionTokenizer.from_dict(d)
    if kind == "dict":
        return DictActionTokenizer.from_dict(d)
    raise ValueError(f"action tokenizer kind: expected 'vector' or 'dict', got {kind!r}")
