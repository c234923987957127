"""TokenLearner v1.1 (Ryoo et al. 2021), as used by RT-1 and the Token Turing Machine.

LayerNorm(eps 1e-6) -> Linear(hidden) -> GELU (tanh approximation, flax's and RT-1's `gelu`) -> dropout ->
Linear(num_tokens) -> dropout gives one score per (position, output token); a softmax over positions
turns them into weights, and each output token is the weighted sum of the *un-normalised* inputs.
[N, P, D] -> [N, S, D]. Dropout sits where scenic's TokenLearnerModuleV11 (its MlpBlock) puts it: after
the GELU and on the logits (0 by default: RT-1's image TokenLearner has none at its default rate).
"""
from __future__ import annotations

import torch
from torch import nn


class TokenLearner(nn.Module):
    def __init__(self, dim: int, num_tokens: int, hidden: int = 64, num_positions: int | None = None,
                 field: str = "num_tokens", dropout: float = 0.0):
        """`num_positions`, where known, is checked now; `field` names the setting in error messages."""
        super().__init__()
        self.num_tokens = num_tokens
        self.field = field
        if num_positions is not None:
            self._check(num_positions)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Parameter names (score.0, score.2) as before the dropout existed: saved policies still load.
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, num_tokens))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _check(self, num_positions: int) -> None:
        if self.num_tokens > num_positions:
            raise ValueError(f"{self.field}: expected at most {num_positions} (the number of input positions "
                             f"TokenLearner selects from), got {self.num_tokens}")

    def forward(self, x: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check(x.shape[1])
        hidden_layer, gelu, out_layer = self.score
        h = gelu(hidden_layer(self.norm(x)))
        if self.dropout is not None:
            h = self.dropout(h)
        logits = out_layer(h)
        if self.dropout is not None:
            logits = self.dropout(logits)
        weights = logits.transpose(1, 2).softmax(dim=-1)  # [N, S, P]
        out = weights @ x
        return (out, weights) if return_weights else out
