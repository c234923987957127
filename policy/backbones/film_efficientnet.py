"""FiLM-conditioned EfficientNet image tokenizer (RT-1's image encoder).

EfficientNet B0..B7 by compound scaling of the B0 stage table, with the Keras conventions RT-1 was
trained with: BatchNorm momentum 0.99 / eps 1e-3 (TF terms), swish, squeeze-excitation sized from the
block's *input* width, stochastic depth growing linearly with block index, and the asymmetric zero
padding Keras applies to strided convs when the input size is unknown: (k//2 - 1) before, k//2 after.
That padding gives floor(size / 2) per stride-2 conv, so B3 at 300x300 yields a 9x9 map (81 tokens)
where symmetric or true TF "same" padding yields 10x10.

A FiLM layer follows every MBConv block; the top conv is followed by a 1x1 conv (no bias) to
`token_dim` and one final FiLM (policy/film.py). Output: [N, h*w, token_dim] tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from policy.backbones.registry import register_backbone
from policy.config import EFFICIENTNET_VARIANTS, ImageEncoderConfig
from policy.film import FiLM

# Keras BatchNormalization(momentum=0.99, epsilon=1e-3); torch's momentum is 1 - Keras momentum.
_KERAS_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


@dataclass(frozen=True)
class Stage:
    kernel: int
    repeats: int
    in_ch: int
    out_ch: int
    expand: int
    stride: int
    se_ratio: float = 0.25


@dataclass(frozen=True)
class Variant:
    stages: tuple[Stage, ...]
    stem_ch: int
    top_ch: int
    width: float
    depth: float
    drop_connect: float  # stochastic-depth rate of the last block (Keras default 0.2)
    bn_momentum: float = _KERAS_BN_MOMENTUM  # torch convention: weight of the new batch in running stats


_B0_STAGES = (
    Stage(3, 1, 32, 16, 1, 1),
    Stage(3, 2, 16, 24, 6, 2),
    Stage(5, 2, 24, 40, 6, 2),
    Stage(3, 3, 40, 80, 6, 2),
    Stage(5, 3, 80, 112, 6, 1),
    Stage(5, 4, 112, 192, 6, 2),
    Stage(3, 1, 192, 320, 6, 1),
)
# (width, depth) coefficients of the published variants.
_SCALING = {
    "b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4),
    "b4": (1.4, 1.8), "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1),
}
VARIANTS: dict[str, Variant] = {
    name: Variant(_B0_STAGES, 32, 1280, w, d, 0.2) for name, (w, d) in _SCALING.items()
}
# Narrow and shallow for 64x64 CPU training: three stride-2 steps (8x8 map at 64 px), one block per
# stage, expansion 4 instead of 6, and no stochastic depth (too few blocks for it to help). BatchNorm
# running stats use torch's 0.1 (Keras 0.9): with Keras' 0.99 they lag a small net trained for a few
# hundred steps so far behind that eval-mode accuracy drops to chance while train-mode accuracy is ~1.
VARIANTS["quickstart"] = Variant(
    stages=(
        Stage(3, 1, 16, 16, 1, 1),
        Stage(3, 1, 16, 24, 4, 2),
        Stage(5, 1, 24, 40, 4, 2),
        Stage(3, 1, 40, 64, 4, 1),
        Stage(5, 1, 64, 96, 4, 1),
    ),
    stem_ch=16, top_ch=256, width=1.0, depth=1.0, drop_connect=0.0, bn_momentum=0.1,
)
if set(VARIANTS) != set(EFFICIENTNET_VARIANTS):
    raise ImportError(f"policy.backbones.film_efficientnet: variants {sorted(VARIANTS)} differ from "
                      f"EFFICIENTNET_VARIANTS {sorted(EFFICIENTNET_VARIANTS)} in policy/config.py")


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width` and round to a multiple of `divisor` (never down by > 10%)."""
    filters *= width
    rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * filters:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def _bn(ch: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=momentum)


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BN -> optional swish; stride 2 uses Keras' asymmetric zero padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bn_momentum: float, stride: int = 1, groups: int = 1,
                 act: bool = True):
        pad: list[nn.Module] = []
        if stride == 2:
            pad = [nn.ZeroPad2d((kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2))]
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0 if stride == 2 else kernel // 2,
                         groups=groups, bias=False)
        super().__init__(*pad, conv, _bn(out_ch, bn_momentum), *([nn.SiLU()] if act else []))


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(ch, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1 -> depthwise kxk -> SE -> project 1x1 (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, se_ratio: float,
                 drop_rate: float, bn_momentum: float):
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBN(in_ch, mid, 1, bn_momentum) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, bn_momentum, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio)))
        self.project = ConvBN(mid, out_ch, 1, bn_momentum, act=False)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.residual:
            return y
        if self.training and self.drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample.
            keep = 1.0 - self.drop_rate
            y = y * torch.empty(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype).bernoulli_(keep) / keep
        return x + y


def resolve_variant(cfg: ImageEncoderConfig) -> Variant:
    """The variant's table with cfg.width_mult / cfg.depth_mult applied on top of its coefficients
    (cfg checked by ImageEncoderConfig.validate)."""
    v = VARIANTS[cfg.variant]
    return dataclasses.replace(v, width=v.width * cfg.width_mult, depth=v.depth * cfg.depth_mult)


@register_backbone("efficientnet", batch_norm=True)
class FiLMEfficientNet(nn.Module):
    """[N,3,H,W] normalised images + [N,C] context -> [N, h*w, token_dim] tokens."""

    def __init__(self, cfg: ImageEncoderConfig, context_dim: int):
        super().__init__()
        v = resolve_variant(cfg)
        stem_ch = round_filters(v.stem_ch, v.width)
        self.stem = ConvBN(3, stem_ch, 3, v.bn_momentum, stride=2)
        specs = []
        for st in v.stages:
            in_ch, out_ch = round_filters(st.in_ch, v.width), round_filters(st.out_ch, v.width)
            for j in range(round_repeats(st.repeats, v.depth)):
                specs.append((in_ch if j == 0 else out_ch, out_ch, st.kernel, st.stride if j == 0 else 1,
                              st.expand, st.se_ratio))
        self.blocks = nn.ModuleList(
            MBConv(*s, drop_rate=v.drop_connect * i / len(specs), bn_momentum=v.bn_momentum)
            for i, s in enumerate(specs))
        self.block_films = nn.ModuleList(FiLM(context_dim, s[1]) for s in specs)
        self.top = ConvBN(specs[-1][1], round_filters(v.top_ch, v.width), 1, v.bn_momentum)
        self.to_tokens = nn.Conv2d(round_filters(v.top_ch, v.width), cfg.token_dim, 1, bias=False)
        self.token_film = FiLM(context_dim, cfg.token_dim)
        self.num_strides = 1 + sum(s[3] == 2 for s in specs)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")  # Keras EfficientNet's conv init
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def feature_size(self, image_size: int) -> int:
        """Side of the output map: each stride-2 conv maps s -> floor(s / 2) with the asymmetric padding."""
        for _ in range(self.num_strides):
            image_size //= 2
        return image_size

    def num_output_tokens(self, image_size: int) -> int:
        """Tokens per image: the output map's positions."""
        return self.feature_size(image_size) ** 2

    def forward(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # channels_last lets oneDNN/cuDNN skip layout reorders around every conv (~1.5x on CPU training).
        x = self.stem(images.contiguous(memory_format=torch.channels_last))
        for block, film in zip(self.blocks, self.block_films):
            x = film(block(x), context)
        x = self.token_film(self.to_tokens(self.top(x)), context)
        return x.flatten(2).transpose(1, 2)
