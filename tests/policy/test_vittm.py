"""Image backbones (policy/backbones/), the policy around every registered backbone (`backbone_names()`, so
a newly registered backbone is picked up), FiLM; ViTTM and plain ViT specifics: token streams, options,
config errors, ViT-S/-B sizes and the ViTTM-B FLOPs claim, and the backbone benchmark. Tiny sizes throughout."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from policy.backbones import backbone_info, backbone_names, make_backbone, register_backbone
from policy.backbones.vit import FiLMViT
from policy.backbones.vittm import FiLMViTTM, LinearAttention
from policy.config import (BACKBONES, FUSIONS, RW_HEADS, ConfigError, ControllerConfig, ImageEncoderConfig,
                           LanguageConfig, ModelConfig, load_config)
from policy.film import FiLM, TokenFiLM
from policy.model import PolicyModel
from tests.helpers import ROOT
from tests.helpers import randomise_film

torch.set_num_threads(1)

A, S, VOCAB, CTX = 7, 8, 64, 16
# 32 px: 4 process tokens (16 px patches), 16 memory tokens (8 px patches); width 32, 2 blocks, 2 heads.
TINY = ImageEncoderConfig(backbone="vittm", image_size=32, vit_width=32, vit_depth=2, vit_heads=2, process_patch=16,
                          memory_patch=8, token_dim=32, num_tokens=4, tokenlearner_hidden=16, position_embedding=True)


def tiny(**changes) -> ImageEncoderConfig:
    return dataclasses.replace(TINY, **changes)


def tiny_model_config(image: ImageEncoderConfig) -> ModelConfig:
    return ModelConfig(image=image, language=LanguageConfig(width=16, heads=2, context_dim=CTX),
                       controller=ControllerConfig(memory_tokens=4, read_tokens=2, layers=1, heads=2, mlp_dim=32))


def make_policy(image: ImageEncoderConfig) -> PolicyModel:
    torch.manual_seed(0)
    return PolicyModel(tiny_model_config(image), vocab_size=VOCAB, num_action_dims=A, proprio_dim=S)


def inputs(b: int, t: int, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, t, size, size, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, VOCAB, (b, 16), generator=g)
    mask = torch.arange(16).expand(b, 16) < torch.tensor([[10], [6]])[:b]
    return images, ids, mask, torch.randn(b, t, S, generator=g)


def assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --- token streams ------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size,process_patch,memory_patch", [(32, 16, 8), (32, 8, 8), (48, 16, 4), (56, 28, 8)])
def test_process_and_memory_token_counts_as_configured(image_size, process_patch, memory_patch):
    cfg = tiny(image_size=image_size, process_patch=process_patch, memory_patch=memory_patch, num_tokens=1)
    net = FiLMViTTM(cfg, CTX).eval()
    n_process, n_memory = (image_size // process_patch) ** 2, (image_size // memory_patch) ** 2
    assert (net.num_process, net.num_memory) == (n_process, n_memory)
    assert net.process_embed.pos.shape == (1, n_process, 32) and net.memory_embed.pos.shape == (1, n_memory, 32)
    images, context = torch.randn(2, 3, image_size, image_size), torch.randn(2, CTX)
    with torch.no_grad():
        process, memory = net.streams(images, context)
        assert process.shape == (2, n_process, 32) and memory.shape == (2, n_memory, 32)
        for stream, n in [("memory", n_memory), ("process", n_process), ("both", n_memory + n_process)]:
            out_net = FiLMViTTM(dataclasses.replace(cfg, output_stream=stream), CTX).eval()
            assert out_net.num_output_tokens(image_size) == n
            assert out_net(images, context).shape == (2, n, cfg.token_dim)


def test_plain_vit_token_count_follows_its_patch():
    for vit_patch, tokens in [(0, 16), (16, 4), (4, 64)]:  # 0 = memory_patch (8)
        net = FiLMViT(tiny(backbone="vit", vit_patch=vit_patch, num_tokens=1), CTX).eval()
        assert net.num_output_tokens(32) == tokens
        with torch.no_grad():
            assert net(torch.randn(1, 3, 32, 32), torch.randn(1, CTX)).shape == (1, tokens, 32)


# --- the registry ------------------------------------------------------------------------------

def test_registry_names_are_the_config_names_and_token_counts_agree():
    assert backbone_names() == BACKBONES
    for name in backbone_names():
        info, cfg = backbone_info(name), tiny(backbone=name)
        net = make_backbone(cfg, CTX)
        assert info.name == name and isinstance(net, info.cls)
        # patch_tokens: the config alone gives the output tokens (checked at load); else the built net does.
        assert (cfg.output_tokens() is not None) == info.patch_tokens
        if info.patch_tokens:
            assert net.num_output_tokens(32) == cfg.output_tokens()
        assert info.batch_norm == any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ConfigError, match="model.image.backbone: expected one of"):
        backbone_info("resnet")
    with pytest.raises(ValueError, match="'resnet' is not an allowed model.image.backbone"):
        register_backbone("resnet")(torch.nn.Module)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("vit")(torch.nn.Module)


# --- the policy around the backbone ---------------------------------------------------------------

# Every registered backbone at the tiny size (its own fields; the others are ignored), plus ViTTM's
# other output streams.
POLICY_IMAGES = [tiny(backbone=name) for name in backbone_names()] + [tiny(output_stream="process"),
                                                                      tiny(output_stream="both")]
POLICY_IDS = list(backbone_names()) + ["vittm-process", "vittm-both"]


@pytest.mark.parametrize("image", POLICY_IMAGES, ids=POLICY_IDS)
def test_policy_forward_shapes_and_stepwise_inference(image):
    model = make_policy(image)
    positions = model.backbone.num_output_tokens(32)
    assert model.image_pos.shape == (1, positions, 32)
    randomise_film(model)
    model.eval()
    images, ids, mask, proprio = inputs(2, 3)
    with torch.no_grad():
        context = model.encode_instruction(ids, mask)
        tokens = model.encode_frames(images[:, 0], context, proprio[:, 0])
        assert tokens.shape == (2, image.num_tokens + 1, image.token_dim)  # what the controller expects
        full = model(images, context, proprio)
        assert full.shape == (2, 3, A, 256) and torch.isfinite(full).all()
        state = model.init_state(2)
        for t in range(3):
            logits, state = model.step(images[:, t], context, proprio[:, t], state)
            assert (logits - full[:, t]).abs().max() <= 1e-5


@pytest.mark.parametrize("image", POLICY_IMAGES, ids=POLICY_IDS)
def test_gradient_reaches_every_parameter(image):
    model = make_policy(image)
    randomise_film(model)
    model.train()
    images, ids, mask, proprio = inputs(2, 3)
    logits = model(images, model.encode_instruction(ids, mask), proprio)
    torch.nn.functional.cross_entropy(logits.flatten(0, 2), torch.randint(0, 256, (2 * 3 * A,))).backward()
    assert_every_parameter_has_a_gradient(model)


# --- FiLM ---------------------------------------------------------------------------------------

def test_token_film_is_identity_at_init_and_modulates_channels():
    film = TokenFiLM(CTX, 8)
    x, c = torch.randn(2, 5, 8), torch.randn(2, CTX)
    assert torch.equal(film(x, c), x)
    with torch.no_grad():
        film.gamma.bias.fill_(1.0)
        film.beta.bias.fill_(0.5)
    torch.testing.assert_close(film(x, c), 2 * x + 0.5)


@pytest.mark.parametrize("backbone", backbone_names())
def test_film_after_every_block_is_identity_at_init(backbone):
    net = make_backbone(tiny(backbone=backbone), CTX)
    films = [m for m in net.modules() if isinstance(m, FiLM)]
    blocks = net.spec.depth if hasattr(net, "spec") else len(net.blocks)  # ViT family: depth 2
    assert len(films) == blocks + 1  # one per block + one on the output tokens
    assert all(not f.gamma.weight.any() and not f.beta.weight.any() for f in films)
    net.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(images, torch.randn(2, CTX)), net(images, torch.randn(2, CTX)))
        randomise_film(net)
        assert not torch.allclose(net(images, torch.randn(2, CTX)), net(images, torch.randn(2, CTX)))


def test_film_starts_as_identity_in_the_policy():
    model = make_policy(tiny()).eval()
    images, ids, mask, proprio = inputs(2, 2)
    with torch.no_grad():
        a = model(images, model.encode_instruction(ids, mask), proprio)
        b = model(images, torch.randn(2, CTX), proprio)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- read/write heads and fusion -----------------------------------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rw_head", RW_HEADS)
def test_every_read_write_head_and_fusion_runs_and_trains(rw_head, fusion):
    torch.manual_seed(0)
    net = FiLMViTTM(tiny(rw_head=rw_head, fusion=fusion), CTX)
    randomise_film(net)
    out = net(torch.randn(2, 3, 32, 32), torch.randn(2, CTX))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert_every_parameter_has_a_gradient(net)


def test_linear_attention_equals_its_quadratic_form():
    torch.manual_seed(0)
    head = LinearAttention(dim=16, heads=2, latent=4)
    source, target = torch.randn(3, 10, 16), torch.randn(3, 6, 16)
    out = head(source, target)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    q = phi(head.q(target)).view(3, 6, 2, 2).transpose(1, 2)  # [N,H,T,c]
    k = phi(head.k(source)).view(3, 10, 2, 2).transpose(1, 2)  # [N,H,S,c]
    v = head.v(source).view(3, 10, 2, 8).transpose(1, 2)  # [N,H,S,e]
    scores = q @ k.transpose(-1, -2)  # [N,H,T,S], all positive
    expected = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(3, 6, 16))


def test_only_process_output_skips_the_unread_last_write():
    layers = FiLMViTTM(tiny(output_stream="process"), CTX).layers
    assert layers[0].write is not None and layers[-1].write is None
    assert all(layer.write is not None for layer in FiLMViTTM(tiny(), CTX).layers)


# --- config errors --------------------------------------------------------------------------------

BAD = [
    ("backbone", "resnet"),
    ("vit_size", "xl"),
    ("vit_heads", 3),  # 32 is not divisible by 3
    ("vit_depth", -1),
    ("vit_mlp_ratio", 0.0),
    ("process_patch", 12),  # does not divide 32
    ("memory_patch", 5),
    ("memory_patch", 32),  # larger than process_patch: fewer memory than process tokens
    ("rw_head", "lstm"),
    ("fusion", "multiply"),
    ("output_stream", "cls"),
    ("rw_latent_scale", 3),
    ("num_tokens", 17),  # more than the 16 memory tokens
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_config_raises_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"model.image.{field}"):
        make_policy(tiny(**{field: value}))
    default = dataclasses.asdict(ImageEncoderConfig())  # only the changed fields ("" does not survive key=value)
    overrides = [f"model.image.{k}={v}" for k, v in dataclasses.asdict(tiny(**{field: value})).items()
                 if v != default[k]]
    with pytest.raises(ConfigError, match=f"model.image.{field}"):
        load_config(None, overrides)


def test_tokenlearner_size_is_checked_against_the_output_stream_and_vit_patch():
    with pytest.raises(ConfigError, match="model.image.num_tokens"):
        make_policy(tiny(output_stream="process", num_tokens=5))  # 4 process tokens
    make_policy(tiny(output_stream="process", num_tokens=4))
    with pytest.raises(ConfigError, match="model.image.vit_patch"):
        make_policy(tiny(backbone="vit", vit_patch=7))
    with pytest.raises(ConfigError, match="model.image.num_tokens"):
        make_policy(tiny(backbone="vit", vit_patch=16, num_tokens=5))  # 4 tokens
    with pytest.raises(ConfigError, match="model.image.num_tokens"):
        load_config(None, ["model.image.backbone=vittm", "model.image.output_stream=process",
                           "model.image.num_tokens=17"])  # 64 px / 16 px patches: 16 process tokens


# --- sizes and FLOPs ----------------------------------------------------------------------------

def _vit16_and_vittm28(size: str) -> tuple[FiLMViT, FiLMViTTM]:
    """At 224 px on the meta device (no memory): ViT-<size>/16 and ViTTM-<size> with 64 + 64 tokens."""
    common = dict(vit_size=size, image_size=224, token_dim=512)
    with torch.device("meta"):
        return (FiLMViT(ImageEncoderConfig(backbone="vit", vit_patch=16, **common), 512),
                FiLMViTTM(ImageEncoderConfig(backbone="vittm", process_patch=28, memory_patch=28, **common), 512))


def _vit_block_params(d: int) -> int:
    return 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)


@pytest.mark.parametrize("size,width,timm_params", [("s", 384, 21_665_664), ("b", 768, 85_798_656)])
def test_vit_and_vittm_s_b_sizes(size, width, timm_params):
    """ViT-S/16 and ViT-B/16 at 224 without classifier: 21.7M and 85.8M (timm; 22M / 86M in the papers).
    Ours has no class token (one token and one position fewer); ViTTM adds a second patch embedding and
    position embedding and, per block, two linear-attention heads (q, k: d -> d/4, v: d -> d) and two
    shared LayerNorms; its memory output has no LayerNorm (as the reference). FiLM (2 x Linear(512, d) per
    block, + one on the 512 output tokens) and the output projection come on top of both."""
    def split(net):
        film = sum(p.numel() for m in net.modules() if isinstance(m, FiLM) for p in m.parameters())
        return sum(p.numel() for p in net.parameters()) - film, film

    vit, vittm = _vit16_and_vittm28(size)
    assert vit.spec == vittm.spec and (vit.spec.width, vit.spec.depth) == (width, 12)
    proj = width * 512
    film = 12 * 2 * (512 * width + width) + 2 * (512 * 512 + 512)
    vit_params, vit_film = split(vit)
    assert vit_params - proj == timm_params - 2 * width and vit_film == film
    assert vit_params - proj == 12 * _vit_block_params(width) + (768 * width + width) + 196 * width + 2 * width
    vittm_params, vittm_film = split(vittm)
    heads = 2 * ((width * width // 4 + width // 4) * 2 + width * width + width)
    embeddings = 2 * (28 * 28 * 3 * width + width + 64 * width)
    expected = 12 * (_vit_block_params(width) + heads + 2 * 2 * width) + embeddings
    assert vittm_params - proj == expected and vittm_film == film
    assert 1.2 < vittm_params / vit_params < 1.35  # heads cost about a quarter of the ViT blocks


def _gmacs(net: torch.nn.Module, size: int = 224) -> float:
    from rollout.bench.backbone import count_flops  # the benchmark's counter (attention included)

    with torch.device("meta"):
        images, context = torch.empty(1, 3, size, size), torch.empty(1, 512)
    return count_flops(net, images, context) / 2e9


def test_vittm_b_uses_about_2_4x_fewer_flops_than_vit_b():
    """Paper: ViTTM-B (64 process, 64 memory tokens) has 2.4x fewer FLOPs than ViT-B/16 (17.6 GMACs)."""
    vit, vittm = _vit16_and_vittm28("b")
    vit_gmacs, vittm_gmacs = _gmacs(vit), _gmacs(vittm)
    assert math.isclose(vit_gmacs, 17.6, abs_tol=0.2)  # attention counted; + FiLM and the 768 -> 512 projection
    assert 2.3 < vit_gmacs / vittm_gmacs < 2.6


def test_flop_count_includes_attention_on_cpu_tensors():
    """CPU's fused attention kernel has no FlopCounterMode formula; the benchmark must still count it."""
    from rollout.bench.backbone import count_flops

    torch.manual_seed(0)
    net = FiLMViT(tiny(backbone="vit", num_tokens=1), CTX).eval()  # 16 tokens, width 32, 2 blocks
    flops = count_flops(net, torch.randn(1, 3, 32, 32), torch.randn(1, CTX))
    with torch.device("meta"):
        meta_net = FiLMViT(tiny(backbone="vit", num_tokens=1), CTX)
        meta_flops = count_flops(meta_net, torch.empty(1, 3, 32, 32), torch.empty(1, CTX))
    assert flops == meta_flops
    # multiply-adds: patch conv; per block qkv, proj, MLP, attention (QK^T and AV), FiLM; projection, FiLM
    per_block = 16 * 32 * (3 * 32 + 32 + 2 * 4 * 32) + 2 * 16 * 16 * 32 + 2 * CTX * 32
    macs = 16 * (8 * 8 * 3) * 32 + 2 * per_block + 16 * 32 * 32 + 2 * CTX * 32
    assert flops == 2 * macs


def test_rt1_vittm_config_builds_with_512_wide_tokens():
    cfg = load_config(ROOT / "configs" / "rt1_ttm_vittm.yaml")
    assert cfg.model.image.backbone == "vittm" and cfg.model.image.token_dim == 512
    with torch.device("meta"):
        model = PolicyModel(cfg.model, vocab_size=cfg.model.language.vocab_size, num_action_dims=A, proprio_dim=S)
    assert (model.backbone.num_process, model.backbone.num_memory) == (64, 196)
    assert model.backbone.num_output_tokens(224) == 196 and model.backbone.spec.width == 384


# --- benchmark ------------------------------------------------------------------------------------

def test_bench_backbone_tiny(tmp_path):
    from rollout.bench.backbone import bench_backbone
    from run_policy import main

    res = bench_backbone(image_size=32, threads=1, steps=2, vit_size="tiny", process_patch=16, memory_patch=8,
                         efficientnet_variant="quickstart", token_dim=32, context_dim=16, warmup=1)
    names = list(res["backbones"])
    assert names[0] == "efficientnet-quickstart" and len(names) == 4
    for r in res["backbones"].values():
        assert r["gflops"] > 0 and r["median_ms"] > 0 and r["params"] > 0
    vittm = res["backbones"]["vittm-tiny process/16 memory/8"]
    assert vittm["output_tokens"] == 16 and res["backbones"]["vit-tiny/8"]["output_tokens"] == 16
    assert res["backbones"][names[0]]["flops_vs_efficientnet"] == 1.0
    out = tmp_path / "bench.json"
    assert main(["bench", "backbone", "--image-size", "32", "--threads", "1", "--steps", "1", "--vit-size", "tiny",
                 "--process-patch", "16", "--memory-patch", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "backbone" and data["image_size"] == 32 and "efficientnet-b3" in data["backbones"]
