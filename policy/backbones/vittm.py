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

Allowed values and their checks: policy/config.py (ImageEncoderConfig.validate).
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

from policy.backbones.registry import register_backbone
from policy.backbones.vit import LN_EPS, Block, PatchEmbed, init_vit_weights
from policy.config import ImageEncoderConfig, ViTSpec
from policy.film import TokenFiLM
from policy.token_learner import TokenLearner


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


@register_backbone("vittm", patch_tokens=True)
class FiLMViTTM(nn.Module):
    """[N,3,H,W] normalised images + [N,C] context -> [N, output tokens, token_dim] tokens."""

    def __init__(self, cfg: ImageEncoderConfig, context_dim: int):
        super().__init__()
        spec = cfg.vit_spec()
        process, memory = cfg.patch_tokens(cfg.process_patch), cfg.patch_tokens(cfg.memory_patch)
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
