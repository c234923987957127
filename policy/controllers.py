"""Controllers: the sequence model between a step's input tokens and the action head.

Every controller has the interface of `policy.ttm.TokenTuringMachine`:

    forward(tokens [B,T,N,D], step_mask [B,T] bool | None) -> out [B,T,r,out_dim]   training unroll
    init_memory(batch) -> state                                                       inference state
    step(tokens [B,N,D], state) -> (out [B,r,out_dim], new state)                     one inference step

Stepping through an episode gives the same outputs as the unroll (up to float rounding), the output at
step t never depends on inputs after t, and steps where `step_mask` is False (padding) do not affect
any valid step: the valid steps' outputs equal those of an unroll over the valid steps alone. (The TTM
carries its memory over padded steps; the controllers here move the valid steps to the front of the
sequence, keeping their order, unroll, and put the outputs back; padded steps' outputs are meaningless.)

    ttm                 Token Turing Machine (policy/ttm.py): m memory tokens, constant cost per step.
    rt1                 RT-1's transformer (Brohan et al. 2022, google-research/robotics_transformer):
                        a window of the last `window` frames, each frame's N input tokens followed by one
                        zeroed token per action dimension; token Dense + learned position embedding over
                        the window's window*(N+A) positions; pre-LN layers of multi-head attention
                        (heads x key_dim) and a single Dense "feed-forward" (no activation), no final
                        LayerNorm; RT-1's attention mask (causal, and action positions attend to no action
                        position: only to input tokens of the current and earlier frames). All A action
                        tokens of a frame are read in one pass, shifted by one as in the reference: action
                        k's output is the one at position k-1 of the frame's action slots, and action 0's
                        at the frame's last input token. r = A tokens of width `width`, turned into logits
                        by one shared Linear(width, bins) (the reference's output Dense; `TokenHead`).
                        State: the input tokens of the last window-1 frames, so only the new frame is
                        encoded; the whole window is re-run each step (positions are relative to the
                        window; until it is full, frames after the current one are zeros, as in the
                        reference, and the mask keeps them out).
    causal_transformer  a causal transformer over the whole episode at the token width: each step adds its
                        N input tokens and r learned readout tokens; input tokens attend to input tokens of
                        the current and earlier steps, readout tokens to those and to the step's readouts.
                        Learned slot embedding (N + r slots) plus a sinusoidal embedding of the step index.
                        State: per-layer keys and values of all earlier input tokens (a KV cache), so a
                        step processes only its own N + r tokens. Memory and cost grow with the episode.
    lstm                an LSTM over each step's N tokens (LayerNorm, flattened, Linear to `width`);
                        the hidden state gives r tokens through Linear(width, r*D) and a LayerNorm.
                        State: (h, c).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from policy.config import ConfigError, ControllerConfig
from policy.ttm import TokenTuringMachine
from policy.ttm import check_controller_config as check_ttm_config

CONTROLLER_TYPES = ("ttm", "rt1", "causal_transformer", "lstm")
FEED_FORWARD = ("auto", "dense", "mlp")
_RT1_LN_EPS = 1e-6  # Keras LayerNormalization(epsilon=1e-6) in the reference


def check_controller_config(cfg: ControllerConfig, dim: int) -> None:
    """Raise ConfigError naming the first model.controller field that the chosen type cannot use."""

    def require(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"model.controller.{name}: expected {expected}, got {getattr(cfg, name)!r}")

    require(cfg.type in CONTROLLER_TYPES, "type", f"one of {list(CONTROLLER_TYPES)}")
    if cfg.type == "ttm":
        check_ttm_config(cfg, dim)
        return
    require(cfg.layers >= 1, "layers", ">= 1")
    require(0.0 <= cfg.dropout < 1.0, "dropout", "a value in [0, 1)")
    require(cfg.width >= 0, "width", "0 (= the token width) or a positive width")
    if cfg.type == "lstm":
        require(cfg.read_tokens >= 1, "read_tokens", ">= 1")
        return
    require(cfg.feed_forward in FEED_FORWARD, "feed_forward", f"one of {list(FEED_FORWARD)}")
    require(cfg.key_dim >= 0, "key_dim", "0 (= width / heads) or a positive per-head width")
    require(cfg.heads >= 1, "heads", ">= 1")
    width = (cfg.width or dim) if cfg.type == "rt1" else dim
    if cfg.key_dim == 0:
        require(width % cfg.heads == 0, "heads", f"a divisor of the model width {width} (or set key_dim)")
    if feed_forward_style(cfg) == "mlp":
        require(cfg.mlp_dim >= 1, "mlp_dim", ">= 1")
    if cfg.type == "rt1":
        require(cfg.window >= 1, "window", ">= 1 (frames in RT-1's history window)")
    else:
        require(cfg.read_tokens >= 1, "read_tokens", ">= 1")


def feed_forward_style(cfg: ControllerConfig) -> str:
    if cfg.feed_forward == "auto":
        return "dense" if cfg.type == "rt1" else "mlp"
    return cfg.feed_forward


def make_controller(cfg: ControllerConfig, dim: int, num_input_tokens: int,
                    num_action_dims: int | None = None) -> nn.Module:
    """The controller named by model.controller.type, for `num_input_tokens` tokens of width `dim` per
    step. rt1 also needs the number of action dimensions (one action token each)."""
    check_controller_config(cfg, dim)
    if cfg.type == "ttm":
        return TokenTuringMachine(cfg, dim, num_input_tokens)
    if cfg.type == "rt1":
        if num_action_dims is None or num_action_dims < 1:
            raise ValueError(f"num_action_dims: the rt1 controller needs the number of action dimensions "
                             f"(one action token each), got {num_action_dims}")
        return RT1Transformer(cfg, dim, num_input_tokens, num_action_dims)
    if cfg.type == "causal_transformer":
        return CausalTransformer(cfg, dim, num_input_tokens)
    return LSTMController(cfg, dim, num_input_tokens)


# --- padding -----------------------------------------------------------------------------------

def valid_first_order(step_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B,T] bool -> [B,T] step indices with the valid steps first (in time order), or None when there is
    no mask (or, in eager mode, no padding). Padding then sits after every valid step, where causality keeps it from them."""
    if step_mask is None:
        return None
    # Eager shortcut only: a data-dependent branch breaks a torch.compile graph, and without padding the
    # gather/scatter below is the identity anyway.
    if not torch.compiler.is_compiling() and bool(step_mask.all()):
        return None
    return torch.sort((~step_mask.bool()).to(torch.uint8), dim=1, stable=True).indices


def _gather_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.take_along_dim(x, order.view(*order.shape, *(1,) * (x.dim() - 2)), dim=1)


def _scatter_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of _gather_steps: out[b, order[b, j]] = x[b, j]."""
    index = order.view(*order.shape, *(1,) * (x.dim() - 2)).expand_as(x)
    return torch.empty_like(x).scatter(1, index, x)


def _unroll_valid(fn, tokens: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a padding-free unroll `fn` to the valid steps moved to the front, then restore positions."""
    order = valid_first_order(step_mask)
    if order is None:
        return fn(tokens)
    return _scatter_steps(fn(_gather_steps(tokens, order)), order)


# --- transformer parts -------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with a free per-head width (Keras MultiHeadAttention(key_dim, num_heads)):
    q, k, v: Linear(dim, heads*key_dim); output Linear(heads*key_dim, dim); dropout on the weights."""

    def __init__(self, dim: int, heads: int, key_dim: int, dropout: float):
        super().__init__()
        self.heads, self.key_dim, self.dropout = heads, key_dim, dropout
        self.q = nn.Linear(dim, heads * key_dim)
        self.k = nn.Linear(dim, heads * key_dim)
        self.v = nn.Linear(dim, heads * key_dim)
        self.out = nn.Linear(heads * key_dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.key_dim)).transpose(1, 2)  # [B,H,L,Kd]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mask: bool [Lq, Lk], True = may attend."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + FF(LN(x)). FF "dense" is RT-1's single Dense(dim) without
    activation (dropout after it); "mlp" is Dense(mlp_dim) GELU Dense(dim)."""

    def __init__(self, dim: int, heads: int, key_dim: int, feed_forward: str, mlp_dim: int, dropout: float,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, key_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        if feed_forward == "dense":
            self.ff: nn.Module = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        else:
            self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                    nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,L,D]; past: cached (keys, values) [B,H,S,Kd] placed before x's own; mask [L, S+L].
        Returns (x, x's keys, x's values)."""
        q, k, v = self.attn.project(self.norm1(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        x = x + self.attn.attend(q, keys, values, mask)
        return x + self.ff(self.norm2(x)), k, v


def _keras_init(module: nn.Module) -> None:
    """Keras Dense / MultiHeadAttention defaults: glorot-uniform kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# --- RT-1 --------------------------------------------------------------------------------------

def rt1_attention_mask(window: int, input_tokens: int, action_tokens: int) -> torch.Tensor:
    """RT-1's mask over window*(N+A) positions (frame f: N input tokens, then A action tokens); True = may
    attend. Lower-triangular (causal, also within a frame), minus every action->action pair: an action
    position sees only input tokens of its own and earlier frames, not even itself."""
    per = input_tokens + action_tokens
    idx = torch.arange(window * per)
    is_action = idx % per >= input_tokens
    causal = idx[:, None] >= idx[None, :]
    return causal & ~(is_action[:, None] & is_action[None, :])


class RT1Transformer(nn.Module):
    """RT-1's windowed decoder transformer; outputs one token per action dimension (width `out_dim`)."""

    action_token_outputs = True  # out[..., k, :] belongs to action dimension k (PolicyModel uses TokenHead)

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int, num_action_dims: int):
        super().__init__()
        check_controller_config(cfg, dim)
        width = cfg.width or dim
        heads = cfg.heads
        key_dim = cfg.key_dim or width // heads
        self.window, self.dim = cfg.window, dim
        self.input_tokens, self.action_tokens = num_input_tokens, num_action_dims
        self.per_frame = num_input_tokens + num_action_dims
        self.out_dim = width
        self.token_emb = nn.Linear(dim, width)
        # The reference's Dense over one-hot positions: a [positions, width] table plus a bias.
        self.pos_emb = nn.Linear(cfg.window * self.per_frame, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, key_dim, feed_forward_style(cfg), cfg.mlp_dim, cfg.dropout, eps=_RT1_LN_EPS)
            for _ in range(cfg.layers))
        _keras_init(self)
        self.register_buffer("mask", rt1_attention_mask(cfg.window, num_input_tokens, num_action_dims),
                             persistent=False)

    def run_window(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [M,F,N,D] (F <= window; frame f at window position f) -> [M,F,A,width]: for each frame,
        the outputs that predict its A action tokens."""
        m, f, n, _ = frames.shape
        actions = frames.new_zeros(m, f, self.action_tokens, self.dim)  # action-token inputs are zeroed
        x = torch.cat([frames, actions], dim=2).flatten(1, 2)
        length = x.shape[1]
        x = self.token_emb(x) + self.pos_emb.weight[:, :length].t() + self.pos_emb.bias
        mask = self.mask[:length, :length]
        for block in self.blocks:
            x, _, _ = block(x, mask)
        # Reference: logits for action k come from position k-1 of the frame's action slots (k=0: the last
        # input token); the frame's last action slot predicts nothing.
        return x.unflatten(1, (f, self.per_frame))[:, :, n - 1:n - 1 + self.action_tokens]

    def _full_window(self, frames: torch.Tensor) -> torch.Tensor:
        """Pad [M,F,N,D] with zero frames after the last one to the whole window, as the reference's
        zero-initialised state does; the mask keeps them out of the real frames' outputs. Every window
        pass then has one shape, so training and inference round alike."""
        missing = self.window - frames.shape[1]
        if missing <= 0:
            return frames
        return torch.cat([frames, frames.new_zeros(frames.shape[0], missing, *frames.shape[2:])], dim=1)

    def _unroll(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape[:2]
        w = self.window
        if t <= w:
            return self.run_window(self._full_window(tokens))[:, :t]
        # Steps 0..w-1 come from the first window; every later step t from the window ending at t, with
        # the current frame at the window's last position, as at inference.
        first = self.run_window(tokens[:, :w])
        windows = tokens.unfold(1, w, 1)[:, 1:].permute(0, 1, 4, 2, 3).flatten(0, 1)  # [B*(T-w), w, N, D]
        last = self.run_window(windows)[:, -1].unflatten(0, (b, t - w))
        return torch.cat([first, last], dim=1)

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,T,N,D] -> [B,T,A,width]. Step t sees frames max(0, t-window+1)..t."""
        return _unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> torch.Tensor:
        """The cache of earlier frames' input tokens [B, F, N, D], F <= window-1 (empty at the start)."""
        p = self.token_emb.weight
        return torch.zeros(batch, 0, self.input_tokens, self.dim, device=p.device, dtype=p.dtype)

    def step(self, tokens: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B,N,D], cache [B,F,N,D] -> (out [B,A,width], cache of the last min(F+1, window-1) frames)."""
        frames = torch.cat([cache, tokens.unsqueeze(1)], dim=1)
        out = self.run_window(self._full_window(frames))[:, frames.shape[1] - 1]
        return out, frames[:, max(0, frames.shape[1] - (self.window - 1)):]


# --- causal transformer ------------------------------------------------------------------------

def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[L] step indices -> [L, dim] sin/cos embedding (Vaswani et al.); any length."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angle = positions.float()[:, None] * freq[None, :]
    out = torch.zeros(positions.shape[0], dim, device=positions.device)
    out[:, 0:2 * half:2] = torch.sin(angle)
    out[:, 1:2 * half:2] = torch.cos(angle)
    return out


def causal_step_mask(steps: int, input_tokens: int, readout_tokens: int) -> torch.Tensor:
    """[L, L] for L = steps*(N+r), True = may attend: input tokens see input tokens of their own and
    earlier steps; readout tokens see those and their own step's readouts."""
    per = input_tokens + readout_tokens
    idx = torch.arange(steps * per)
    step = idx // per
    readout = idx % per >= input_tokens
    to_inputs = ~readout[None, :] & (step[None, :] <= step[:, None])
    to_readouts = readout[None, :] & readout[:, None] & (step[None, :] == step[:, None])
    return to_inputs | to_readouts


class CausalTransformer(nn.Module):
    """Causal transformer over the episode's tokens; r readout tokens per step; KV cache at inference."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
        check_controller_config(cfg, dim)
        self.dim, self.input_tokens, self.readout_tokens = dim, num_input_tokens, cfg.read_tokens
        self.heads, self.key_dim = cfg.heads, cfg.key_dim or dim // cfg.heads
        self.out_dim = dim
        self.readout = nn.Parameter(torch.randn(cfg.read_tokens, dim) * 0.02)
        self.slot_pos = (nn.Parameter(torch.randn(num_input_tokens + cfg.read_tokens, dim) * 0.02)
                         if cfg.use_position_embedding else None)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, self.key_dim, feed_forward_style(cfg), cfg.mlp_dim, cfg.dropout)
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(dim)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [B,T,N,D] of steps start..start+T-1 -> [B,T,N+r,D] with readouts and embeddings."""
        b, t = tokens.shape[:2]
        x = torch.cat([tokens, self.readout.expand(b, t, -1, -1)], dim=2)
        if self.slot_pos is not None:
            x = x + self.slot_pos
        steps = torch.arange(start, start + t, device=tokens.device)
        return x + sinusoidal(steps, self.dim).to(x.dtype)[:, None, :]

    def _unroll(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens, 0).flatten(1, 2)
        mask = causal_step_mask(t, self.input_tokens, self.readout_tokens).to(x.device)
        for block in self.blocks:
            x, _, _ = block(x, mask)
        return self.norm(x).unflatten(1, (t, -1))[:, :, self.input_tokens:]

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,T,N,D] -> [B,T,r,D]."""
        return _unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> dict[str, torch.Tensor]:
        """{"keys", "values"}: [layers, B, heads, S, key_dim] for the S = steps*N input tokens so far."""
        p = self.readout
        empty = torch.zeros(len(self.blocks), batch, self.heads, 0, self.key_dim, device=p.device, dtype=p.dtype)
        return {"keys": empty, "values": empty.clone()}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens [B,N,D] -> (out [B,r,D], state with this step's input-token keys/values appended)."""
        n, r = self.input_tokens, self.readout_tokens
        past = state["keys"].shape[3]
        x = self.embed(tokens.unsqueeze(1), past // n)[:, 0]
        mask = torch.ones(n + r, past + n + r, dtype=torch.bool, device=x.device)
        mask[:n, past + n:] = False  # input tokens do not see readouts
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            cached = (state["keys"][i], state["values"][i])
            x, k, v = block(x, mask, cached)
            keys.append(torch.cat([cached[0], k[:, :, :n]], dim=2))
            values.append(torch.cat([cached[1], v[:, :, :n]], dim=2))
        return self.norm(x)[:, n:], {"keys": torch.stack(keys), "values": torch.stack(values)}


# --- LSTM --------------------------------------------------------------------------------------

class LSTMController(nn.Module):
    """LayerNorm each token, flatten the step's N tokens, Linear(N*D, width), LSTM(width, layers),
    Linear(width, r*D) -> r tokens -> LayerNorm."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
        check_controller_config(cfg, dim)
        hidden = cfg.width or dim
        self.dim, self.readout_tokens, self.out_dim = dim, cfg.read_tokens, dim
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(num_input_tokens * dim, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.out = nn.Linear(hidden, cfg.read_tokens * dim)
        self.out_norm = nn.LayerNorm(dim)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.out(h).unflatten(-1, (self.readout_tokens, self.dim)))

    def _unroll(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.inp(self.norm(tokens).flatten(2)))
        return self._tokens(h)

    def forward(self, tokens: torch.Tensor, step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,T,N,D] -> [B,T,r,D]."""
        return _unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.inp.weight
        h = torch.zeros(self.lstm.num_layers, batch, self.lstm.hidden_size, device=p.device, dtype=p.dtype)
        return h, h.clone()

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tokens [B,N,D], (h, c) [layers,B,width] -> (out [B,r,D], (h, c))."""
        h, state = self.lstm(self.inp(self.norm(tokens).flatten(1)).unsqueeze(1), tuple(state))
        return self._tokens(h[:, 0]), state

