"""TTM fidelity to its reference code (google-research/scenic, scenic/projects/token_turing/model.py:
TokenTuringMachineUnit, TokenTuringMachineSimpleUnit, TokenTuringMachineEncoder; with TokenLearnerModuleV11,
vit.Encoder, mixer.MixerBlock and attention_layers.MlpBlock). Each numeric choice of
policy/controllers/ttm.py and policy/token_learner.py is pinned against a re-derivation written here in
numpy (float64) from the reference's equations: LayerNorm eps 1e-6, the tanh GELU of flax's nn.gelu,
TokenLearner's softmax over positions, 8-head TL-MHA without a LayerNorm, the AddErase write over the
memory only, the mixer's 128-wide token MLP, the MLP unit without a residual, the encoder's position
embedding, the simple unit's split of its process output. Also: dropout placement, flax's
initialisation, the options that keep our variants, and stepwise = unroll / causality / constant memory
for every mode and unit. The reference itself is not needed here: with its flax-initialised (and
perturbed) weights copied in, our module matched it over multi-step unrolls from zero memory (docs/MODELS.md)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from policy.config import MEMORY_MODES, PROCESS_UNITS, ConfigError, ControllerConfig, load_config
from policy.controllers.ttm import TokenTuringMachine
from policy.token_learner import TokenLearner
from tests.helpers import ROOT

torch.set_num_threads(1)

D, N, M, R, T, B, HEADS, LAYERS, MLP = 16, 3, 5, 2, 5, 2, 2, 2, 24
REFERENCE_MODES = ("TL", "TL-MHA", "TL-AddErase")
ALL = [(mode, unit) for mode in MEMORY_MODES for unit in PROCESS_UNITS]


def cfg(mode: str = "TL", unit: str = "transformer", **kw) -> ControllerConfig:
    base = dict(memory_mode=mode, process_unit=unit, memory_tokens=M, read_tokens=R, layers=LAYERS, heads=HEADS,
                mlp_dim=MLP)
    base.update(kw)
    c = ControllerConfig(**base)
    c.validate(D)
    return c


def build(mode: str = "TL", unit: str = "transformer", seed: int = 0, **kw) -> TokenTuringMachine:
    torch.manual_seed(seed)
    return TokenTuringMachine(cfg(mode, unit, **kw), D, N).eval()


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter + 0.1 N(0, 1): flax's init leaves biases ~1e-6 and LayerNorms at 1 / 0, which would
    hide a misplaced bias or LayerNorm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def tokens(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(B, t, N, D, generator=torch.Generator().manual_seed(seed))


# --- the reference's equations, in numpy float64 ----------------------------------------------------

class Ref:
    """scenic's TTM written out from its source. `w` maps our parameter names to arrays (the same
    weights); nothing here calls our modules."""

    def __init__(self, net: TokenTuringMachine, c: ControllerConfig):
        self.w = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}
        self.c = c

    # flax primitives
    def ln(self, x, p):  # nn.LayerNorm: epsilon 1e-6, biased variance
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * self.w[p + ".weight"] + self.w[p + ".bias"]

    @staticmethod
    def gelu(x):  # nn.gelu, approximate=True
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def dense(self, x, p):
        return x @ self.w[p + ".weight"].T + self.w[p + ".bias"]

    def mlp_block(self, x, p):  # attention_layers.MlpBlock (dropout off)
        return self.dense(self.gelu(self.dense(x, p + ".0")), p + ".3")

    @staticmethod
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def mha(self, q_in, kv_in, p, heads):  # nn.MultiHeadDotProductAttention, q/k/v/out DenseGeneral
        wq, wk, wv = np.split(self.w[p + ".in_proj_weight"], 3)
        bq, bk, bv = np.split(self.w[p + ".in_proj_bias"], 3)
        split = lambda x: x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q_in @ wq.T + bq), split(kv_in @ wk.T + bk), split(kv_in @ wv.T + bv)
        att = self.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]))
        out = (att @ v).transpose(0, 2, 1, 3).reshape(q_in.shape[0], q_in.shape[1], -1)
        return out @ self.w[p + ".out_proj.weight"].T + self.w[p + ".out_proj.bias"]

    # scenic modules
    def token_learner(self, x, p):  # TokenLearnerModuleV11
        sel = self.mlp_like_token_masking(self.ln(x, p + ".norm"), p)  # [B, P, S]
        weights = self.softmax(sel.transpose(0, 2, 1))  # softmax over the P positions
        return np.einsum("bsp,bpd->bsd", weights, x), weights  # sums of the un-normalised inputs

    def mlp_like_token_masking(self, x, p):
        return self.dense(self.gelu(self.dense(x, p + ".score.0")), p + ".score.2")

    def token_learner_mha(self, x, p):  # TokenLearnerMHA: 8 heads, no LayerNorm
        q = np.broadcast_to(self.w[p + ".queries"], (x.shape[0],) + self.w[p + ".queries"].shape[1:])
        return self.mha(q, x, p + ".attn", 8)

    def encoder(self, x):  # vit.Encoder: position embedding always, pre-LN blocks, encoder_norm
        x = x + self.w["process.pos"]
        for i in range(self.c.layers):
            p = f"process.blocks.{i}"
            y = self.ln(x, p + ".norm1")
            x = x + self.mha(y, y, p + ".self_attn", self.c.heads)
            y = self.ln(x, p + ".norm2")
            x = x + self.dense(self.gelu(self.dense(y, p + ".linear1")), p + ".linear2")
        return self.ln(x, "process.norm")

    def mixer(self, x):  # MixerBlock x layers (sequence_mlp_dim 128), then a LayerNorm
        for i in range(self.c.layers):
            p = f"process.blocks.{i}"
            y = self.mlp_block(self.ln(x, p + ".token_norm").transpose(0, 2, 1), p + ".token_mlp").transpose(0, 2, 1)
            x = x + y
            x = x + self.mlp_block(self.ln(x, p + ".channel_norm"), p + ".channel_mlp")
        return self.ln(x, "process.norm")

    def mlp_unit(self, x):  # per layer LayerNorm -> MlpBlock, no residual; then a LayerNorm
        for i in range(self.c.layers):
            x = self.mlp_block(self.ln(x, f"process.blocks.{i}.norm"), f"process.blocks.{i}.mlp")
        return self.ln(x, "process.norm")

    def process(self, x):
        return {"transformer": self.encoder, "mixer": self.mixer, "mlp": self.mlp_unit}[self.c.process_unit](x)

    def add_erase_write(self, memory, control):  # TokenAddEraseWrite (8 heads, bottleneck 64)
        p = "add_erase."
        sel = self.softmax(self.mlp_block(self.ln(memory, p + "select_norm"), p + "select").transpose(0, 2, 1))
        et = self.mlp_block(self.ln(control, p + "erase_norm").transpose(0, 2, 1), p + "erase_tokens")
        et = self.mlp_block(et.transpose(0, 2, 1), p + "erase_channels")  # [B, 8, D]
        wet = np.prod(1 - sel[..., None] * et[:, :, None, :], axis=1)  # [B, m, D]
        at = self.mlp_block(self.ln(control, p + "add_norm").transpose(0, 2, 1), p + "add_tokens")
        at = self.mlp_block(at.transpose(0, 2, 1), p + "add_channels")
        wat = np.mean(1 - sel[..., None] * at[:, :, None, :], axis=1)
        return memory * wet + wat, sel

    def unit(self, memory, inputs):  # TokenTuringMachineUnit.__call__ -> (new memory, output, weights)
        mode = self.c.memory_mode
        if mode == "simple":  # TokenTuringMachineSimpleUnit
            reduced, read_w = self.token_learner(inputs, "read")
            out = self.process(np.concatenate([memory, reduced], 1))
            return out[:, self.c.read_tokens:], out[:, :self.c.read_tokens], {"read": read_w}
        x = np.concatenate([memory, inputs], 1)
        if self.c.use_position_embedding:
            x = x + self.w["read_pos"]
        if mode == "TL-MHA":
            z, read_w = self.token_learner_mha(x, "read"), None
        else:
            z, read_w = self.token_learner(x, "read")
        out = self.process(z)
        if mode == "TL-AddErase":  # the write position embedding's result is unused there
            new_memory, write_w = self.add_erase_write(memory, out)
            return new_memory, out, {"read": read_w, "write": write_w}
        y = np.concatenate([memory, inputs, out], 1)
        if self.c.use_position_embedding:
            y = y + self.w["write_pos"]
        if mode == "TL-MHA":
            return self.token_learner_mha(y, "write"), out, {"read": read_w}
        new_memory, write_w = self.token_learner(y, "write")
        return new_memory, out, {"read": read_w, "write": write_w}

    def unroll(self, x):  # TokenTuringMachineEncoder.__call__: memory from zeros
        memory = np.zeros((x.shape[0], self.c.memory_tokens, x.shape[-1]))
        outs = []
        for t in range(x.shape[1]):
            memory, out, _ = self.unit(memory, x[:, t])
            outs.append(out)
        return np.stack(outs, 1), memory


REFERENCE_CASES = [(mode, unit, pos) for mode in REFERENCE_MODES + ("simple",) for unit in PROCESS_UNITS
                   for pos in ((False, True) if mode != "simple" else (False,))]


@pytest.mark.parametrize("mode,unit,pos", REFERENCE_CASES)
def test_default_of_each_mode_and_unit_computes_the_reference(mode, unit, pos):
    """Our default form of every reference mode x unit (and the simple unit) equals the reference's
    equations over a multi-step unroll from zero memory: in float64 to 1e-9, and in float32 to 1e-5
    (TL-AddErase: float64 only; from zero memory its step-1 memory is nearly constant over channels, so
    its LayerNorm amplifies float32 rounding: scenic's own code differs between float32 and float64 by up
    to 2.5e-2 there)."""
    net = perturb(build(mode, unit, use_position_embedding=pos))
    ref = Ref(net, net_cfg := cfg(mode, unit, use_position_embedding=pos))
    x = tokens()
    want, want_mem = ref.unroll(x.double().numpy())
    with torch.no_grad():
        got32 = net(x)
        net64 = net.double()
        got64 = net64(x.double())
        mem = net64.init_memory(B)
        for t in range(T):
            _, mem = net64.step(x[:, t].double(), mem)
    assert net_cfg.memory_mode == mode
    assert np.abs(got64.numpy() - want).max() <= 1e-9
    assert np.abs(mem.numpy() - want_mem).max() <= 1e-9
    if mode != "TL-AddErase":
        assert np.abs(got32.double().numpy() - want).max() <= 1e-5


@pytest.mark.parametrize("mode", ["TL", "TL-AddErase"])
def test_read_and_write_select_over_the_reference_sets(mode):
    """TL: read weights over [M ; I] (m + N), write over [M ; I ; O] (m + N + r), each a softmax. The
    reference's TL-AddErase write: 8 heads, each a softmax over the m memory slots only."""
    net = perturb(build(mode))
    ref = Ref(net, cfg(mode))
    x = tokens()
    with torch.no_grad():
        memory = torch.randn(B, M, D, generator=torch.Generator().manual_seed(4))
        _, _, attn = net.step(x[:, 0], memory, return_attention=True)
    _, _, want = ref.unit(memory.double().numpy(), x[:, 0].double().numpy())
    assert attn["read"].shape == (B, R, M + N)
    assert attn["write"].shape == ((B, M, M + N + R) if mode == "TL" else (B, 8, M))
    for k in ("read", "write"):
        np.testing.assert_allclose(attn[k].sum(-1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(attn[k].double().numpy(), want[k], atol=1e-5)


def test_reference_add_erase_write_ignores_the_inputs_except_through_the_output():
    """TokenAddEraseWrite(memory, output_tokens): the step's input tokens reach the new memory only
    through the process output, and the write has no position embedding (the reference's is unused)."""
    net = perturb(build("TL-AddErase"))
    assert net.write_pos is None and net.write is None
    memory = torch.randn(B, M, D, generator=torch.Generator().manual_seed(4))
    out = torch.randn(B, R, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        new, sel = net.add_erase(memory, out, return_weights=True)
    want, want_sel = Ref(net, cfg("TL-AddErase")).add_erase_write(memory.double().numpy(), out.double().numpy())
    np.testing.assert_allclose(new.double().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(sel.double().numpy(), want_sel, atol=1e-6)


def test_simple_unit_splits_its_process_output_as_the_reference():
    """TokenTuringMachineSimpleUnit: outputs are the first r of the processed [M ; TL(I)], memory the
    other m. With the MLP unit (no mixing across tokens) the memory is thus a queue: a step's r reduced
    inputs enter at slots m-r..m-1 and move r slots to the front per step, reaching the output (slots
    0..r-1) only later: with m 5, r 2, the step-1 input is first in the step-3 output."""
    net = perturb(build("simple", "mlp"))
    assert net.read_pos is None and net.write_pos is None and net.write is None
    x = tokens()
    changed = x.clone()
    changed[:, 1] = torch.randn(B, N, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = net(x), net(changed)
    assert (a[:, :3] - b[:, :3]).abs().max() == 0  # steps 1 and 2 output memory slots only
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-4
    net = build("simple", "transformer")
    assert net.process.pos.shape == (1, M + R, D) and net.read.num_tokens == R


# --- the numeric choices, one by one ---------------------------------------------------------------

def test_token_learner_is_v11_with_tanh_gelu_and_eps_1e6():
    tl = perturb(TokenLearner(D, 4, hidden=8)).eval()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    tl = tl.double()
    w = {k: v.detach().numpy() for k, v in tl.state_dict().items()}
    xn = x.numpy()
    mu, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
    normed = (xn - mu) / np.sqrt(var + 1e-6) * w["norm.weight"] + w["norm.bias"]
    h = normed @ w["score.0.weight"].T + w["score.0.bias"]
    tanh_gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    logits = tanh_gelu @ w["score.2.weight"].T + w["score.2.bias"]
    weights = np.exp(logits.transpose(0, 2, 1))
    weights /= weights.sum(-1, keepdims=True)
    with torch.no_grad():
        out, got_w = tl(x, return_weights=True)
    np.testing.assert_allclose(got_w.numpy(), weights, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), weights @ xn, atol=1e-12)
    erf_gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    assert np.abs(erf_gelu - tanh_gelu).max() > 1e-5  # the two GELUs are distinguishable here


@pytest.mark.parametrize("mode,unit", ALL)
def test_every_layer_norm_has_eps_1e6_and_every_gelu_is_tanh(mode, unit):
    net = build(mode, unit)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in net.modules() if isinstance(m, torch.nn.GELU)]
    layers = [m for m in net.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert gelus or layers
    assert all(m.approximate == "tanh" for m in gelus)
    z = torch.linspace(-4, 4, 101)
    for layer in layers:
        expected = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        torch.testing.assert_close(layer.activation(z), expected, rtol=0, atol=1e-6)


def test_mlp_unit_residual_is_an_option_off_by_default():
    x = torch.randn(B, R, D)
    ref_net, ours = build("TL", "mlp"), build("TL", "mlp", mlp_residual=True)
    block_ref, block_ours = ref_net.process.blocks[0], ours.process.blocks[0]
    with torch.no_grad():
        y = block_ref.mlp(block_ref.norm(x))
        torch.testing.assert_close(block_ref(x), y, rtol=0, atol=0)
        torch.testing.assert_close(block_ours(x), x + block_ours.mlp(block_ours.norm(x)), rtol=0, atol=0)


def test_tl_mha_reference_has_8_heads_no_layer_norm_no_dropout_and_ours_is_an_option():
    net = build("TL-MHA", dropout=0.3)
    for sel in (net.read, net.write):
        assert sel.norm is None and sel.attn.num_heads == 8 and sel.attn.dropout == 0.0
    ours = build("TL-MHA-ours", dropout=0.3)
    for sel in (ours.read, ours.write):
        assert sel.norm is not None and sel.norm.eps == 1e-6 and sel.attn.num_heads == HEADS and sel.attn.dropout == 0.3
    assert net.read.queries.shape == (1, R, D) and net.write.queries.shape == (1, M, D)
    with pytest.raises(ConfigError, match="model.controller.memory_mode"):
        ControllerConfig(memory_mode="TL-MHA").validate(12)  # 12 is not divisible by 8 heads
    ControllerConfig(memory_mode="TL-MHA-ours", heads=4).validate(12)


def test_mixer_token_mlp_is_128_wide_unless_set():
    assert build("TL", "mixer").process.blocks[0].token_mlp[0].out_features == 128
    assert build("TL", "mixer", mixer_token_mlp_dim=0).process.blocks[0].token_mlp[0].out_features == MLP
    assert build("TL", "mixer", mixer_token_mlp_dim=7).process.blocks[0].token_mlp[0].out_features == 7
    assert build("TL", "mixer").process.blocks[0].token_mlp[0].in_features == R  # it mixes the r tokens


def test_transformer_unit_always_adds_its_position_embedding():
    net = perturb(build("TL", "transformer", use_position_embedding=False))
    assert net.read_pos is None and net.write_pos is None and net.process.pos.shape == (1, R, D)
    z = torch.randn(B, R, D)
    with torch.no_grad():
        with_pos = net.process(z)
        no_pos = build("TL", "transformer", use_position_embedding=False, process_position_embedding=False)
        no_pos.load_state_dict({k: v for k, v in net.state_dict().items() if k != "process.pos"})
        assert no_pos.process.pos is None
        torch.testing.assert_close(no_pos.process(z + net.process.pos), with_pos, rtol=0, atol=1e-6)
    for unit in ("mixer", "mlp"):  # the reference's mixer and MLP units have none
        assert build("TL", unit).process.pos is None


def _dropout_inputs(module: torch.nn.Module, x: torch.Tensor, *args) -> list[tuple[str, tuple, float]]:
    """(name, input shape, p) of every Dropout call during one forward."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((n, tuple(inp[0].shape), mod.p)))
             for n, m in module.named_modules() if isinstance(m, torch.nn.Dropout)]
    try:
        module(x, *args)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_dropout_sits_where_the_reference_puts_it():
    p = 0.25
    # TokenLearnerModuleV11: its MlpBlock drops after the GELU and on the logits.
    tl = TokenLearner(D, 4, hidden=8, dropout=p).train()
    assert [(s, q) for _, s, q in _dropout_inputs(tl, torch.randn(B, 7, D))] == [((B, 7, 8), p), ((B, 7, 4), p)]
    assert TokenLearner(D, 4).dropout is None  # RT-1's image TokenLearner: rate 0 by default
    # vit.Encoder: after the position embedding; per block: attention weights, after attention, in the MLP.
    net = build("TL", "transformer", dropout=p).train()
    calls = _dropout_inputs(net.process, torch.randn(B, R, D))
    assert calls[0] == ("pos_drop", (B, R, D), p)
    names = [n for n, _, _ in calls[1:]]
    assert names == [f"blocks.{i}.{d}" for i in range(LAYERS) for d in ("dropout1", "dropout", "dropout2")]
    assert all(q == p for _, _, q in calls) and all(b.self_attn.dropout == p for b in net.process.blocks)
    # MixerBlock / the MLP unit: MlpBlock's two dropouts, in every MLP.
    for unit, per_layer in (("mixer", 4), ("mlp", 2)):
        net = build("TL", unit, dropout=p).train()
        calls = _dropout_inputs(net.process, torch.randn(B, R, D))
        assert len(calls) == per_layer * LAYERS and all(q == p for _, _, q in calls)
    # The TTM's TokenLearners get the rate; TL-MHA and the reference's AddErase write have none.
    net = build("TL", dropout=p)
    assert net.read.dropout.p == p and net.write.dropout.p == p
    ae = build("TL-AddErase", dropout=p)
    assert all(m.p == 0 for m in ae.add_erase.modules() if isinstance(m, torch.nn.Dropout))
    assert ae.read.dropout.p == p
    # Eval mode is deterministic; train mode with dropout is not.
    net = build("TL", "transformer", dropout=p)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), net(x))
        assert not torch.equal(net.train()(x), net(x))


def _fan_uniform_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6 / (fan_in + fan_out))


def test_reference_initialisation_is_flax_xavier_uniform_with_tiny_normal_biases():
    """attention_layers.MlpBlock: xavier_uniform kernels, normal(1e-6) biases. vit.Encoder1DBlock's
    attention: xavier_uniform over each flattened [D, D] q/k/v/out kernel (fan_avg D), zero biases.
    TokenLearnerMHA: flax defaults, lecun_normal (truncated normal, std 1/sqrt(D) after truncation at 2
    std), zero biases. Embeddings N(0, 0.02), LayerNorms 1 / 0."""
    d, m, n, r = 64, 32, 16, 8
    torch.manual_seed(0)
    base = dict(memory_tokens=m, read_tokens=r, layers=2, heads=4, mlp_dim=256)
    linears, biases = [], []
    for mode, unit in (("TL", "transformer"), ("TL", "mixer"), ("TL", "mlp"), ("TL-AddErase", "mlp")):
        net = TokenTuringMachine(ControllerConfig(memory_mode=mode, process_unit=unit, **base), d, n)
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) and "out_proj" not in name:
                bound = _fan_uniform_bound(mod.in_features, mod.out_features)
                w = mod.weight.detach()
                assert w.abs().max() <= bound + 1e-7, name
                if w.numel() >= 4096:
                    linears.append(w.std().item() / (bound / math.sqrt(3)))
                biases.append(mod.bias.detach())
            if isinstance(mod, torch.nn.LayerNorm):
                assert torch.equal(mod.weight, torch.ones(d)) and torch.equal(mod.bias, torch.zeros(d)), name
        for layer in (b for b in net.process.blocks if isinstance(b, torch.nn.TransformerEncoderLayer)):
            attn = layer.self_attn
            for w in (*attn.in_proj_weight.detach().chunk(3), attn.out_proj.weight.detach()):
                bound = math.sqrt(3 / d)
                assert w.abs().max() <= bound + 1e-7 and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
            assert not attn.in_proj_bias.any() and not attn.out_proj.bias.any()
        pos = [p for p in (net.read_pos, net.write_pos, net.process.pos) if p is not None]
        assert pos and all(abs(p.std().item() / 0.02 - 1) < 0.1 for p in pos)
    assert linears and all(abs(s - 1) < 0.05 for s in linears)
    b = torch.cat(biases)
    assert b.abs().max() < 1e-5 and b.abs().max() > 0 and abs(b.std().item() / 1e-6 - 1) < 0.05
    mha = TokenTuringMachine(ControllerConfig(memory_mode="TL-MHA", **base), d, n)
    for sel in (mha.read, mha.write):
        std = 1 / math.sqrt(d) / 0.87962566103423978  # before truncation
        for w in (*sel.attn.in_proj_weight.detach().chunk(3), sel.attn.out_proj.weight.detach()):
            assert w.abs().max() <= 2 * std + 1e-6 and abs(w.std().item() * math.sqrt(d) - 1) < 0.05
        assert not sel.attn.in_proj_bias.any() and not sel.attn.out_proj.bias.any()
        assert abs(sel.queries.std().item() / 0.02 - 1) < 0.15


def test_torch_init_keeps_torch_defaults():
    """init: torch (the quickstart's, pending issue 18's second seed) leaves torch's layer initialisation: Linear
    biases uniform in +-1/sqrt(fan_in), not ~1e-6."""
    torch.manual_seed(0)
    net = TokenTuringMachine(ControllerConfig(init="torch"), 64, 9)
    bias = net.read.score[0].bias.detach()
    assert bias.abs().max() > 1e-2 and bias.abs().max() <= 1 / math.sqrt(64)


def test_our_add_erase_variant_is_kept_as_an_option():
    """TL-AddErase-ours: TokenLearner write over [M ; I ; O], then M * (1 - sigmoid(W_e c)) + W_a c."""
    net = perturb(build("TL-AddErase-ours"))
    assert net.add_erase is None and net.write.num_tokens == M
    memory = torch.randn(B, M, D, generator=torch.Generator().manual_seed(4))
    x = tokens()[:, 0]
    with torch.no_grad():
        out, new, attn = net.step(x, memory, return_attention=True)
        c = attn["write"] @ (torch.cat([memory, x, out], 1) + net.write_pos)
        want = memory * (1 - torch.sigmoid(net.erase(c))) + net.add(c)
    assert attn["write"].shape == (B, M, M + N + R)
    torch.testing.assert_close(new, want, rtol=0, atol=1e-5)
    assert torch.equal(build("TL-AddErase-ours", erase_bias=-2.0).erase.bias.detach(), torch.full((D,), -2.0))


# --- the controller's properties, for every mode and unit -------------------------------------------

@pytest.mark.parametrize("mode,unit", ALL)
def test_stepwise_equals_unroll_causal_constant_memory_and_gradients(mode, unit):
    net = build(mode, unit)
    x = tokens()
    with torch.no_grad():
        full = net(x)
        memory = net.init_memory(B)
        for t in range(T):
            out, memory = net.step(x[:, t], memory)
            assert memory.shape == (B, M, D) and out.shape == (B, R, D)
            assert (out - full[:, t]).abs().max() <= 1e-5
        changed = x.clone()
        changed[:, 2:] = torch.randn_like(changed[:, 2:])
        later = net(changed)
    assert (later[:, :2] - full[:, :2]).abs().max() == 0  # nothing from the future
    assert (later[:, 4] - full[:, 4]).abs().max() > 1e-4  # (simple + mlp: the step-2 input is out at step 4)
    net.train()
    net(x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_simple_unit_has_no_selection_weights():
    with pytest.raises(ValueError, match="memory_mode 'simple'"):
        build("simple").step(tokens()[:, 0], torch.zeros(B, M, D), return_attention=True)


# --- config: defaults are the reference's, the quickstart keeps ours ---------------------------------

def test_defaults_are_the_reference_and_quickstart_pins_its_choices():
    c = ControllerConfig()
    assert (c.memory_mode, c.init, c.mlp_residual, c.mixer_token_mlp_dim, c.process_position_embedding) == \
        ("TL", "reference", False, 128, True)
    q = load_config(ROOT / "configs" / "quickstart.yaml").model.controller
    # the quickstart keeps only init: torch (pending its second seed); the other keys would not change it
    # (a transformer process unit has no MLP residual or mixer), so it takes the reference's values
    assert (q.memory_mode, q.process_unit, q.init, q.mlp_residual, q.mixer_token_mlp_dim,
            q.process_position_embedding) == ("TL", "transformer", "torch", False, 128, True)
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    assert "kept until two training seeds decide (issue 18" in text


def test_quickstart_is_the_same_model_whatever_the_keys_its_process_unit_ignores():
    from policy.model import PolicyModel

    outs = []
    for overrides in ([], ["model.controller.mlp_residual=true", "model.controller.mixer_token_mlp_dim=0"]):
        cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
        torch.manual_seed(0)
        model = PolicyModel(cfg.model, 64, 5, 4).eval()
        torch.manual_seed(1)
        images = torch.randint(0, 255, (2, 2, 64, 64, 3), dtype=torch.uint8)
        with torch.no_grad():
            outs.append(model(images, torch.randn(2, cfg.model.language.context_dim), torch.randn(2, 2, 4)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("field,value", [("init", "xavier"), ("mixer_token_mlp_dim", -1), ("memory_mode", "TL-NTM")])
def test_bad_ttm_options_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"model.controller.{field}"):
        dataclasses.replace(ControllerConfig(), **{field: value}).validate(16)
    with pytest.raises(ConfigError, match=f"model.controller.{field}"):
        load_config(ROOT / "configs" / "quickstart.yaml", [f"model.controller.{field}={value}"])
