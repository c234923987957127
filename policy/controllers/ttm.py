"""Token Turing Machine controller (Ryoo et al., CVPR 2023; reference: google-research/scenic,
scenic/projects/token_turing/model.py, which this module computes given the same weights).

Per step t, with memory M (m tokens) and input tokens I (N tokens):
    Z  = Read(M, I)       r tokens selected from [M ; I]
    O  = Process(Z)       transformer | MLP-Mixer | MLP, shared over steps
    M' = Write(M, I, O)   m tokens selected from [M ; I ; O]
and O is the step's output. Memory starts at zeros, so per-step cost is constant in episode length.

Memory modes (model.controller.memory_mode; allowed values in policy/config.py). The plain names are
the reference's (TokenTuringMachineUnit / TokenTuringMachineSimpleUnit); "-ours" are our variants:
    TL                TokenLearner v1.1 read over [M ; I] and write over [M ; I ; O] (the paper's default).
    TL-MHA            TokenLearnerMHA: learned queries (N(0, 0.02)) attend over the concatenation with
                      8-head attention (flax defaults: lecun-normal kernels, zero biases), no LayerNorm,
                      no dropout.
    TL-AddErase       TokenLearner read; TokenAddEraseWrite: 8 write heads select over the memory only
                      (LayerNorm + MLP(64 -> 8) on M, softmax over the m slots, s [8, m]); erase and add
                      vectors e, a [8, D] come from the process output O (LayerNorm, an MLP(64 -> 8) across
                      its r tokens, an MLP(64 -> D) across channels, each); then
                      M' = M * prod_h(1 - s_h e_h) + mean_h(1 - s_h a_h). No dropout (the reference builds
                      it with rate 0), no position embedding (the reference's write embedding is unused).
    TL-MHA-ours       TL-MHA with a LayerNorm before the attention, `heads` heads and attention dropout.
    TL-AddErase-ours  TokenLearner write over [M ; I ; O]; the result c per slot becomes one sigmoid erase
                      gate e = sigmoid(W_e c) (`erase_bias`) and one add vector (`add_erase_update`):
                      "additive" M' = M * (1 - e) + W_a c; "convex" M' = (1 - e) * M + e * W_a LN(c)
                      and "tanh" M' = tanh(M * (1 - e) + W_a c), both bounded over any episode length.
    simple            TokenTuringMachineSimpleUnit: TokenLearner reduces I alone to r tokens; the process
                      unit runs over [M ; I_r] (m + r tokens); its first r outputs are the step's output,
                      the other m the new memory.
Process units, as the reference builds them: transformer = scenic vit.Encoder (learned position
embedding over its input, dropout, pre-LN blocks, final LayerNorm; `process_position_embedding`);
mixer = MixerBlocks (token-mixing hidden `mixer_token_mlp_dim`, 128) then a LayerNorm; mlp = per layer
LayerNorm -> MLP with no residual (`mlp_residual` adds ours), then a LayerNorm. Every LayerNorm has eps
1e-6 and every GELU is the tanh approximation (flax's nn.gelu). Dropout where the reference has it:
inside every MLP (after the GELU and after the output Dense), on attention weights and after attention in
the encoder, after the encoder's position embedding, inside TokenLearner. `init: reference` initialises
as flax does (Dense kernels xavier-uniform, biases N(0, 1e-6); attention kernels xavier-uniform in the
encoder, lecun-normal in TL-MHA, biases 0; embeddings N(0, 0.02)); `init: torch` keeps torch's defaults.
Learned position embeddings over [M ; I] and [M ; I ; O] are optional (`use_position_embedding`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from policy.config import ControllerConfig
from policy.controllers.registry import register_controller
from policy.token_learner import TokenLearner

_TL_HIDDEN = 64  # TokenLearner v1.1 bottleneck (RT-1 and TTM defaults)
_LN_EPS = 1e-6  # flax nn.LayerNorm's default
_REFERENCE_MHA_HEADS = 8  # TokenLearnerMHA's and TokenAddEraseWrite's fixed head count
_ADD_ERASE_BOTTLENECK = 64  # TokenAddEraseWrite's bottleneck_dim


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """flax nn.gelu (approximate=True). A function, not nn.GELU: TransformerEncoderLayer's fused fast
    path would run an nn.GELU module as the exact erf GELU."""
    return F.gelu(x, approximate="tanh")


def _pos_embedding(tokens: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, tokens, dim) * 0.02)


def _mlp(dim: int, hidden: int, dropout: float, out: int | None = None) -> nn.Sequential:
    """scenic attention_layers.MlpBlock: Dense(hidden) GELU dropout Dense(out, default dim) dropout."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                         nn.Linear(hidden, dim if out is None else out), nn.Dropout(dropout))


class QueryAttention(nn.Module):
    """TL-MHA selection: `num_tokens` learned queries attend over the input tokens (layer-normalised
    first in TL-MHA-ours; the reference's TokenLearnerMHA has no LayerNorm)."""

    def __init__(self, dim: int, num_tokens: int, heads: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.queries = _pos_embedding(num_tokens, dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS) if pre_norm else None
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, return_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kv = x if self.norm is None else self.norm(x)
        out, weights = self.attn(self.queries.expand(x.shape[0], -1, -1), kv, kv, need_weights=return_weights)
        return (out, weights) if return_weights else out


class AddEraseWrite(nn.Module):
    """scenic TokenAddEraseWrite: (memory [B,m,D], process output [B,r,D]) -> new memory [B,m,D]."""

    def __init__(self, dim: int, read_tokens: int, heads: int = _REFERENCE_MHA_HEADS,
                 bottleneck: int = _ADD_ERASE_BOTTLENECK):
        super().__init__()
        self.select_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.select = _mlp(dim, bottleneck, 0.0, out=heads)
        self.erase_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.erase_tokens = _mlp(read_tokens, bottleneck, 0.0, out=heads)
        self.erase_channels = _mlp(dim, bottleneck, 0.0)
        self.add_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.add_tokens = _mlp(read_tokens, bottleneck, 0.0, out=heads)
        self.add_channels = _mlp(dim, bottleneck, 0.0)

    @staticmethod
    def _vectors(norm: nn.LayerNorm, tokens: nn.Module, channels: nn.Module, control: torch.Tensor) -> torch.Tensor:
        """[B,r,D] -> [B,heads,D]: an MLP across the r tokens, then one across channels."""
        return channels(tokens(norm(control).transpose(1, 2)).transpose(1, 2))

    def forward(self, memory: torch.Tensor, control: torch.Tensor, return_weights: bool = False):
        select = self.select(self.select_norm(memory)).transpose(1, 2).softmax(dim=-1)  # [B,heads,m]
        erase = self._vectors(self.erase_norm, self.erase_tokens, self.erase_channels, control)  # [B,heads,D]
        add = self._vectors(self.add_norm, self.add_tokens, self.add_channels, control)
        s = select.unsqueeze(-1)  # [B,heads,m,1]
        out = memory * (1 - s * erase.unsqueeze(2)).prod(dim=1) + (1 - s * add.unsqueeze(2)).mean(dim=1)
        return (out, select) if return_weights else out


class MixerBlock(nn.Module):
    """scenic MixerBlock: pre-LN token-mixing MLP (hidden `token_hidden`), then channel-mixing MLP."""

    def __init__(self, dim: int, tokens: int, mlp_dim: int, token_hidden: int, dropout: float):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.token_mlp = _mlp(tokens, token_hidden, dropout)
        self.channel_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.channel_mlp = _mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class MLPBlock(nn.Module):
    """The TTM 'mlp' process unit's layer: LayerNorm -> MLP per token (no mixing across tokens); the
    reference has no residual, `mlp_residual` (ours) adds one."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, residual: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _mlp(dim, mlp_dim, dropout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(x))
        return x + y if self.residual else y


class ProcessUnit(nn.Module):
    """[B, tokens, D] -> [B, tokens, D]: the per-step processor, ending in a LayerNorm."""

    def __init__(self, cfg: ControllerConfig, dim: int, tokens: int):
        super().__init__()
        transformer = cfg.process_unit == "transformer"
        self.pos = _pos_embedding(tokens, dim) if transformer and cfg.process_position_embedding else None
        self.pos_drop = nn.Dropout(cfg.dropout) if transformer else None
        if transformer:
            blocks: list[nn.Module] = [
                nn.TransformerEncoderLayer(dim, cfg.heads, cfg.mlp_dim, cfg.dropout, activation=_gelu,
                                           layer_norm_eps=_LN_EPS, batch_first=True, norm_first=True)
                for _ in range(cfg.layers)]
        elif cfg.process_unit == "mixer":
            token_hidden = cfg.mixer_token_mlp_dim or cfg.mlp_dim
            blocks = [MixerBlock(dim, tokens, cfg.mlp_dim, token_hidden, cfg.dropout) for _ in range(cfg.layers)]
        else:
            blocks = [MLPBlock(dim, cfg.mlp_dim, cfg.dropout, cfg.mlp_residual) for _ in range(cfg.layers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos
        if self.pos_drop is not None:
            x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _select(module: nn.Module, x: torch.Tensor, want_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a read/write selection, asking for its weights only when wanted (MHA is faster without)."""
    if want_weights:
        return module(x, return_weights=True)
    return module(x), None


def _lecun_normal_(w: torch.Tensor, fan_in: int) -> None:
    """flax lecun_normal: truncated normal in [-2, 2] std, variance 1 / fan_in after truncation."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


def reference_init_(module: nn.Module) -> None:
    """Initialise a TTM as the reference does (flax/scenic): Dense kernels xavier-uniform and biases
    N(0, 1e-6) (scenic MlpBlock); attention q/k/v/out kernels as flax DenseGeneral initialises them over
    the flattened [D, D] shape (xavier-uniform in the encoder, lecun-normal in TokenLearnerMHA), biases 0;
    LayerNorms 1 / 0; learned embeddings and queries N(0, 0.02) as at construction."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        attns = [(m.attn, "lecun")] if isinstance(m, QueryAttention) else []
        attns += [(m.self_attn, "xavier")] if isinstance(m, nn.TransformerEncoderLayer) else []
        for attn, kind in attns:
            d = attn.embed_dim
            for w in (*attn.in_proj_weight.data.chunk(3), attn.out_proj.weight.data):
                if kind == "xavier":
                    nn.init.uniform_(w, -math.sqrt(3.0 / d), math.sqrt(3.0 / d))  # fan_avg (d + d) / 2
                else:
                    _lecun_normal_(w, d)
            nn.init.zeros_(attn.in_proj_bias)
            nn.init.zeros_(attn.out_proj.bias)


@register_controller("ttm", carried_memory=True, attention_maps=True)
class TokenTuringMachine(nn.Module):
    """Reads from / writes to m memory tokens around a shared process unit; outputs r tokens per step."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
        m, r, n = cfg.memory_tokens, cfg.read_tokens, num_input_tokens
        mode = cfg.memory_mode
        self.memory_tokens, self.read_tokens, self.dim, self.mode = m, r, dim, mode
        self.simple = mode == "simple"
        pos = cfg.use_position_embedding and not self.simple
        self.read_pos = _pos_embedding(m + n, dim) if pos else None
        # The reference's TL-AddErase adds a write position embedding whose result it never uses.
        self.write_pos = _pos_embedding(m + n + r, dim) if pos and mode != "TL-AddErase" else None
        self.write: nn.Module | None
        if mode in ("TL-MHA", "TL-MHA-ours"):
            ours = mode == "TL-MHA-ours"
            heads, drop = (cfg.heads, cfg.dropout) if ours else (_REFERENCE_MHA_HEADS, 0.0)
            self.read: nn.Module = QueryAttention(dim, r, heads, drop, pre_norm=ours)
            self.write = QueryAttention(dim, m, heads, drop, pre_norm=ours)
        elif self.simple:
            self.read = TokenLearner(dim, r, _TL_HIDDEN, n, field="model.controller.read_tokens", dropout=cfg.dropout)
            self.write = None
        else:
            self.read = TokenLearner(dim, r, _TL_HIDDEN, m + n, field="model.controller.read_tokens",
                                     dropout=cfg.dropout)
            self.write = (None if mode == "TL-AddErase" else
                          TokenLearner(dim, m, _TL_HIDDEN, m + n + r, field="model.controller.memory_tokens",
                                       dropout=cfg.dropout))
        self.process = ProcessUnit(cfg, dim, m + r if self.simple else r)
        ours_add_erase = mode == "TL-AddErase-ours"
        self.erase = nn.Linear(dim, dim) if ours_add_erase else None
        self.add = nn.Linear(dim, dim) if ours_add_erase else None
        self.add_erase_update = cfg.add_erase_update if ours_add_erase else None
        # "convex": the add vector comes from a layer-normalised c and is mixed in by the erase gate.
        self.convex_norm = nn.LayerNorm(dim, eps=_LN_EPS) if self.add_erase_update == "convex" else None
        self.add_erase = AddEraseWrite(dim, r) if mode == "TL-AddErase" else None
        if cfg.init == "reference":
            reference_init_(self)
        if self.erase is not None:
            nn.init.constant_(self.erase.bias, cfg.erase_bias)

    def init_memory(self, batch: int) -> torch.Tensor:
        p = self.process.norm.weight
        return torch.zeros(batch, self.memory_tokens, self.dim, device=p.device, dtype=p.dtype)

    def step(self, tokens: torch.Tensor, memory: torch.Tensor, return_attention: bool = False):
        """tokens [B,N,D], memory [B,m,D] -> (out [B,r,D], new memory [B,m,D])
        (+ {"read": [B,r,m+N], "write": [B,m,m+N+r]} selection weights if return_attention; TL-AddErase's
        "write" is its heads' selection over the memory slots, [B,8,m]; `simple` has none)."""
        if self.simple:
            if return_attention:
                raise ValueError("return_attention: model.controller.memory_mode 'simple' has no read/write "
                                 "selection weights (its process unit reads and writes the memory itself)")
            processed = self.process(torch.cat([memory, self.read(tokens)], dim=1))
            return processed[:, :self.read_tokens], processed[:, self.read_tokens:]
        read_in = torch.cat([memory, tokens], dim=1)
        if self.read_pos is not None:
            read_in = read_in + self.read_pos
        z, read_w = _select(self.read, read_in, return_attention)
        out = self.process(z)
        if self.add_erase is not None:
            new_memory, write_w = (self.add_erase(memory, out, return_weights=True) if return_attention
                                   else (self.add_erase(memory, out), None))
        else:
            write_in = torch.cat([memory, tokens, out], dim=1)
            if self.write_pos is not None:
                write_in = write_in + self.write_pos
            assert self.write is not None
            new_memory, write_w = _select(self.write, write_in, return_attention)
        if self.erase is not None:
            erase = torch.sigmoid(self.erase(new_memory))
            if self.add_erase_update == "convex":  # bounded by max(|M|, |W_a LN(c)|) per element
                new_memory = torch.lerp(memory, self.add(self.convex_norm(new_memory)), erase)
            else:
                new_memory = memory * (1 - erase) + self.add(new_memory)
                if self.add_erase_update == "tanh":
                    new_memory = torch.tanh(new_memory)
        if return_attention:
            return out, new_memory, {"read": read_w, "write": write_w}
        return out, new_memory

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None, return_attention: bool = False):
        """tokens [B,T,N,D] -> out [B,T,r,D], unrolled from zero memory. Where step_mask [B,T] is False
        (padding) the memory is carried over unchanged; outputs at those steps are meaningless.
        With return_attention, also {"read": [B,T,r,m+N], "write": [B,T,m,m+N+r]} (TL-AddErase: "write"
        [B,T,8,m]; TL-MHA: weights averaged over heads)."""
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
