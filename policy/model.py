"""The language-conditioned visuomotor policy: instruction + frames (+ proprio) -> action-token logits.

    instruction --TextEncoder--> context [B,C]
    frame (uint8) --resize + ImageNet norm--> FiLM-EfficientNet(context) --TokenLearner--> num_tokens tokens
    (+ one Linear(proprio) token if cfg.use_proprio)  = the step's input tokens I
    I --Token Turing Machine--> r output tokens --ActionHead--> logits [A, bins]

Action head: A learned queries (one per action dimension) attend over the r output tokens (one head,
softmax over tokens, values un-normalised, as in TokenLearner but with content-independent queries so
that A may exceed r), then LayerNorm and a per-dimension Linear(token_dim -> bins). Per-dimension
output weights keep the dimensions' bin semantics apart at a small cost (A * token_dim * bins).

Training unrolls whole sequences from zero memory (`forward`); inference steps one frame at a time
(`step`) and gives the same logits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from policy.config import ConfigError, ModelConfig
from policy.film_efficientnet import FiLMEfficientNet, preprocess_frames
from policy.text_encoder import TextEncoder
from policy.token_learner import TokenLearner
from policy.ttm import TokenTuringMachine


class ActionHead(nn.Module):
    """[..., r, D] controller tokens -> [..., A, bins] logits."""

    def __init__(self, dim: int, num_action_dims: int, bins: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_action_dims, dim) * dim ** -0.5)
        self.key_norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.weight = nn.Parameter(torch.randn(num_action_dims, dim, bins) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_action_dims, bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.key(self.key_norm(x))  # [..., r, D]
        weights = (self.queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1])).softmax(dim=-1)  # [..., A, r]
        pooled = self.out_norm(weights @ x)  # [..., A, D]
        return torch.einsum("...ad,adb->...ab", pooled, self.weight) + self.bias


class PolicyModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, num_action_dims: int, proprio_dim: int,
                 embedding_dim: int = 512):
        super().__init__()
        img = cfg.image
        if img.image_size < 16:
            raise ConfigError(f"model.image.image_size: expected >= 16, got {img.image_size!r}")
        if img.token_dim < 8:
            raise ConfigError(f"model.image.token_dim: expected >= 8, got {img.token_dim!r}")
        if cfg.action_bins < 2:
            raise ConfigError(f"model.action_bins: expected >= 2, got {cfg.action_bins!r}")
        if cfg.controller.type != "ttm":
            raise ConfigError(f"model.controller.type: expected one of ['ttm'], got {cfg.controller.type!r}")
        if num_action_dims < 1:
            raise ValueError(f"num_action_dims: expected >= 1, got {num_action_dims}")
        if cfg.use_proprio and proprio_dim < 1:
            raise ValueError(f"proprio_dim: expected >= 1 when model.use_proprio is true, got {proprio_dim}")
        self.cfg = cfg
        self.image_size = img.image_size
        self.text = TextEncoder(cfg.language, vocab_size, embedding_dim)
        self.backbone = FiLMEfficientNet(img, cfg.language.context_dim)
        side = self.backbone.feature_size(img.image_size)
        if side < 1:
            raise ConfigError(f"model.image.image_size: {img.image_size} is too small for variant "
                              f"{img.variant!r} (no feature map left after its strides)")
        # Zero-initialised so that it starts as a no-op and only adds what training finds useful.
        self.image_pos = nn.Parameter(torch.zeros(1, side * side, img.token_dim)) if img.position_embedding else None
        self.token_learner = TokenLearner(img.token_dim, img.num_tokens, img.tokenlearner_hidden,
                                          num_positions=side * side, field="model.image.num_tokens")
        self.proprio = nn.Linear(proprio_dim, img.token_dim) if cfg.use_proprio else None
        self.controller = TokenTuringMachine(cfg.controller, img.token_dim,
                                             img.num_tokens + (1 if cfg.use_proprio else 0))
        self.head = ActionHead(img.token_dim, num_action_dims, cfg.action_bins)

    def encode_instruction(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B,L] + mask [B,L] (True = real token) -> context [B,C]."""
        return self.text(ids, mask)

    def encode_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """Precomputed instruction embedding [B,E] -> context [B,C]."""
        return self.text.encode_embedding(embedding)

    def encode_frames(self, images: torch.Tensor, context: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
        """uint8 [N,H,W,3], context [N,C], proprio [N,S] | None -> input tokens [N, num_tokens (+1), D]."""
        features = self.backbone(preprocess_frames(images, self.image_size), context)
        if self.image_pos is not None:
            features = features + self.image_pos
        tokens = self.token_learner(features)
        if self.proprio is None:
            return tokens
        if proprio is None:
            raise ValueError(f"proprio: expected a float tensor [..., {self.proprio.in_features}] "
                             "(model.use_proprio is true), got None")
        return torch.cat([tokens, self.proprio(proprio.to(tokens.dtype)).unsqueeze(1)], dim=1)

    def forward(self, images: torch.Tensor, context: torch.Tensor, proprio: torch.Tensor | None = None,
                step_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training unroll from zero memory: images uint8 [B,T,H,W,3], context [B,C], proprio [B,T,S],
        step_mask bool [B,T] (False = padding) -> logits [B,T,A,bins]. Padded frames are not encoded
        (they would skew BatchNorm statistics) and do not change the memory."""
        if images.dim() != 5:
            raise ValueError(f"images: expected uint8 [B,T,H,W,3], got {images.dtype} {tuple(images.shape)}")
        b, t = images.shape[:2]
        step_mask = step_mask.bool() if step_mask is not None else None
        frames = images.flatten(0, 1)
        ctx = context.unsqueeze(1).expand(b, t, -1).flatten(0, 1)
        prop = proprio.flatten(0, 1) if proprio is not None else None
        if step_mask is None or bool(step_mask.all()):
            tokens = self.encode_frames(frames, ctx, prop)
        else:
            # All B*T frames still go through the backbone in one batched call, just the valid ones.
            idx = step_mask.flatten().nonzero().squeeze(1)
            valid = self.encode_frames(frames[idx], ctx[idx], prop[idx] if prop is not None else None)
            tokens = valid.new_zeros(b * t, *valid.shape[1:]).index_copy(0, idx, valid)
        out = self.controller(tokens.unflatten(0, (b, t)), step_mask)
        return self.head(out)

    def init_state(self, batch: int) -> torch.Tensor:
        """Recurrent state for `step`: the controller's zero memory."""
        return self.controller.init_memory(batch)

    def step(self, image: torch.Tensor, context: torch.Tensor, proprio: torch.Tensor | None,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One inference step: image uint8 [B,H,W,3] -> (logits [B,A,bins], new state)."""
        out, state = self.controller.step(self.encode_frames(image, context, proprio), state)
        return self.head(out), state
