"""ViTTM: a Vision Token Turing Machine backbone (Jajal et al. 2024), FiLM-conditioned on language.

Two token streams come from one image, each with its own patch embedding (a conv with kernel = stride =
patch, with bias) and learned position embedding:
    process tokens  (image_size / process_patch)^2, larger patches: the only tokens the ViT blocks see
    memory tokens   (image_size / memory_patch)^2, smaller or equal patches: only read and written
Per block (as in the paper and its reference code, pjjajal/EfficientTTMs models/vittm/vittm.py):
    M, P = LN_r(M), LN_r(P)                 one LayerNorm (eps 1e-6) shared by both streams
    P    = fuse_r(P, Read(query=P, keys/values=M))
    P    = FiLM(Block(P), context)          a standard pre-LN ViT block on the process tokens only
    M, P = LN_w(M), LN_w(P)
    M    = fuse_w(M, Write(query=M, keys/values=P))
The memory stream is never processed by itself. Output (`output_stream`): the memory tokens (default:
the finer map, holding every block's writes), the process tokens, or both concatenated. As in the
reference (its average-pool models: the final `norm` is the identity), the process stream gets a final
LayerNorm (eps 1e-6) and the memory stream none (`memory_output_norm: true`, our variant, gives it one);
then a Linear (no bias) to `token_dim` and one more FiLM, like FiLM-EfficientNet (the reference
mean-pools each stream into its own classifier instead). When only the process tokens are output the
last block's write head is skipped (nothing would read it; its write_norm, which the process output
passes through, stays: the output is the same).

Allowed values and their checks: policy/config.py (ImageEncoderConfig.validate).
Read/write heads (`rw_head`), all mapping (source [N,S,D], target [N,T,D]) -> [N,T,D]:
    linear        linear attention (the paper's choice; the reference's `lin`): phi(x) = elu(x) + 1 on q
                  and k, q and k projected to a latent of width D / rw_latent_scale (4 in the paper),
                  multi-head, out = phi(q) (phi(k)^T v) / (phi(q) . sum_s phi(k_s) + 1e-6): cost linear
                  in S and T. No output projection (the reference defines one, `proj`, and never applies it).
    attention     multi-head softmax cross-attention (the reference's `ca`): separate q, k, v Linears, each
                  followed by a LayerNorm (eps 1e-5) over the full width, scale head_dim^-0.5, output Linear.
    tokenlearner  TokenLearner (the reference's `tl`) over [source ; target] down to T tokens: LayerNorm
                  (eps 1e-5), Linear(D, T) GELU (exact, erf) Linear(T, T), softmax over the S + T
                  positions, weighted sums of the un-normalised tokens.
Fusion (`fusion`), the same for reads and writes:
    add           target + rw (the paper's choice; the reference's `residual`)
    erase         rw replaces the target
    add_erase     g = sigmoid(Linear(mean over rw tokens)) per target token: (1 - g) * target + g * rw;
                  one gate for reads and one for writes, shared by all blocks as in the reference
                  (`fusion_gate_per_block: true`, our variant: a gate per block and direction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.backbones.registry import register_backbone
from policy.backbones.vit import LN_EPS, Block, PatchEmbed, drop_path_rates, init_vit_weights
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
        # The reference's (fast-transformers') contraction order: phi(k)^T v, then q, kv and 1 / (q . sum k + eps).
        kv = torch.einsum("nshc,nshe->nhec", k, v)
        z = 1 / (torch.einsum("nthc,nhc->nth", q, k.sum(dim=1)) + self.eps)
        return torch.einsum("nthc,nhec,nth->nthe", q, kv, z).reshape(n, t, d)


# The reference's cross-attention and TokenLearner heads use nn.LayerNorm's default eps, not the ViT's 1e-6.
HEAD_LN_EPS = 1e-5


class CrossAttention(nn.Module):
    """Multi-head softmax attention: target tokens query the source tokens. As the reference's
    CrossAttention: q, k and v each get a Linear(D, D) then a LayerNorm over the full width (eps 1e-5)
    before the split into heads; softmax(q k^T / sqrt(head_dim)) v; an output Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm, self.v_norm = (nn.LayerNorm(dim, eps=HEAD_LN_EPS) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, s, d = source.shape
        t, h = target.shape[1], self.heads
        q = self.q_norm(self.q(target)).view(n, t, h, d // h).transpose(1, 2)
        k = self.k_norm(self.k(source)).view(n, s, h, d // h).transpose(1, 2)
        v = self.v_norm(self.v(source)).view(n, s, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TokenLearnerHead(nn.Module):
    """TokenLearner over [source ; target] down to the target's token count (bottleneck = that count),
    with the reference head's LayerNorm eps (1e-5) and exact GELU (timm's Mlp), where RT-1's TokenLearner
    (policy/token_learner.py) has eps 1e-6 and flax's tanh GELU."""

    def __init__(self, dim: int, target_tokens: int):
        super().__init__()
        self.tl = TokenLearner(dim, target_tokens, hidden=target_tokens)
        self.tl.norm.eps = HEAD_LN_EPS
        self.tl.score[1] = nn.GELU()  # exact (erf) form

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
    """One block's norms, heads and ViT block; the fusions are passed in (shared by all blocks by default)."""

    def __init__(self, cfg: ImageEncoderConfig, spec: ViTSpec, process: int, memory: int, context_dim: int,
                 write: bool, drop_path: float = 0.0):
        super().__init__()
        d = spec.width
        self.read_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.read = make_head(cfg.rw_head, spec, process, cfg.rw_latent_scale)
        self.block = Block(d, spec.heads, spec.mlp_ratio, drop_path)  # the reference: timm's Block, drop_path=dpr[i]
        self.film = TokenFiLM(context_dim, d)
        # Kept without the write: the reference's process output is process_norm(write_norm(P)).
        self.write_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.write = make_head(cfg.rw_head, spec, memory, cfg.rw_latent_scale) if write else None

    def forward(self, process: torch.Tensor, memory: torch.Tensor, context: torch.Tensor, read_fusion: Fusion,
                write_fusion: Fusion | None) -> tuple[torch.Tensor, torch.Tensor]:
        memory, process = self.read_norm(memory), self.read_norm(process)
        process = read_fusion(process, self.read(memory, process))
        process = self.film(self.block(process), context)
        memory, process = self.write_norm(memory), self.write_norm(process)
        if self.write is not None:
            memory = write_fusion(memory, self.write(process, memory))
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
            ViTTMLayer(cfg, spec, process, memory, context_dim, write=i < spec.depth - 1 or last_write, drop_path=p)
            for i, p in enumerate(drop_path_rates(cfg.vit_drop_path, spec.depth)))
        writes = sum(layer.write is not None for layer in self.layers)
        # read_fusion / write_fusion: one Fusion shared by all blocks, or (fusion_gate_per_block, only
        # where it has parameters: add_erase) one per block (writes: one per writing block).
        per_block = cfg.fusion_gate_per_block and cfg.fusion == "add_erase"
        self.read_fusion: nn.Module = (nn.ModuleList(Fusion(cfg.fusion, spec.width, process) for _ in self.layers)
                                       if per_block else Fusion(cfg.fusion, spec.width, process))
        self.write_fusion: nn.Module | None = (
            None if writes == 0 else
            nn.ModuleList(Fusion(cfg.fusion, spec.width, memory) for _ in range(writes)) if per_block else
            Fusion(cfg.fusion, spec.width, memory))
        self.memory_norm = (nn.LayerNorm(spec.width, eps=LN_EPS)
                            if cfg.output_stream != "process" and cfg.memory_output_norm else None)
        self.process_norm = nn.LayerNorm(spec.width, eps=LN_EPS) if cfg.output_stream != "memory" else None
        self.to_tokens = nn.Linear(spec.width, cfg.token_dim, bias=False)
        self.token_film = TokenFiLM(context_dim, cfg.token_dim)
        init_vit_weights(self)

    def num_output_tokens(self, image_size: int | None = None) -> int:
        return {"memory": self.num_memory, "process": self.num_process,
                "both": self.num_memory + self.num_process}[self.output_stream]

    def _fusion(self, fusion: nn.Module | None, i: int) -> Fusion | None:
        return fusion[i] if isinstance(fusion, nn.ModuleList) else fusion

    def streams(self, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The process and memory streams after the last block (before the output norms)."""
        process, memory = self.process_embed(images), self.memory_embed(images)
        for i, layer in enumerate(self.layers):
            write_fusion = self._fusion(self.write_fusion, i) if layer.write is not None else None
            process, memory = layer(process, memory, context, self._fusion(self.read_fusion, i), write_fusion)
        return process, memory

    def features(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The output stream(s) after their output norms, before the projection to token_dim
        (memory first where both): the reference's forward_features tokens."""
        process, memory = self.streams(images, context)
        outs = []
        if self.output_stream != "process":
            outs.append(memory if self.memory_norm is None else self.memory_norm(memory))
        if self.process_norm is not None:
            outs.append(self.process_norm(process))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def forward(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.token_film(self.to_tokens(self.features(images, context)), context)
