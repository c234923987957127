"""FiLM-conditioned EfficientNet image tokenizer (RT-1's image encoder).

EfficientNet B0..B7 by compound scaling of the B0 stage table, with the Keras conventions RT-1 was
trained with: BatchNorm momentum 0.99 / eps 1e-3 (TF terms), swish, squeeze-excitation sized from the
block's *input* width, stochastic depth growing linearly with block index, and the asymmetric zero
padding Keras applies to strided convs when the input size is unknown: (k//2 - 1) before, k//2 after.
That padding gives floor(size / 2) per stride-2 conv, so B3 at 300x300 yields a 9x9 map (81 tokens)
where symmetric or true TF "same" padding yields 10x10.

A FiLM layer follows every MBConv block; the top conv is followed by a 1x1 conv (no bias) to
`token_dim` and one final FiLM (policy/film.py). Output: [N, h*w, token_dim] tokens.

EfficientNet-Lite0..2 (TF's efficientnet/lite): the same stage table without squeeze-excitation, ReLU6
instead of swish, and a fixed stem (32), head (1280) and first / last stage depth.

`model.image.pretrained` loads ImageNet weights (policy/backbones/pretrained.py) after the random init;
`model.image.padding` picks the stride-2 padding ("keras", TF "same", "symmetric") and the pretrained
format picks BatchNorm's epsilon (ImageEncoderConfig.bn_eps), so each format's features come out unchanged.
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

# What our frames are normalised with (policy/preprocessing.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    se_ratio: float = 0.25  # 0 = no squeeze-excitation (EfficientNet-Lite)


@dataclass(frozen=True)
class Variant:
    stages: tuple[Stage, ...]
    stem_ch: int
    top_ch: int
    width: float
    depth: float
    drop_connect: float  # stochastic-depth rate of the last block (Keras default 0.2)
    bn_momentum: float = _KERAS_BN_MOMENTUM  # torch convention: weight of the new batch in running stats
    act: str = "silu"  # "silu" (swish) or "relu6" (EfficientNet-Lite)
    # EfficientNet-Lite: stem and head widths and the first and last stages' depths are not scaled.
    fixed_stem_head: bool = False


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
# EfficientNet-Lite (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py): no SE, ReLU6, fixed stem/head.
_LITE_STAGES = tuple(dataclasses.replace(st, se_ratio=0.0) for st in _B0_STAGES)
for _name, (_w, _d) in {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}.items():
    VARIANTS[_name] = Variant(_LITE_STAGES, 32, 1280, _w, _d, 0.2, act="relu6", fixed_stem_head=True)
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


@dataclass(frozen=True)
class Norm:
    """BatchNorm settings (torch momentum convention) and the activation of a network."""
    momentum: float
    eps: float = _BN_EPS
    act: str = "silu"

    def bn(self, ch: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(ch, eps=self.eps, momentum=self.momentum)

    def activation(self) -> nn.Module:
        return nn.ReLU6() if self.act == "relu6" else nn.SiLU()


class SamePad(nn.Module):
    """TensorFlow "SAME" zero padding for a strided conv: total max((ceil(s/st)-1)*st + k - s, 0), the
    smaller half before (asymmetric when the size is even, symmetric when odd). Has no parameters."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def stride2_pad(kernel: int, padding: str) -> nn.Module:
    """The zero padding before a stride-2 conv (model.image.padding, resolved)."""
    if padding == "keras":
        return nn.ZeroPad2d((kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2))
    if padding == "symmetric":
        return nn.ZeroPad2d(kernel // 2)
    if padding == "same":
        return SamePad(kernel, 2)
    raise ValueError(f"model.image.padding: expected 'keras', 'same' or 'symmetric', got {padding!r}")


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BN -> optional activation; stride 2 pads first (a parameter-free module at index 0:
    state-dict keys do not depend on the padding mode)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, norm: Norm, stride: int = 1, groups: int = 1,
                 act: bool = True, padding: str = "keras"):
        pad: list[nn.Module] = [stride2_pad(kernel, padding)] if stride == 2 else []
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0 if stride == 2 else kernel // 2,
                         groups=groups, bias=False)
        super().__init__(*pad, conv, norm.bn(out_ch), *([norm.activation()] if act else []))


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(ch, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1 -> depthwise kxk -> SE (unless se_ratio is 0) -> project 1x1
    (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, se_ratio: float,
                 drop_rate: float, norm: Norm, padding: str = "keras"):
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBN(in_ch, mid, 1, norm) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, norm, stride, groups=mid, padding=padding)
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.project = ConvBN(mid, out_ch, 1, norm, act=False)
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
        self.variant = cfg.variant
        self.padding = cfg.resolved_padding()
        norm = Norm(v.bn_momentum, cfg.bn_eps(), v.act)
        stem_ch = v.stem_ch if v.fixed_stem_head else round_filters(v.stem_ch, v.width)
        top_ch = v.top_ch if v.fixed_stem_head else round_filters(v.top_ch, v.width)
        self.stem = ConvBN(3, stem_ch, 3, norm, stride=2, padding=self.padding)
        specs = []
        # (stage, index within the stage) of every block: the pretrained formats' block names.
        self.block_ids: list[tuple[int, int]] = []
        for i, st in enumerate(v.stages):
            in_ch = stem_ch if i == 0 else round_filters(st.in_ch, v.width)
            out_ch = round_filters(st.out_ch, v.width)
            fixed = v.fixed_stem_head and i in (0, len(v.stages) - 1)
            for j in range(st.repeats if fixed else round_repeats(st.repeats, v.depth)):
                specs.append((in_ch if j == 0 else out_ch, out_ch, st.kernel, st.stride if j == 0 else 1,
                              st.expand, st.se_ratio))
                self.block_ids.append((i, j))
        self.blocks = nn.ModuleList(
            MBConv(*s, drop_rate=v.drop_connect * i / len(specs), norm=norm, padding=self.padding)
            for i, s in enumerate(specs))
        self.block_films = nn.ModuleList(FiLM(context_dim, s[1]) for s in specs)
        self.top = ConvBN(specs[-1][1], top_ch, 1, norm)
        self.feature_dim = top_ch
        self.to_tokens = nn.Conv2d(top_ch, cfg.token_dim, 1, bias=False)
        self.token_film = FiLM(context_dim, cfg.token_dim)
        self.num_strides = 1 + sum(s[3] == 2 for s in specs)
        self._init_weights()
        # Weights that expect another input normalisation than ours (ImageNet mean / std): x * scale + shift
        # turns our input into theirs (not saved: follows from the config).
        norm_px = cfg.pretrained_input_norm()
        scale = shift = None
        if norm_px is not None:
            mean_w, std_w = norm_px
            std, mean = torch.tensor(IMAGENET_STD) * 255, torch.tensor(IMAGENET_MEAN) * 255
            scale, shift = (std / std_w).view(1, 3, 1, 1), ((mean - mean_w) / std_w).view(1, 3, 1, 1)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.pretrained_report = None
        if cfg.pretrained:
            from policy.backbones.pretrained import load_pretrained, pretrained_loading_enabled

            if pretrained_loading_enabled():
                self.pretrained_report = load_pretrained(self, cfg)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")  # Keras EfficientNet's conv init
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def feature_size(self, image_size: int) -> int:
        """Side of the output map: each stride-2 conv maps s -> floor(s / 2) with the keras padding,
        ceil(s / 2) with same or symmetric padding."""
        for _ in range(self.num_strides):
            image_size = image_size // 2 if self.padding == "keras" else (image_size + 1) // 2
        return image_size

    def num_output_tokens(self, image_size: int) -> int:
        """Tokens per image: the output map's positions."""
        return self.feature_size(image_size) ** 2

    def features(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The top conv's activations [N, feature_dim, h, w]: what an ImageNet EfficientNet without its
        classifier outputs (Keras include_top=False), FiLM-conditioned after every block."""
        if self.input_scale is not None:
            images = images * self.input_scale + self.input_shift
        # channels_last lets oneDNN/cuDNN skip layout reorders around every conv (~1.5x on CPU training).
        x = self.stem(images.contiguous(memory_format=torch.channels_last))
        for block, film in zip(self.blocks, self.block_films):
            x = film(block(x), context)
        return self.top(x)

    def forward(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.token_film(self.to_tokens(self.features(images, context)), context)
        return x.flatten(2).transpose(1, 2)
