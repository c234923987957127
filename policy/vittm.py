"""ViTTM: a Vision Token Turing Machine backbone (Jajal et al. 2024), FiLM-conditioned on language.

Two token streams come from one image, each with its own patch embedding and position embedding:
    process tokens  (image_size / process_patch)^2, larger patches: the only tokens the ViT blocks see
    memory tokens   (image_size / memory_patch)^2, smaller or equal patches: only read and written
Per block (as in the paper and its reference code):
    M, P = LN_r(M), LN_r(P)                 one LayerNorm shared by both streams
    P    = fuse(P, Read(query=P, keys/values=M))
    P    = FiLM(Block(P), context)          a standard pre-LN ViT block on the process tokens only
    M, P = LN_w(M), LN_w(P)
    M    = fuse(M, Write(query=M, keys/values=P))
The memory stream is never processed by itself. Output (`output_stream`): the memory tokens (default:
the finer map, holding every block's writes), the process tokens, or both concatenated; each stream
gets a final LayerNorm, then a Linear (no bias) to `token_dim` and one more FiLM, like FiLM-EfficientNet.
When only the process tokens are output the last block's write is skipped (nothing would read it).

Read/write heads (`rw_head`), all mapping (source [N,S,D], target [N,T,D]) -> [N,T,D]:
    linear        linear attention (the paper's choice): phi(x) = elu(x) + 1 on q and k, q and k
                  projected to a latent of width D / rw_latent_scale (4 in the paper), multi-head,
                  out = phi(q) (phi(k)^T v) / (phi(q) . sum_s phi(k_s) + 1e-6): cost linear in S and T.
    attention     multi-head softmax cross-attention with an output projection.
    tokenlearner  TokenLearner over the concatenation [source ; target] down to T tokens.
Fusion (`fusion`), the same for reads and writes:
    add           target + rw (the paper's choice)
    erase         rw replaces the target
    add_erase     g = sigmoid(Linear(mean over rw tokens)) per target token: (1 - g) * target + g * rw
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.config import ConfigError, ImageEncoderConfig
from policy.token_learner import TokenLearner
from policy.vit import (LN_EPS, Block, PatchEmbed, TokenFiLM, ViTSpec, check_num_tokens, check_patch,
                        init_vit_weights, resolve_vit, vit_patch)

RW_HEADS = ("linear", "attention", "tokenlearner")
FUSIONS = ("add", "erase", "add_erase")
OUTPUT_STREAMS = ("memory", "process", "both")


def check_vittm(cfg: ImageEncoderConfig) -> tuple[ViTSpec, int, int]:
    """Checks a ViTTM config; returns (size, process tokens, memory tokens)."""
    spec = resolve_vit(cfg)
    process = check_patch(cfg, "process_patch", cfg.process_patch)
    memory = check_patch(cfg, "memory_patch", cfg.memory_patch)
    if cfg.memory_patch > cfg.process_patch:
        raise ConfigError(f"model.image.memory_patch: expected at most process_patch ({cfg.process_patch}): the "
                          f"memory stream has at least as many tokens as the process stream, got {cfg.memory_patch}")
    if cfg.rw_head not in RW_HEADS:
        raise ConfigError(f"model.image.rw_head: expected one of {list(RW_HEADS)}, got {cfg.rw_head!r}")
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"model.image.fusion: expected one of {list(FUSIONS)}, got {cfg.fusion!r}")
    if cfg.output_stream not in OUTPUT_STREAMS:
        raise ConfigError(f"model.image.output_stream: expected one of {list(OUTPUT_STREAMS)}, "
                          f"got {cfg.output_stream!r}")
    if cfg.rw_head == "linear":
        s = cfg.rw_latent_scale
        if s < 1 or spec.width % s or (spec.width // s) % spec.heads:
            raise ConfigError(f"model.image.rw_latent_scale: expected a divisor of the width {spec.width} that "
                              f"leaves a latent divisible by the {spec.heads} heads, got {s!r}")
    return spec, process, memory


def output_tokens(cfg: ImageEncoderConfig) -> int:
    """Tokens a vittm / vit backbone outputs for this config (checked)."""
    if cfg.backbone == "vit":
        resolve_vit(cfg)
        return check_patch(cfg, "vit_patch" if cfg.vit_patch else "memory_patch", vit_patch(cfg))
    _, process, memory = check_vittm(cfg)
    return {"memory": memory, "process": process, "both": memory + process}[cfg.output_stream]


def check_image_config(cfg: ImageEncoderConfig) -> None:
    """Full check of a vittm / vit image config, TokenLearner size included (used by validate_config)."""
    check_num_tokens(cfg, output_tokens(cfg))


class LinearAttention(nn.Module):
    """Multi-head linear attention (Katharopoulos et al. 2020) with a reduced q/k latent width."""

    def __init__(self, dim: int, heads: int, latent: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.q = nn.Linear(dim, latent)
        self.k = nn.Linear(dim, latent)
        self.v = nn.Linear(dim, dim)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, s, d = source.shape
        t, h = target.shape[1], self.heads
        q = F.elu(self.q(target).view(n, t, h, -1)) + 1  # [N,T,H,c]
        k = F.elu(self.k(source).view(n, s, h, -1)) + 1  # [N,S,H,c]
        v = self.v(source).view(n, s, h, d // h)  # [N,S,H,e]
        kv = torch.einsum("nshc,nshe->nhce", k, v)
        norm = torch.einsum("nthc,nhc->nth", q, k.sum(dim=1)) + self.eps
        return (torch.einsum("nthc,nhce->nthe", q, kv) / norm.unsqueeze(-1)).reshape(n, t, d)


class CrossAttention(nn.Module):
    """Multi-head softmax attention: target tokens query the source tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, s, d = source.shape
        t, h = target.shape[1], self.heads
        q = self.q(target).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(source).view(n, s, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TokenLearnerHead(nn.Module):
    """TokenLearner over [source ; target] down to the target's token count (bottleneck = that count)."""

    def __init__(self, dim: int, target_tokens: int):
        super().__init__()
        self.tl = TokenLearner(dim, target_tokens, hidden=target_tokens)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.tl(torch.cat([source, target], dim=1))


def make_head(kind: str, spec: ViTSpec, target_tokens: int, latent_scale: int) -> nn.Module:
    if kind == "linear":
        return LinearAttention(spec.width, spec.heads, spec.width // latent_scale)
    if kind == "attention":
        return CrossAttention(spec.width, spec.heads)
    return TokenLearnerHead(spec.width, target_tokens)


class Fusion(nn.Module):
    def __init__(self, kind: str, dim: int, target_tokens: int):
        super().__init__()
        self.kind = kind
        self.gate = nn.Linear(dim, target_tokens) if kind == "add_erase" else None

    def forward(self, target: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            return target + rw
        if self.kind == "erase":
            return rw
        g = torch.sigmoid(self.gate(rw.mean(dim=1))).unsqueeze(-1)  # [N,T,1]
        return target * (1 - g) + rw * g


class ViTTMLayer(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig, spec: ViTSpec, process: int, memory: int, context_dim: int,
                 write: bool):
        super().__init__()
        d = spec.width
        self.read_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.read = make_head(cfg.rw_head, spec, process, cfg.rw_latent_scale)
        self.read_fusion = Fusion(cfg.fusion, d, process)
        self.block = Block(d, spec.heads, spec.mlp_ratio)
        self.film = TokenFiLM(context_dim, d)
        self.write_norm = nn.LayerNorm(d, eps=LN_EPS) if write else None
        self.write = make_head(cfg.rw_head, spec, memory, cfg.rw_latent_scale) if write else None
        self.write_fusion = Fusion(cfg.fusion, d, memory) if write else None

    def forward(self, process: torch.Tensor, memory: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        memory, process = self.read_norm(memory), self.read_norm(process)
        process = self.read_fusion(process, self.read(memory, process))
        process = self.film(self.block(process), context)
        if self.write is None:
            return process, memory
        memory, process = self.write_norm(memory), self.write_norm(process)
        memory = self.write_fusion(memory, self.write(process, memory))
        return process, memory


class FiLMViTTM(nn.Module):
    """[N,3,H,W] normalised images + [N,C] context -> [N, output tokens, token_dim] tokens."""

    def __init__(self, cfg: ImageEncoderConfig, context_dim: int):
        super().__init__()
        spec, process, memory = check_vittm(cfg)
        self.spec = spec
        self.num_process, self.num_memory = process, memory
        self.output_stream = cfg.output_stream
        self.process_embed = PatchEmbed(cfg.image_size, cfg.process_patch, spec.width)
        self.memory_embed = PatchEmbed(cfg.image_size, cfg.memory_patch, spec.width)
        last_write = cfg.output_stream != "process"
        self.layers = nn.ModuleList(
            ViTTMLayer(cfg, spec, process, memory, context_dim, write=i < spec.depth - 1 or last_write)
            for i in range(spec.depth))
        self.memory_norm = nn.LayerNorm(spec.width, eps=LN_EPS) if cfg.output_stream != "process" else None
        self.process_norm = nn.LayerNorm(spec.width, eps=LN_EPS) if cfg.output_stream != "memory" else None
        self.to_tokens = nn.Linear(spec.width, cfg.token_dim, bias=False)
        self.token_film = TokenFiLM(context_dim, cfg.token_dim)
        init_vit_weights(self)

    def num_output_tokens(self, image_size: int | None = None) -> int:
        return {"memory": self.num_memory, "process": self.num_process,
                "both": self.num_memory + self.num_process}[self.output_stream]

    def streams(self, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The process and memory streams after the last block (before the output norms)."""
        process, memory = self.process_embed(images), self.memory_embed(images)
        for layer in self.layers:
            process, memory = layer(process, memory, context)
        return process, memory

    def forward(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        process, memory = self.streams(images, context)
        outs = []
        if self.memory_norm is not None:
            outs.append(self.memory_norm(memory))
        if self.process_norm is not None:
            outs.append(self.process_norm(process))
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.token_film(self.to_tokens(x), context)
