"""RT-1's transformer controller (Brohan et al. 2022, google-research/robotics_transformer).

A window of the last `window` frames, each frame's N input tokens followed by one zeroed token per
action dimension; token Dense + learned position embedding over the window's window*(N+A) positions;
pre-LN layers of multi-head attention (heads x key_dim) and a single Dense "feed-forward" (no
activation), no final LayerNorm; RT-1's attention mask (causal, and action positions attend to no
action position: only to input tokens of the current and earlier frames). All A action tokens of a
frame are read in one pass, shifted by one as in the reference: action k's output is the one at
position k-1 of the frame's action slots, and action 0's at the frame's last input token. r = A tokens
of width `width`, turned into logits by one shared Linear(width, bins) (the reference's output Dense;
`TokenHead`). State: the input tokens of the last window-1 frames, so only the new frame is encoded;
the whole window is re-run each step (positions are relative to the window; until it is full, frames
after the current one are zeros, as in the reference, and the mask keeps them out).
"""
from __future__ import annotations

import torch
from torch import nn

from policy.config import ControllerConfig
from policy.controllers.layers import Block, keras_init
from policy.controllers.padding import unroll_valid
from policy.controllers.registry import register_controller

_RT1_LN_EPS = 1e-6  # Keras LayerNormalization(epsilon=1e-6) in the reference


def rt1_attention_mask(window: int, input_tokens: int, action_tokens: int) -> torch.Tensor:
    """RT-1's mask over window*(N+A) positions (frame f: N input tokens, then A action tokens); True = may
    attend. Lower-triangular (causal, also within a frame), minus every action->action pair: an action
    position sees only input tokens of its own and earlier frames, not even itself."""
    per = input_tokens + action_tokens
    idx = torch.arange(window * per)
    is_action = idx % per >= input_tokens
    causal = idx[:, None] >= idx[None, :]
    return causal & ~(is_action[:, None] & is_action[None, :])


@register_controller("rt1", windowed_history=True, token_per_action_dim=True)
class RT1Transformer(nn.Module):
    """RT-1's windowed decoder transformer; outputs one token per action dimension (width `out_dim`)."""

    # out[..., k, :] belongs to action dimension k (the registry's token_per_action_dim).

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int, num_action_dims: int):
        super().__init__()
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
            Block(width, heads, key_dim, cfg.feed_forward_style(), cfg.mlp_dim, cfg.dropout, eps=_RT1_LN_EPS)
            for _ in range(cfg.layers))
        keras_init(self)
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
        return unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> torch.Tensor:
        """The cache of earlier frames' input tokens [B, F, N, D], F <= window-1 (empty at the start)."""
        p = self.token_emb.weight
        return torch.zeros(batch, 0, self.input_tokens, self.dim, device=p.device, dtype=p.dtype)

    def step(self, tokens: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B,N,D], cache [B,F,N,D] -> (out [B,A,width], cache of the last min(F+1, window-1) frames)."""
        frames = torch.cat([cache, tokens.unsqueeze(1)], dim=1)
        out = self.run_window(self._full_window(frames))[:, frames.shape[1] - 1]
        return out, frames[:, max(0, frames.shape[1] - (self.window - 1)):]
