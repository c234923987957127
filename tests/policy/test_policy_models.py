"""Policy model properties: RT-1 image tokenizer facts, TokenLearner, TTM recurrence, the full policy."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from policy.backbones.film_efficientnet import FiLMEfficientNet
from policy.config import ControllerConfig, ImageEncoderConfig, LanguageConfig, ModelConfig
from policy.controllers import controller_names
from policy.controllers.ttm import TokenTuringMachine
from policy.film import FiLM
from policy.model import PolicyModel
from policy.preprocessing import preprocess_frames
from policy.text_encoder import TextEncoder
from policy.token_learner import TokenLearner
from tests.helpers import randomise_film

torch.set_num_threads(2)

A, S, VOCAB = 7, 8, 64


def make_model(cfg: ModelConfig | None = None, proprio_dim: int = S) -> PolicyModel:
    torch.manual_seed(0)
    return PolicyModel(cfg or ModelConfig(), vocab_size=VOCAB, num_action_dims=A, proprio_dim=proprio_dim)


def inputs(b: int, t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, t, 64, 64, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, VOCAB, (b, 16), generator=g)
    mask = torch.arange(16).expand(b, 16) < torch.tensor([[10], [6], [16], [3]])[:b]
    proprio = torch.randn(b, t, S, generator=g)
    return images, ids, mask, proprio


@pytest.fixture(scope="module")
def model() -> PolicyModel:
    m = make_model()
    randomise_film(m)
    return m.eval()


# --- FiLM-EfficientNet -------------------------------------------------------------------------

def test_film_is_identity_at_init():
    film = FiLM(16, 8)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(film(x, torch.randn(2, 16)), x)
    net = FiLMEfficientNet(ImageEncoderConfig(), context_dim=32).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(images, torch.randn(2, 32)), net(images, torch.randn(2, 32)))


def test_b3_at_300_gives_81_tokens_of_512_and_rt1_sizes():
    net = FiLMEfficientNet(ImageEncoderConfig(variant="b3", image_size=300, token_dim=512), context_dim=512).eval()
    assert len(net.blocks) == 26
    assert sum(isinstance(m, FiLM) for m in net.modules()) == 27
    assert net.stem[1].out_channels == 40 and net.top[0].out_channels == 1536
    film = sum(p.numel() for m in net.modules() if isinstance(m, FiLM) for p in m.parameters())
    assert film == 4_227_120  # RT-1: FiLM 4.2M
    trainable = sum(p.numel() for p in net.parameters())
    bn_stats = sum(b.numel() for b in net.buffers() if b.dtype.is_floating_point)
    assert trainable + bn_stats == 15_797_080  # RT-1: 15.8M counted the Keras way (BN moving stats included)
    assert net.feature_size(300) == 9
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.momentum == 0.01 and bn.eps == 1e-3 for bn in bns)  # Keras momentum 0.99, eps 1e-3
    with torch.no_grad():
        tokens = net(torch.randn(1, 3, 300, 300), torch.randn(1, 512))
    assert tokens.shape == (1, 81, 512)


def test_quickstart_backbone_is_small_with_8x8_map():
    net = FiLMEfficientNet(ImageEncoderConfig(), context_dim=128).eval()
    assert 200_000 <= sum(p.numel() for p in net.parameters()) <= 500_000
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64), torch.randn(1, 128)).shape == (1, 64, 128)


def test_preprocess_resizes_and_normalises():
    frames = torch.full((2, 96, 128, 3), 128, dtype=torch.uint8)
    x = preprocess_frames(frames, 64)
    assert x.shape == (2, 3, 64, 64)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 10, 10], expected)
    with pytest.raises(ValueError, match="images"):
        preprocess_frames(frames.float(), 64)


# --- TokenLearner ------------------------------------------------------------------------------

def test_token_learner_shapes_weights_and_errors():
    tl = TokenLearner(32, 8, hidden=16)
    x = torch.randn(3, 81, 32)
    out, w = tl(x, return_weights=True)
    assert out.shape == (3, 8, 32) and w.shape == (3, 8, 81)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 8))
    torch.testing.assert_close(out, w @ x)  # weighted sums of the un-normalised inputs
    with pytest.raises(ValueError, match="model.image.num_tokens"):
        TokenLearner(32, 10, num_positions=9, field="model.image.num_tokens")
    with pytest.raises(ValueError, match="num_tokens"):
        tl(torch.randn(1, 4, 32))


# --- Token Turing Machine (its memory size over a long episode: tests/test_controllers.py) ----------

TTM_VARIANTS = [("TL", "transformer"), ("TL", "mixer"), ("TL", "mlp"), ("TL-MHA", "transformer"),
                ("TL-AddErase-ours", "transformer")]


@pytest.mark.parametrize("mode,unit", TTM_VARIANTS)
def test_ttm_step_matches_unroll_and_all_params_get_gradients(mode, unit):
    torch.manual_seed(0)
    cfg = ControllerConfig(memory_tokens=6, read_tokens=4, memory_mode=mode, process_unit=unit, layers=1,
                           mlp_dim=32)
    ttm = TokenTuringMachine(cfg, dim=16, num_input_tokens=5)
    tokens = torch.randn(2, 7, 5, 16)
    out, attn = ttm(tokens, return_attention=True)
    assert out.shape == (2, 7, 4, 16)
    assert attn["read"].shape == (2, 7, 4, 11) and attn["write"].shape == (2, 7, 6, 15)
    out.square().mean().backward()
    for name, p in ttm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ttm.eval()
    with torch.no_grad():
        full = ttm(tokens)
        memory = ttm.init_memory(2)
        for t in range(7):
            step_out, memory = ttm.step(tokens[:, t], memory)
            torch.testing.assert_close(step_out, full[:, t], rtol=0, atol=1e-5)


# --- Text encoder ------------------------------------------------------------------------------

def test_text_encoder_ignores_padding_and_supports_embeddings():
    enc = TextEncoder(LanguageConfig(), vocab_size=VOCAB).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    mask = torch.arange(16).expand(2, 16) < 5
    other = ids.clone()
    other[:, 5:] = 0
    with torch.no_grad():
        a, b = enc(ids, mask), enc(other, mask)
        assert a.shape == (2, 128)
        torch.testing.assert_close(a, b)
        assert torch.isfinite(enc(ids, torch.zeros_like(mask))).all()
    emb = TextEncoder(LanguageConfig(source="embedding"), vocab_size=VOCAB, embedding_dim=512)
    assert emb.encode_embedding(torch.randn(3, 512)).shape == (3, 128)
    with pytest.raises(ValueError, match="encode_embedding"):
        emb(ids, mask)


# --- Full policy -------------------------------------------------------------------------------

@pytest.fixture(params=["default", "carried TL-AddErase-ours"])
def policy_model(request) -> PolicyModel:
    """The default model, and the carried-memory recipe of docs/RESULTS.md 3f (memory horizon 0)."""
    if request.param == "default":
        m = make_model()
    else:
        m = make_model(ModelConfig(controller=ControllerConfig(memory_mode="TL-AddErase-ours", memory_horizon=0)))
    randomise_film(m)
    return m.eval()


def test_stepwise_inference_equals_training_unroll(policy_model):
    model = policy_model
    images, ids, mask, proprio = inputs(2, 6)
    with torch.no_grad():
        context = model.encode_instruction(ids, mask)
        full = model(images, context, proprio)
        assert full.shape == (2, 6, A, 256)
        state = model.init_state(2)
        for t in range(6):
            logits, state = model.step(images[:, t], context, proprio[:, t], state)
            assert (logits - full[:, t]).abs().max() <= 1e-5


@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("controller", controller_names(carried_memory=True))
def test_bounded_memory_horizon_matches_window_training(horizon, controller):
    """memory_horizon N: each inference step equals the training forward on the window of the last N
    frames, front-padded (mask False) at the episode start, as the window loader serves them."""
    cfg = ModelConfig(controller=ControllerConfig(type=controller, memory_horizon=horizon), instruction_token=True)
    m = make_model(cfg)
    randomise_film(m)
    m.eval()
    t_total = 6
    images, ids, mask, proprio = inputs(2, t_total)
    with torch.no_grad():
        context = m.encode_instruction(ids, mask)
        state = m.init_state(2)
        for t in range(t_total):
            logits, state = m.step(images[:, t], context, proprio[:, t], state)
            start = max(0, t + 1 - horizon)
            pad = horizon - (t + 1 - start)
            win_img = torch.cat([torch.zeros_like(images[:, :pad]), images[:, start:t + 1]], dim=1)
            win_prop = torch.cat([torch.zeros_like(proprio[:, :pad]), proprio[:, start:t + 1]], dim=1)
            step_mask = (torch.arange(horizon) >= pad).expand(2, horizon)
            expected = m(win_img, context, win_prop, step_mask)[:, -1]
            assert (logits - expected).abs().max() <= 1e-5
            assert state.shape[1] == min(t + 1, horizon - 1)  # the state stays bounded


def test_memory_horizon_must_match_the_training_window():
    from policy.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.controller.memory_horizon"):
        load_config("configs/quickstart.yaml", ["data.sequence=window", "data.sequence_length=4",
                                                "model.controller.memory_horizon=2"])
    with pytest.raises(ConfigError, match="model.controller.memory_horizon"):
        load_config("configs/quickstart.yaml", ["data.sequence=episode", "model.controller.memory_horizon=4"])


def test_outputs_are_causal(model):
    images, ids, mask, proprio = inputs(2, 6)
    changed_images, changed_proprio = images.clone(), proprio.clone()
    changed_images[:, 3:] = 255 - changed_images[:, 3:]
    changed_proprio[:, 3:] += 1.0
    with torch.no_grad():
        context = model.encode_instruction(ids, mask)
        a = model(images, context, proprio)
        b = model(changed_images, context, changed_proprio)
    assert (a[:, :3] - b[:, :3]).abs().max() <= 1e-5
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


def test_step_mask_padding_at_either_end(model):
    images, ids, mask, proprio = inputs(2, 6)
    with torch.no_grad():
        context = model.encode_instruction(ids, mask)
        ref = model(images[:, :4], context, proprio[:, :4])
        tail = torch.tensor([[True] * 4 + [False] * 2] * 2)
        padded_end = model(images, context, proprio, tail)
        assert (padded_end[:, :4] - ref).abs().max() <= 1e-5
        # Window sequences are padded at the episode start: memory must stay at zero there.
        head = tail.flip(1)
        padded_start = model(images.roll(2, dims=1), context, proprio.roll(2, dims=1), head)
        assert (padded_start[:, 2:] - ref).abs().max() <= 1e-5


def test_gradient_reaches_every_parameter():
    m = make_model()
    randomise_film(m)  # at init FiLM is the identity, so the text encoder's gradient is exactly zero
    m.train()
    images, ids, mask, proprio = inputs(2, 3)
    logits = m(images, m.encode_instruction(ids, mask), proprio)
    torch.nn.functional.cross_entropy(logits.flatten(0, 2), torch.randint(0, 256, (2 * 3 * A,))).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_film_starts_as_identity_in_the_policy():
    m = make_model().eval()
    images, ids, mask, proprio = inputs(2, 2)
    with torch.no_grad():
        a = m(images, m.encode_instruction(ids, mask), proprio)
        b = m(images, torch.randn(2, 128), proprio)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_proprio():
    m = make_model(ModelConfig(use_proprio=False), proprio_dim=0).eval()
    images, ids, mask, _ = inputs(1, 2)
    with torch.no_grad():
        assert m(images, m.encode_instruction(ids, mask)).shape == (1, 2, A, 256)


@pytest.mark.parametrize("section,field,value", [
    ("image", "variant", "b9"),
    ("image", "width_mult", 0.0),
    ("image", "num_tokens", 65),
    ("language", "heads", 3),
    ("language", "source", "bert"),
    ("controller", "heads", 5),
    ("controller", "memory_mode", "LSTM"),
    ("controller", "process_unit", "rnn"),
    ("controller", "dropout", 1.5),
])
def test_bad_config_names_the_field(section, field, value):
    cfg = ModelConfig()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{field: value}))
    with pytest.raises(ValueError, match=f"model.{section}.{field}"):
        make_model(cfg)


def test_missing_proprio_is_a_clear_error(model):
    images, ids, mask, _ = inputs(1, 2)
    with pytest.raises(ValueError, match="proprio"):
        model(images, model.encode_instruction(ids, mask), None)
