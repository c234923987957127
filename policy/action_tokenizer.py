"""RT-1's action tokenizer: each action dimension is clipped to its bounds and cut into `bins` bins.

tokenize:   int((a - low) / (high - low) * (bins - 1))   (truncation, as in RT-1)
detokenize: token / (bins - 1) * (high - low) + low
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class ActionTokenizer:
    def __init__(self, low: Sequence[float], high: Sequence[float], bins: int = 256,
                 names: Sequence[str] | None = None):
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
        self.names = tuple(names) if names is not None else tuple(f"action_{i}" for i in range(low_a.size))
        if len(self.names) != low_a.size:
            raise ValueError(f"action names: expected {low_a.size} names, got {len(self.names)}")

    @property
    def num_dims(self) -> int:
        return int(self.low.size)

    def tokenize(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        a = torch.as_tensor(actions, dtype=torch.float32)
        if a.shape[-1] != self.num_dims:
            raise ValueError(f"action: expected last dimension {self.num_dims}, got shape {tuple(a.shape)}")
        low = torch.as_tensor(self.low, device=a.device)
        high = torch.as_tensor(self.high, device=a.device)
        a = torch.minimum(torch.maximum(a, low), high)
        # Truncation as in RT-1; the 1e-4 of a bin keeps detokenised values (bin edges) in their own bin
        # despite float rounding, so tokenize(detokenize(t)) == t.
        tokens = ((a - low) / (high - low) * (self.bins - 1) + 1e-4).to(torch.int64)
        return tokens.clamp_(0, self.bins - 1)

    def detokenize(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(tokens).to(torch.float32)
        low = torch.as_tensor(self.low, device=t.device)
        high = torch.as_tensor(self.high, device=t.device)
        return t / (self.bins - 1) * (high - low) + low

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist(), "bins": self.bins, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionTokenizer":
        return cls(d["low"], d["high"], d["bins"], d.get("names"))
