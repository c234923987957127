"""An LSTM controller over each step's N tokens (LayerNorm, flattened, Linear to `width`); the hidden
state gives r tokens through Linear(width, r*D) and a LayerNorm. State: (h, c).
"""
from __future__ import annotations

import torch
from torch import nn

from policy.config import ControllerConfig
from policy.controllers.padding import unroll_valid
from policy.controllers.registry import register_controller


@register_controller("lstm", carried_memory=True)
class LSTMController(nn.Module):
    """LayerNorm each token, flatten the step's N tokens, Linear(N*D, width), LSTM(width, layers),
    Linear(width, r*D) -> r tokens -> LayerNorm."""

    def __init__(self, cfg: ControllerConfig, dim: int, num_input_tokens: int):
        super().__init__()
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
        return unroll_valid(self._unroll, tokens, step_mask)

    def init_memory(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.inp.weight
        h = torch.zeros(self.lstm.num_layers, batch, self.lstm.hidden_size, device=p.device, dtype=p.dtype)
        return h, h.clone()

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tokens [B,N,D], (h, c) [layers,B,width] -> (out [B,r,D], (h, c))."""
        h, state = self.lstm(self.inp(self.norm(tokens).flatten(1)).unsqueeze(1), tuple(state))
        return self._tokens(h[:, 0]), state
