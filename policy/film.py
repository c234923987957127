"""FiLM: feature-wise linear modulation by the instruction context (Perez et al. 2018), as in RT-1.

Both layers compute (1 + gamma(c)) * x + beta(c) with zero-initialised gamma and beta, so they start
as the identity and the backbone is language-independent at init.
"""
from __future__ import annotations

import torch
from torch import nn


class FiLM(nn.Module):
    """Feature-wise linear modulation of a feature map [N, C, H, W]: (1 + gamma(c)) * x + beta(c),
    identity at init (zero weights)."""

    def __init__(self, context_dim: int, channels: int):
        super().__init__()
        self.gamma = nn.Linear(context_dim, channels)
        self.beta = nn.Linear(context_dim, channels)
        for layer in (self.gamma, self.beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(context)[:, :, None, None]
        beta = self.beta(context)[:, :, None, None]
        return x * (1 + gamma) + beta


class TokenFiLM(FiLM):
    """FiLM over tokens: [N, L, C] * (1 + gamma(c)) + beta(c), identity at init (zero weights)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.gamma(context)).unsqueeze(1) + self.beta(context).unsqueeze(1)
