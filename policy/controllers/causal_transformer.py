"""A causal transformer controller over the whole episode, at the token width.

Each step adds its N input tokens and r learned readout tokens; input tokens attend to input tokens of
the current and earlier steps, readout tokens to those and to the step's readouts. Learned slot
embedding (N + r slots) plus a sinusoidal embedding of the step index. State: per-layer keys and
values of all earlier input tokens (a KV cache), so a step processes only its own N + r tokens.
Memory and cost grow with the episode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from policy.config import ControllerConfig
from policy.controllers.layers import Block
from policy.controllers.padding import unroll_valid
from policy.controllers.registry import register_controller


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[L] step indices -> [L, dim] sin/cos embedding (Vaswani et al.); any length."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angle = positions.float()[:, None] * freq[None, :]
    out = torch.zeros(positions.shape[0], dim, device=positions.device)
    out[:, 0:2 * half:2] = torch.sin(angle)
    out[:, 1:2 * half:2] = torch.cos(angle)
    return out


def causal_step_mask(steps: int, input_tokens: int, readout_tokens: int) -> torch.Tensor:
    """[L, L] for L = steps*(N+r), True = may attend: input tokens see input tokens of their own and
    earlier steps; readout tokens see those and their own step's readouts."""
    per = input_tokens + readout_tokens
    idx = torch.arange(steps * per)
    step = idx // per
    readout = idx % per >= input_tokens
    to_inputs = ~readout[None, :] & (step[None, :] <= step[:, None])
    to_readouts = readout[None, :] & readout[:, None] & (step[None, :] == step[:, None])
    return to_inputs | to_readouts


@register_controller("causal_transformer", carried_memory=True, bounded_state=False)
class CausalTransformer(nn.Module):
    """Causal transformer over the episode's tokens; r readout tokens per step; KV cache at inference."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
        self.dim, self.input_tokens, self.readout_tokens = dim, num_input_tokens, cfg.read_tokens
        self.heads, self.key_dim = cfg.heads, cfg.key_dim or dim // cfg.heads
        self.out_dim = dim
        self.readout = nn.Parameter(torch.randn(cfg.read_tokens, dim) * 0.02)
        self.slot_pos = (nn.Parameter(torch.randn(num_input_tokens + cfg.read_tokens, dim) * 0.02)
                         if cfg.use_position_embedding else None)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, self.key_dim, cfg.feed_forward_style(), cfg.mlp_dim, cfg.dropout)
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(dim)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [B,T,N,D] of steps start..start+T-1 -> [B,T,N+r,D] with readouts and embeddings."""
        b, t = tokens.shape[:2]
        x = torch.cat([tokens, self.readout.expand(b, t, -1, -1)], dim=2)
        if self.slot_pos is not None:
            x = x + self.slot_pos
        steps = torch.arange(start, start + t, device=tokens.device)
        return x + sinusoidal(steps, self.dim).to(x.dtype)[:, None, :]

    def _unroll(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens, 0).flatten(1, 2)
        mask = causal_step_mask(t, self.input_tokens, self.readout_tokens).to(x.device)
        for block in self.blocks:
            x, _, _ = block(x, mask)
        return self.norm(x).unflatten(1, (t, -1))[:, :, self.input_tokens:]

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,T,N,D] -> [B,T,r,D]."""
        return unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> dict[str, torch.Tensor]:
        """{"keys", "values"}: [layers, B, heads, S, key_dim] for the S = steps*N input tokens so far."""
        p = self.readout
        empty = torch.zeros(len(self.blocks), batch, self.heads, 0, self.key_dim, device=p.device, dtype=p.dtype)
        return {"keys": empty, "values": empty.clone()}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens [B,N,D] -> (out [B,r,D], state with this step's input-token keys/values appended)."""
        n, r = self.input_tokens, self.readout_tokens
        past = state["keys"].shape[3]
        x = self.embed(tokens.unsqueeze(1), past // n)[:, 0]
        mask = torch.ones(n + r, past + n + r, dtype=torch.bool, device=x.device)
        mask[:n, past + n:] = False  # input tokens do not see readouts
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            cached = (state["keys"][i], state["values"][i])
            x, k, v = block(x, mask, cached)
            keys.append(torch.cat([cached[0], k[:, :, :n]], dim=2))
            values.append(torch.cat([cached[1], v[:, :, :n]], dim=2))
        return self.norm(x)[:, n:], {"keys": torch.stack(keys), "values": torch.stack(values)}
