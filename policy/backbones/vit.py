"""FiLM-conditioned Vision Transformer pieces, and a plain ViT backbone (the baseline for ViTTM).

Standard pre-LN ViT blocks (LayerNorm eps 1e-6, multi-head softmax self-attention with a qkv bias,
MLP with GELU and ratio 4), a non-overlapping patch embedding (a conv with kernel = stride = patch)
and a learned position embedding; no class token (the tokens go to TokenLearner, not a classifier).

Language conditioning as in RT-1's FiLM-EfficientNet: a FiLM layer after every block, then a final
LayerNorm, a Linear (no bias) to `token_dim` and one more FiLM. FiLM is zero-initialised, so the
backbone is language-independent at init. Output: [N, (image_size / patch)^2, token_dim] tokens.

Sizes (`model.image.vit_size`): "s" = ViT-S (width 384, depth 12, 6 heads), "b" = ViT-B (768, 12, 12),
"tiny" = a CPU size (128, 4, 4; not ViT-Ti). `vit_width` / `vit_depth` / `vit_heads` > 0 override
the preset's value. The presets and checks live in policy/config.py (VIT_SIZES, ImageEncoderConfig).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.backbones.registry import register_backbone
from policy.config import ImageEncoderConfig
from policy.film import FiLM, TokenFiLM

LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """[N,3,H,W] -> [N, (H/p)*(W/p), width] with a learned position embedding."""

    def __init__(self, image_size: int, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.num_tokens = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2) + self.pos


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch, as timm's DropPath: in training, each sample's branch is
    dropped with probability p and the kept ones are scaled by 1 / (1 - p); the identity in evaluation."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block rates rising linearly from 0 to `rate` over the depth (timm's and EfficientTTMs' schedule)."""
    # as torch.linspace(0, rate, depth), without a tensor (meta-device safe): one block gets 0, like timm's
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth


class Block(nn.Module):
    """Pre-LN transformer encoder block (ViT); `drop_path`: stochastic depth rate of both residual branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def init_vit_weights(module: nn.Module) -> None:
    """ViT init (truncated normal 0.02 for Linear, Xavier-uniform for patch convs, zero biases);
    FiLM layers keep their zero init."""
    film_linears = {id(lin) for m in module.modules() if isinstance(m, FiLM) for lin in (m.gamma, m.beta)}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in film_linears:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TokenOutput(nn.Module):
    """Final LayerNorm -> Linear(width -> token_dim, no bias) -> FiLM."""

    def __init__(self, width: int, token_dim: int, context_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.proj = nn.Linear(width, token_dim, bias=False)
        self.film = TokenFiLM(context_dim, token_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.film(self.proj(self.norm(x)), context)


@register_backbone("vit", patch_tokens=True)
class FiLMViT(nn.Module):
    """Plain ViT: [N,3,H,W] normalised images + [N,C] context -> [N, (H/patch)^2, token_dim] tokens.
    The patch is `vit_patch` (0 = `memory_patch`: as many output tokens as ViTTM's memory stream)."""

    def __init__(self, cfg: ImageEncoderConfig, context_dim: int):
        super().__init__()
        spec = cfg.vit_spec()
        self.spec = spec
        self.patch = cfg.plain_vit_patch()
        self.embed = PatchEmbed(cfg.image_size, self.patch, spec.width)
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads, spec.mlp_ratio, p)
                                    for p in drop_path_rates(cfg.vit_drop_path, spec.depth))
        self.films = nn.ModuleList(TokenFiLM(context_dim, spec.width) for _ in range(spec.depth))
        self.out = TokenOutput(spec.width, cfg.token_dim, context_dim)
        init_vit_weights(self)

    def num_output_tokens(self, image_size: int) -> int:
        return (image_size // self.patch) ** 2

    def forward(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block, film in zip(self.blocks, self.films):
            x = film(block(x), context)
        return self.out(x, context)
