"""Token Turing Machine controller (Ryoo et al., CVPR 2023).

Per step t, with memory M (m tokens) and input tokens I (N tokens):
    Z  = Read(M, I)       r tokens selected from [M ; I]
    O  = Process(Z)       transformer | MLP-Mixer | MLP, shared over steps
    M' = Write(M, I, O)   m tokens selected from [M ; I ; O]
and O is the step's output. Memory starts at zeros, so per-step cost is constant in episode length.

Memory modes (read and write; model.controller.memory_mode, allowed values in policy/config.py):
    TL           TokenLearner selection (the paper's default).
    TL-MHA       learned queries attending over the concatenation with multi-head attention.
    TL-AddErase  TokenLearner read; the write's TokenLearner output per slot is turned into NTM-style
                 erase gates and add vectors: M' = M * (1 - sigmoid(W_e c)) + W_a c (non-canonical).
Learned position embeddings over [M ; I] and [M ; I ; O] (and in the transformer unit) are optional.
"""
from __future__ import annotations

import torch
from torch import nn

from policy.config import ControllerConfig
from policy.controllers.registry import register_controller
from policy.token_learner import TokenLearner

_TL_HIDDEN = 64  # TokenLearner v1.1 bottleneck (RT-1 and TTM defaults)


def _pos_embedding(tokens: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, tokens, dim) * 0.02)


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class QueryAttention(nn.Module):
    """TL-MHA selection: `num_tokens` learned queries attend over (layer-normalised) input tokens."""

    def __init__(self, dim: int, num_tokens: int, heads: int, dropout: float):
        super().__init__()
        self.queries = _pos_embedding(num_tokens, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kv = self.norm(x)
        out, weights = self.attn(self.queries.expand(x.shape[0], -1, -1), kv, kv, need_weights=return_weights)
        return (out, weights) if return_weights else out


class MixerBlock(nn.Module):
    """Pre-LN MLP-Mixer block: an MLP across tokens, then an MLP across channels."""

    def __init__(self, dim: int, tokens: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = _mlp(tokens, mlp_dim, dropout)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = _mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class MLPBlock(nn.Module):
    """Pre-LN per-token MLP with a residual (the TTM 'MLP' process unit: no mixing across tokens)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ProcessUnit(nn.Module):
    """[B, r, D] -> [B, r, D]: the per-step processor, ending in a LayerNorm."""

    def __init__(self, cfg: ControllerConfig, dim: int):
        super().__init__()
        r = cfg.read_tokens
        self.pos = _pos_embedding(r, dim) if cfg.process_unit == "transformer" and cfg.use_position_embedding else None
        if cfg.process_unit == "transformer":
            blocks: list[nn.Module] = [
                nn.TransformerEncoderLayer(dim, cfg.heads, cfg.mlp_dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True) for _ in range(cfg.layers)]
        elif cfg.process_unit == "mixer":
            blocks = [MixerBlock(dim, r, cfg.mlp_dim, cfg.dropout) for _ in range(cfg.layers)]
        else:
            blocks = [MLPBlock(dim, cfg.mlp_dim, cfg.dropout) for _ in range(cfg.layers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _select(module: nn.Module, x: torch.Tensor, want_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a read/write selection, asking for its weights only when wanted (MHA is faster without)."""
    if want_weights:
        return module(x, return_weights=True)
    return module(x), None


@register_controller("ttm", carried_memory=True, attention_maps=True)
class TokenTuringMachine(nn.Module):
    """Reads from / writes to m memory tokens around a shared process unit; outputs r tokens per step."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
        m, r, n = cfg.memory_tokens, cfg.read_tokens, num_input_tokens
        self.memory_tokens, self.dim = m, dim
        self.read_pos = _pos_embedding(m + n, dim) if cfg.use_position_embedding else None
        self.write_pos = _pos_embedding(m + n + r, dim) if cfg.use_position_embedding else None
        if cfg.memory_mode == "TL-MHA":
            self.read: nn.Module = QueryAttention(dim, r, cfg.heads, cfg.dropout)
            self.write: nn.Module = QueryAttention(dim, m, cfg.heads, cfg.dropout)
        else:
            self.read = TokenLearner(dim, r, _TL_HIDDEN, m + n, field="model.controller.read_tokens")
            self.write = TokenLearner(dim, m, _TL_HIDDEN, m + n + r, field="model.controller.memory_tokens")
        self.process = ProcessUnit(cfg, dim)
        self.erase = nn.Linear(dim, dim) if cfg.memory_mode == "TL-AddErase" else None
        self.add = nn.Linear(dim, dim) if cfg.memory_mode == "TL-AddErase" else None
        if self.erase is not None:
            nn.init.constant_(self.erase.bias, cfg.erase_bias)

    def init_memory(self, batch: int) -> torch.Tensor:
        p = self.process.norm.weight
        return torch.zeros(batch, self.memory_tokens, self.dim, device=p.device, dtype=p.dtype)

    def step(self, tokens: torch.Tensor, memory: torch.Tensor, return_attention: bool = False):
        """tokens [B,N,D], memory [B,m,D] -> (out [B,r,D], new memory [B,m,D])
        (+ {"read": [B,r,m+N], "write": [B,m,m+N+r]} selection weights if return_attention)."""
        read_in = torch.cat([memory, tokens], dim=1)
        if self.read_pos is not None:
            read_in = read_in + self.read_pos
        z, read_w = _select(self.read, read_in, return_attention)
        out = self.process(z)
        write_in = torch.cat([memory, tokens, out], dim=1)
        if self.write_pos is not None:
            write_in = write_in + self.write_pos
        new_memory, write_w = _select(self.write, write_in, return_attention)
        if self.erase is not None:
            new_memory = memory * (1 - torch.sigmoid(self.erase(new_memory))) + self.add(new_memory)
        if return_attention:
            return out, new_memory, {"read": read_w, "write": write_w}
        return out, new_memory

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None, return_attention: bool = False):
        """tokens [B,T,N,D] -> out [B,T,r,D], unrolled from zero memory. Where step_mask [B,T] is False
        (padding) the memory is carried over unchanged; outputs at those steps are meaningless.
        With return_attention, also {"read": [B,T,r,m+N], "write": [B,T,m,m+N+r]}."""
        memory = self.init_memory(tokens.shape[0])
        outs, attns = [], []
        for t in range(tokens.shape[1]):
            out, new_memory, *attn = self.step(tokens[:, t], memory, return_attention)
            memory = new_memory if step_mask is None else torch.where(step_mask[:, t, None, None], new_memory, memory)
            outs.append(out)
            attns += attn
        out = torch.stack(outs, dim=1)
        if return_attention:
            return out, {k: torch.stack([a[k] for a in attns], dim=1) for k in ("read", "write")}
        return out
