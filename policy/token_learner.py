"""TokenLearner v1.1 (Ryoo et al. 2021), as used by RT-1 and the Token Turing Machine.

LayerNorm(eps 1e-6) -> Linear(hidden) -> GELU -> Linear(num_tokens) gives one score per (position,
output token); a softmax over positions turns them into weights, and each output token is the weighted
sum of the *un-normalised* inputs. [N, P, D] -> [N, S, D].
"""
from __future__ import annotations

import torch
from torch import nn


class TokenLearner(nn.Module):
    def __init__(self, dim: int, num_tokens: int, hidden: int = 64, num_positions: int | None = None,
                 field: str = "num_tokens"):
        """`num_positions`, where known, is checked now; `field` names the setting in error messages."""
        super().__init__()
        self.num_tokens = num_tokens
        self.field = field
        if num_positions is not None:
            self._check(num_positions)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens))

    def _check(self, num_positions: int) -> None:
        if self.num_tokens > num_positions:
            raise ValueError(f"{self.field}: expected at most {num_positions} (the number of input positions "
                             f"TokenLearner selects from), got {self.num_tokens}")

    def forward(self, x: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check(x.shape[1])
        weights = self.score(self.norm(x)).transpose(1, 2).softmax(dim=-1)  # [N, S, P]
        out = weights @ x
        return (out, weights) if return_weights else out
