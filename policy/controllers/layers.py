"""Transformer pieces shared by the rt1 and causal_transformer controllers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with a free per-head width (Keras MultiHeadAttention(key_dim, num_heads)):
    q, k, v: Linear(dim, heads*key_dim); output Linear(heads*key_dim, dim); dropout on the weights."""

    def __init__(self, dim: int, heads: int, key_dim: int, dropout: float):
        super().__init__()
        self.heads, self.key_dim, self.dropout = heads, key_dim, dropout
        self.q = nn.Linear(dim, heads * key_dim)
        self.k = nn.Linear(dim, heads * key_dim)
        self.v = nn.Linear(dim, heads * key_dim)
        self.out = nn.Linear(heads * key_dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.key_dim)).transpose(1, 2)  # [B,H,L,Kd]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mask: bool [Lq, Lk], True = may attend."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + FF(LN(x)). FF "dense" is RT-1's single Dense(dim) without
    activation (dropout after it); "mlp" is Dense(mlp_dim) GELU Dense(dim)."""

    def __init__(self, dim: int, heads: int, key_dim: int, feed_forward: str, mlp_dim: int, dropout: float,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, key_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        if feed_forward == "dense":
            self.ff: nn.Module = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        else:
            self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                    nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,L,D]; past: cached (keys, values) [B,H,S,Kd] placed before x's own; mask [L, S+L].
        Returns (x, x's keys, x's values)."""
        q, k, v = self.attn.project(self.norm1(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        x = x + self.attn.attend(q, keys, values, mask)
        return x + self.ff(self.norm2(x)), k, v


def keras_init(module: nn.Module) -> None:
    """Keras Dense / MultiHeadAttention defaults: glorot-uniform kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
