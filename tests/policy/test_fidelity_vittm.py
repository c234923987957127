"""ViTTM fidelity to the paper (Jajal et al. 2024) and its reference code (pjjajal/EfficientTTMs,
models/vittm/: vittm.py, rw_heads.py, fusion.py; timm 1.0.9 ViT blocks). Each numeric choice of
policy/backbones/vittm.py is pinned against a small re-derivation written here from those equations
(plain tensor algebra: unfolded patches, hand-written LayerNorm, GELU, softmax and linear attention),
not by calling our modules' forward. The reference itself is not needed: with weights copied from it,
our module matched it exactly in float32 at ViTTM-S and ViTTM-B sizes (max abs difference 0;
docs/MODELS.md). Parameter counts are checked against the paper's table (ViTTM-S(64,64) 33M,
ViTTM-B(64,64) 127M, ViTTM-B(49,196) 125M) on the meta device."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from policy.backbones.vittm import CrossAttention, FiLMViTTM, Fusion, LinearAttention, TokenLearnerHead
from policy.config import FUSIONS, RW_HEADS, ImageEncoderConfig
from policy.film import FiLM

torch.set_num_threads(1)
CTX = 8
# 32 px: 4 process tokens (16 px patches), 16 memory tokens (8 px patches); width 32, 2 blocks, 2 heads.
TINY = ImageEncoderConfig(backbone="vittm", image_size=32, vit_width=32, vit_depth=2, vit_heads=2, process_patch=16,
                          memory_patch=8, token_dim=32, num_tokens=1, output_stream="both")


def tiny(**changes) -> ImageEncoderConfig:
    return dataclasses.replace(TINY, **changes)


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere except FiLM (kept at its zero init: the identity), so that every LayerNorm
    affine, bias and gate matters."""
    g = torch.Generator().manual_seed(seed)
    film = {id(p) for m in net.modules() if isinstance(m, FiLM) for p in m.parameters()}
    norms = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in net.parameters():
            if id(p) not in film:
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() == 2 or p.dim() == 4 else 0.2
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if id(p) in norms else 0.0))
    return net.eval()


# --- the paper's / reference's equations, written out -----------------------------------------------

def layer_norm(x, mod, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as torch.nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * mod.weight + mod.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU (timm's nn.GELU), not the tanh form


def linear(x, mod):
    return x @ mod.weight.T + (mod.bias if mod.bias is not None else 0)


def softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def patch_embed(images, embed, patch):
    """Non-overlapping p x p patches in row-major order, each flattened (channel, row, column) as a conv
    kernel, times the kernel, plus bias, plus the learned position embedding."""
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
    return patches @ embed.proj.weight.reshape(embed.proj.weight.shape[0], -1).T + embed.proj.bias + embed.pos


def split_heads(x, heads):  # [N,L,H*c] -> [N,H,L,c]
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x):  # [N,H,L,c] -> [N,L,H*c]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def linear_attention(head, source, target, heads):
    """Katharopoulos et al.: phi = elu + 1; out_t = sum_s (phi(q_t).phi(k_s)) v_s / (phi(q_t).sum_s phi(k_s) + 1e-6),
    written in its quadratic form (no output projection: the reference's `proj` is never applied)."""
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731  elu(x) + 1
    q, k = split_heads(phi(linear(target, head.q)), heads), split_heads(phi(linear(source, head.k)), heads)
    v = split_heads(linear(source, head.v), heads)
    scores = q @ k.transpose(-1, -2)  # [N,H,T,S]
    return merge_heads((scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6))


def cross_attention(head, source, target, heads):
    """Reference CrossAttention: LayerNorm(eps 1e-5) over the full width after each of q, k, v; softmax
    attention with scale head_dim^-0.5; output Linear."""
    q = split_heads(layer_norm(linear(target, head.q), head.q_norm, 1e-5), heads)
    k = split_heads(layer_norm(linear(source, head.k), head.k_norm, 1e-5), heads)
    v = split_heads(layer_norm(linear(source, head.v), head.v_norm, 1e-5), heads)
    attn = softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    return linear(merge_heads(attn @ v), head.proj)


def token_learner(head, source, target):
    """Reference TokenLearner head: over [source ; target], LayerNorm(eps 1e-5) -> Linear GELU Linear to T
    scores per position, softmax over the S + T positions, weighted sums of the un-normalised tokens."""
    x = torch.cat([source, target], dim=1)
    fc1, fc2 = head.tl.score[0], head.tl.score[2]
    scores = linear(gelu(linear(layer_norm(x, head.tl.norm, 1e-5), fc1)), fc2)  # [N,S+T,T]
    return softmax(scores.transpose(1, 2)) @ x


def read_write(kind, head, source, target, heads):
    if kind == "linear":
        return linear_attention(head, source, target, heads)
    if kind == "attention":
        return cross_attention(head, source, target, heads)
    return token_learner(head, source, target)


def fuse(kind, fusion, target, rw):
    if kind == "add":
        return target + rw
    if kind == "erase":
        return rw
    g = torch.sigmoid(linear(rw.mean(dim=1), fusion.gate)).unsqueeze(-1)  # one gate per target token
    return target * (1 - g) + rw * g


def vit_block(block, x, heads):
    """timm's pre-LN Block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6; qkv with bias."""
    qkv = linear(layer_norm(x, block.norm1, 1e-6), block.attn.qkv)
    q, k, v = (split_heads(t, heads) for t in qkv.chunk(3, dim=-1))
    x = x + linear(merge_heads(softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])) @ v), block.attn.proj)
    return x + linear(gelu(linear(layer_norm(x, block.norm2, 1e-6), block.mlp[0])), block.mlp[2])


def reference_features(net, cfg, images):
    """The reference's forward_features (global_pool 'avg'): returns (memory, process) after the final
    norms, the memory stream un-normalised (`norm` is the identity), the process stream LayerNormed."""
    heads = cfg.vit_spec().heads
    process = patch_embed(images, net.process_embed, cfg.process_patch)
    memory = patch_embed(images, net.memory_embed, cfg.memory_patch)
    gate = lambda f, i: f[i] if isinstance(f, torch.nn.ModuleList) else f  # noqa: E731
    for i, layer in enumerate(net.layers):
        memory, process = layer_norm(memory, layer.read_norm, 1e-6), layer_norm(process, layer.read_norm, 1e-6)
        # read: the process tokens query the memory tokens
        process = fuse(cfg.fusion, gate(net.read_fusion, i), process,
                       read_write(cfg.rw_head, layer.read, memory, process, heads))
        process = vit_block(layer.block, process, heads)  # FiLM at its zero init: the identity
        memory, process = layer_norm(memory, layer.write_norm, 1e-6), layer_norm(process, layer.write_norm, 1e-6)
        # write: the memory tokens query the process tokens
        memory = fuse(cfg.fusion, gate(net.write_fusion, i), memory,
                      read_write(cfg.rw_head, layer.write, process, memory, heads))
    return memory, layer_norm(process, net.process_norm, 1e-6)


# --- the whole module against the re-derivation -----------------------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rw_head", RW_HEADS)
def test_vittm_equals_the_reference_equations(rw_head, fusion):
    cfg = tiny(rw_head=rw_head, fusion=fusion)
    torch.manual_seed(0)
    net = randomise(FiLMViTTM(cfg, CTX))
    images, context = torch.randn(2, 3, 32, 32), torch.randn(2, CTX)
    with torch.no_grad():
        memory, process = reference_features(net, cfg, images)
        feats = net.features(images, context)
        torch.testing.assert_close(feats, torch.cat([memory, process], dim=1), rtol=0, atol=1e-5)
        # the output tokens: a Linear (no bias) of those features, then FiLM (the identity at init)
        torch.testing.assert_close(net(images, context), feats @ net.to_tokens.weight.T, rtol=0, atol=1e-6)
        # each output stream alone gives the same tokens (the process-only model skips the last write)
        for stream, want in [("memory", memory), ("process", process)]:
            alone = FiLMViTTM(dataclasses.replace(cfg, output_stream=stream), CTX)
            alone.load_state_dict(net.state_dict(), strict=False)
            torch.testing.assert_close(alone.eval().features(images, context), want, rtol=0, atol=1e-5)


# --- each numeric choice ------------------------------------------------------------------------------

def low_variance_tokens(n: int = 2, length: int = 5, dim: int = 32) -> torch.Tensor:
    """Tokens whose per-token variance (~1e-6) is comparable to a LayerNorm eps, so 1e-5 and 1e-6 differ."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, length, dim, generator=g) * 1e-3


def test_layer_norm_eps_vit_1e6_and_reference_heads_1e5():
    net = randomise(FiLMViTTM(tiny(rw_head="attention"), CTX))
    x = low_variance_tokens()
    vit_norms = [net.process_norm] + [m for layer in net.layers for m in
                                      (layer.read_norm, layer.write_norm, layer.block.norm1, layer.block.norm2)]
    head_norms = [m for layer in net.layers for h in (layer.read, layer.write) for m in (h.q_norm, h.k_norm, h.v_norm)]
    head_norms.append(TokenLearnerHead(32, 4).tl.norm)
    with torch.no_grad():
        for norm, eps, other in [(m, 1e-6, 1e-5) for m in vit_norms] + [(m, 1e-5, 1e-6) for m in head_norms]:
            torch.testing.assert_close(norm(x), layer_norm(x, norm, eps), rtol=0, atol=1e-4)
            assert (norm(x) - layer_norm(x, norm, other)).abs().max() > 1e-2  # the eps is visible here


def test_activations_are_exact_gelu_in_the_vit_mlp_and_the_tokenlearner_head():
    """timm's Mlp and the reference TokenLearner head use nn.GELU() (erf); the tanh form differs by up to
    ~5e-4, which this resolves."""
    net = FiLMViTTM(tiny(rw_head="tokenlearner"), CTX)
    x = torch.linspace(-6, 6, 1201)
    acts = [layer.block.mlp[1] for layer in net.layers] + [h.tl.score[1] for layer in net.layers
                                                           for h in (layer.read, layer.write)]
    for act in acts:
        torch.testing.assert_close(act(x), gelu(x), rtol=0, atol=1e-6)


def test_one_read_norm_and_one_write_norm_per_block_shared_by_both_streams():
    net = FiLMViTTM(tiny(), CTX)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    # per block: read, write, the ViT block's two; + the process output norm; nothing on the memory output
    assert len(norms) == 2 * 4 + 1 and net.memory_norm is None
    assert all(layer.read_norm.normalized_shape == (32,) for layer in net.layers)


def test_patch_embedding_is_a_strided_conv_over_row_major_patches_plus_position():
    net = randomise(FiLMViTTM(tiny(), CTX))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for embed, patch in [(net.process_embed, 16), (net.memory_embed, 8)]:
            conv = embed.proj
            assert (conv.kernel_size, conv.stride, conv.padding) == ((patch, patch), (patch, patch), (0, 0))
            assert conv.bias is not None and embed.pos.shape == (1, (32 // patch) ** 2, 32)
            torch.testing.assert_close(embed(images), patch_embed(images, embed, patch), rtol=0, atol=1e-5)
        # token 1 of the memory stream is the patch at row 0, column 1 (x from 8 to 16)
        only = torch.zeros(1, 3, 32, 32)
        only[..., 0:8, 8:16] = 1.0
        moved = net.memory_embed(only) - net.memory_embed.pos
        assert moved[0, 1].abs().sum() > moved[0, 0].abs().sum() == moved[0, 4].abs().sum()


def test_linear_attention_feature_map_normaliser_latent_and_no_output_projection():
    g = torch.Generator().manual_seed(1)
    head = randomise(LinearAttention(dim=32, heads=2, latent=8))
    assert (head.q.out_features, head.k.out_features, head.v.out_features) == (8, 8, 32)  # latent d/4 for q, k
    assert not hasattr(head, "proj") and not any(isinstance(m, torch.nn.LayerNorm) for m in head.modules())
    source, target = torch.randn(3, 10, 32, generator=g) * 3, torch.randn(3, 6, 32, generator=g) * 3
    with torch.no_grad():
        torch.testing.assert_close(head(source, target), linear_attention(head, source, target, 2), rtol=0, atol=1e-5)
    # the 1e-6 in the denominator: with phi(k) ~ 0 the output is ~0, not a division by zero
    with torch.no_grad():
        head.k.weight.zero_()
        head.k.bias.fill_(-40.0)  # elu(-40) + 1 = exp(-40)
        out = head(source, target)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-6


def test_model_latent_width_is_width_over_rw_latent_scale():
    for scale, latent in [(4, 8), (2, 16), (1, 32)]:
        layer = FiLMViTTM(tiny(rw_latent_scale=scale), CTX).layers[0]
        assert layer.read.q.out_features == layer.write.k.out_features == latent


def test_cross_attention_head_normalises_q_k_v_and_keeps_k_and_v_apart():
    g = torch.Generator().manual_seed(2)
    head = randomise(CrossAttention(32, 2))
    assert all(isinstance(getattr(head, n), torch.nn.Linear) and getattr(head, n).weight.shape == (32, 32)
               for n in ("q", "k", "v", "proj"))
    assert all(getattr(head, n).eps == 1e-5 and getattr(head, n).normalized_shape == (32,)
               for n in ("q_norm", "k_norm", "v_norm"))
    source, target = torch.randn(2, 9, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(head(source, target), cross_attention(head, source, target, 2), rtol=0, atol=1e-5)


def test_tokenlearner_head_selects_from_source_and_target_with_bottleneck_target_tokens():
    g = torch.Generator().manual_seed(4)
    head = randomise(TokenLearnerHead(32, 4))
    assert (head.tl.score[0].out_features, head.tl.score[2].out_features) == (4, 4)  # bottleneck = out = T
    source, target = torch.randn(2, 16, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        out, weights = head.tl(torch.cat([source, target], 1), return_weights=True)
        torch.testing.assert_close(head(source, target), token_learner(head, source, target), rtol=0, atol=1e-5)
    assert out.shape == (2, 4, 32) and weights.shape == (2, 4, 20)  # softmax over all S + T positions
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("rw_head", ["linear", "attention"])
def test_read_and_write_selection_sets(rw_head):
    """Read: the process tokens are the queries, the memory tokens the keys/values; write: the reverse
    (the reference's read_head(memory, process), write_head(process, memory)). Each output row depends on
    its own query only, and on every key/value token."""
    net = randomise(FiLMViTTM(tiny(rw_head=rw_head), CTX))
    layer = net.layers[0]
    p, m = torch.randn(2, 4, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        for head, queries, keys in [(layer.read, p, m), (layer.write, m, p)]:
            base = head(keys, queries)
            assert base.shape == queries.shape
            moved_query = queries.clone()
            moved_query[:, 0] += 1.0
            rows = (head(keys, moved_query) - base).abs().sum(-1)
            assert rows[:, 0].min() > 0 and rows[:, 1:].max() == 0  # the other queries are not keys
            moved_key = keys.clone()
            moved_key[:, -1] += 1.0
            assert (head(moved_key, queries) - base).abs().sum(-1).min() > 0  # every row reads every key


def test_tokenlearner_read_selects_process_count_and_write_memory_count_from_both_streams():
    layer = randomise(FiLMViTTM(tiny(rw_head="tokenlearner"), CTX)).layers[0]
    assert layer.read.tl.num_tokens == 4 and layer.write.tl.num_tokens == 16
    p, m = torch.randn(2, 4, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        _, read_weights = layer.read.tl(torch.cat([m, p], 1), return_weights=True)  # [memory ; process]
        _, write_weights = layer.write.tl(torch.cat([p, m], 1), return_weights=True)  # [process ; memory]
        torch.testing.assert_close(layer.read(m, p), read_weights @ torch.cat([m, p], 1))
        torch.testing.assert_close(layer.write(p, m), write_weights @ torch.cat([p, m], 1))
    assert read_weights.shape == (2, 4, 20) and write_weights.shape == (2, 16, 20)


@pytest.mark.parametrize("kind", FUSIONS)
def test_fusion_formulas(kind):
    fusion = randomise(Fusion(kind, 32, 4))
    target, rw = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(fusion(target, rw), fuse(kind, fusion, target, rw), rtol=0, atol=1e-6)
    assert (fusion.gate is None) == (kind != "add_erase")
    if kind == "add_erase":
        assert fusion.gate.in_features == 32 and fusion.gate.out_features == 4  # one gate per target token


def test_add_erase_gates_shared_by_all_blocks_unless_per_block():
    net = FiLMViTTM(tiny(fusion="add_erase", vit_depth=3), CTX)
    assert isinstance(net.read_fusion, Fusion) and isinstance(net.write_fusion, Fusion)  # the reference's
    assert (net.read_fusion.gate.out_features, net.write_fusion.gate.out_features) == (4, 16)
    per = FiLMViTTM(tiny(fusion="add_erase", vit_depth=3, fusion_gate_per_block=True), CTX)
    assert len(per.read_fusion) == 3 and len(per.write_fusion) == 3
    process_only = FiLMViTTM(tiny(fusion="add_erase", vit_depth=3, fusion_gate_per_block=True,
                                  output_stream="process"), CTX)
    assert len(process_only.write_fusion) == 2  # the skipped last write has no gate
    out = process_only(torch.randn(2, 3, 32, 32), torch.randn(2, CTX))
    out.square().mean().backward()
    assert all(p.grad is not None for p in process_only.parameters())
    # per block, with every gate a copy of the shared one, is the shared model
    shared = randomise(net)
    with torch.no_grad():
        for f in per.read_fusion:
            f.gate.load_state_dict(shared.read_fusion.gate.state_dict())
        for f in per.write_fusion:
            f.gate.load_state_dict(shared.write_fusion.gate.state_dict())
    per.load_state_dict({k: v for k, v in shared.state_dict().items() if "fusion" not in k}, strict=False)
    images, context = torch.randn(2, 3, 32, 32), torch.randn(2, CTX)
    with torch.no_grad():
        torch.testing.assert_close(per.eval()(images, context), shared(images, context), rtol=0, atol=1e-6)
    assert not any(p.numel() for p in FiLMViTTM(tiny(fusion="add"), CTX).read_fusion.parameters())


def test_memory_output_norm_is_a_named_option_off_by_default():
    assert ImageEncoderConfig().memory_output_norm is False and ImageEncoderConfig().fusion_gate_per_block is False
    cfg = tiny(output_stream="memory")
    net = randomise(FiLMViTTM(cfg, CTX))
    images, context = torch.randn(2, 3, 32, 32), torch.randn(2, CTX)
    with torch.no_grad():
        _, memory = net.streams(images, context)
        assert net.memory_norm is None and torch.equal(net.features(images, context), memory)
        normed = FiLMViTTM(dataclasses.replace(cfg, memory_output_norm=True), CTX)
        normed.load_state_dict(net.state_dict(), strict=False)
        assert normed.memory_norm.eps == 1e-6
        torch.testing.assert_close(normed.eval().features(images, context),
                                   layer_norm(memory, normed.memory_norm, 1e-6), rtol=0, atol=1e-5)


# --- parameter counts: ours against the reference's and the paper's table ------------------------------

def reference_parameter_count(width: int, image: int, process_patch: int, memory_patch: int,
                              classes: int = 1000) -> dict[str, int]:
    """The reference model as models/vittm/factory.py builds it (timm VisionTransformer, patch_size 16,
    rw_head_type 'lin', latent_size_scale 4, global_pool 'avg'), counted from its module list."""
    d, depth, latent = width, 12, width // 4
    conv = lambda p: 3 * p * p * d + d  # noqa: E731
    tokens = lambda p: (image // p) ** 2  # noqa: E731
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    la_head = 2 * (d * latent + latent) + (d * d + d)  # q, k, v (used)
    la_proj = d * d + d  # defined in LinearAttention but never applied in its forward
    used = (depth * (block + 2 * la_head + 2 * 2 * d)  # + read_norm, write_norm
            + conv(process_patch) + tokens(process_patch) * d + conv(memory_patch) + tokens(memory_patch) * d
            + 2 * d)  # process_norm
    unused = {
        "linear_attention_proj": 2 * depth * la_proj,
        # timm's own 16 px patch_embed; it is the memory embedder only where memory_ps == 16
        "timm_patch16_embed": 0 if memory_patch == 16 else conv(16),
        "timm_pos_embed_and_cls_token": (tokens(16) + 1) * d + d,
        "classifier_heads_and_fc_norms": 2 * (d * classes + classes) + 2 * 2 * d,
    }
    return {"used": used, **unused, "total": used + sum(unused.values())}


def our_parameter_count(size: str, process_patch: int, memory_patch: int, output_stream: str) -> dict[str, int]:
    with torch.device("meta"):  # no memory for the 110M weights of ViTTM-B
        net = FiLMViTTM(ImageEncoderConfig(backbone="vittm", vit_size=size, image_size=224, token_dim=512,
                                           process_patch=process_patch, memory_patch=memory_patch,
                                           output_stream=output_stream), 512)
    film = sum(p.numel() for m in net.modules() if isinstance(m, FiLM) for p in m.parameters())
    proj = net.to_tokens.weight.numel()
    total = sum(p.numel() for p in net.parameters())
    return {"body": total - film - proj, "film": film, "proj": proj, "total": total}


# setting, our size, process / memory patch, paper (M), reference total, our body (both streams out)
PAPER = [("ViTTM-S(64,64)", "s", 28, 28, 33, 33_182_288, 28_491_264),
         ("ViTTM-B(64,64)", "b", 28, 28, 127, 126_524_624, 110_066_688),
         ("ViTTM-B(49,196)", "b", 32, 16, 125, 125_360_336, 109_492_992)]


@pytest.mark.parametrize("name,size,pp,mp,paper_m,ref_total,body", PAPER, ids=[p[0] for p in PAPER])
def test_parameter_counts_against_the_paper(name, size, pp, mp, paper_m, ref_total, body):
    width = {"s": 384, "b": 768}[size]
    ref = reference_parameter_count(width, 224, pp, mp)
    # the reference's total (measured by building it) is the paper's number, rounded
    assert ref["total"] == ref_total and round(ref_total / 1e6) == paper_m
    both = our_parameter_count(size, pp, mp, "both")
    # ours = every parameter the reference's forward uses; the paper's count adds the never-applied
    # linear-attention output projections, timm's unused 16 px patch embedding / position embedding /
    # class token, and the two 1000-way classifiers with their fc_norms
    assert both["body"] == ref["used"] == body
    # the memory-only output (the default) drops the process output norm
    assert our_parameter_count(size, pp, mp, "memory")["body"] == body - 2 * width
    # FiLM (2 x Linear(512, width) per block, + one on the 512 output tokens) and the projection come on top
    assert both["film"] == 12 * 2 * (512 * width + width) + 2 * (512 * 512 + 512)
    assert both["proj"] == width * 512


# --- drop path (stochastic depth): timm's DropPath on both residual branches, rates linear over depth ---------

def test_drop_path_rates_rise_linearly_and_are_the_identity_in_evaluation():
    from policy.backbones.vit import FiLMViT, drop_path, drop_path_rates

    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1]) and drop_path_rates(0.2, 1) == [0.0]
    assert ImageEncoderConfig().vit_drop_path == 0.0  # the reference's default drop_path_rate
    for net in (FiLMViTTM(tiny(vit_drop_path=0.3, vit_depth=3), CTX),
                FiLMViT(tiny(backbone="vit", vit_drop_path=0.3, vit_depth=3), CTX)):
        blocks = [layer.block for layer in net.layers] if isinstance(net, FiLMViTTM) else list(net.blocks)
        assert [b.drop_path for b in blocks] == pytest.approx([0.0, 0.15, 0.3])
        net_cfg = tiny(vit_depth=3) if isinstance(net, FiLMViTTM) else tiny(backbone="vit", vit_depth=3)
        plain = type(net)(net_cfg, CTX)
        plain.load_state_dict(randomise(net).state_dict())
        images, context = torch.randn(3, 3, 32, 32), torch.randn(3, CTX)
        with torch.no_grad():
            assert torch.equal(net.eval()(images, context), plain.eval()(images, context)), net_cfg.backbone
            torch.manual_seed(0)
            trained = net.train()(images, context)
        assert not torch.allclose(trained, plain.train()(images, context))  # training drops branches
    # per sample: a branch is all kept (scaled by 1/(1-p)) or all dropped; the mean is kept
    torch.manual_seed(1)
    x = torch.ones(4000, 5, 7)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert abs(out.mean().item() - 1.0) < 0.03 and torch.equal(drop_path(x, 0.25, training=False), x)


def test_drop_path_rate_is_checked():
    from policy.config import ConfigError, load_config

    for bad in ("-0.1", "1.0"):
        with pytest.raises(ConfigError, match=r"model.image.vit_drop_path: expected a rate in \[0, 1\)"):
            load_config(None, ["model.image.backbone=vittm", f"model.image.vit_drop_path={bad}"])
    assert load_config(None, ["model.image.backbone=vittm", "model.image.vit_drop_path=0.1"]).model.image.vit_drop_path == 0.1
