"""The language-conditioned visuomotor policy: instruction + frames (+ proprio) -> action-token logits.

    instruction --TextEncoder--> context [B,C]
    frame (uint8) --resize + ImageNet norm--> FiLM backbone(context) --TokenLearner--> num_tokens tokens
                  (backbone: FiLM-EfficientNet | ViTTM | ViT, model.image.backbone)
    (+ one Linear(proprio) token if cfg.use_proprio)  = the step's input tokens I
    I --controller--> r output tokens --ActionHead--> logits [A, bins]
      (controller: Token Turing Machine | causal transformer | LSTM, model.controller.type)
    I --rt1 controller--> A tokens, one per action dimension --TokenHead--> logits [A, bins]

Action head: A learned queries (one per action dimension) attend over the r output tokens (one head,
softmax over tokens, values un-normalised, as in TokenLearner but with content-independent queries so
that A may exceed r), then LayerNorm and a per-dimension Linear(token_dim -> bins). Per-dimension
output weights keep the dimensions' bin semantics apart at a small cost (A * token_dim * bins).
RT-1's transformer already outputs one token per action dimension; TokenHead is its output Dense, one
Linear(width -> bins) shared by all dimensions (policy/controllers/rt1.py, docs/MODELS.md). Which head a
controller gets, and whether memory_horizon applies, comes from the controller registry's capabilities.

Training unrolls whole sequences from zero memory (`forward`); inference steps one frame at a time
(`step`) and gives the same logits.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from policy.backbones import make_backbone
from policy.config import ConfigError, ModelConfig, check_num_tokens
from policy.controllers import controller_info, controller_names, make_controller
from policy.preprocessing import preprocess_frames
from policy.text_encoder import TextEncoder
from policy.token_learner import TokenLearner

__all__ = ["ActionHead", "PolicyModel", "TokenHead"]


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


class TokenHead(nn.Module):
    """[..., A, W] tokens, one per action dimension -> [..., A, bins] logits: one Linear(W, bins) shared
    by all dimensions (RT-1's output Dense)."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.out = nn.Linear(dim, bins)
        nn.init.xavier_uniform_(self.out.weight)  # Keras Dense default
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class PolicyModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, num_action_dims: int, proprio_dim: int,
                 embedding_dim: int = 512):
        super().__init__()
        img = cfg.image
        cfg.validate()  # the config-only rules (policy/config.py); what follows needs built shapes
        if num_action_dims < 1:
            raise ValueError(f"num_action_dims: expected >= 1, got {num_action_dims}")
        if cfg.use_proprio and proprio_dim < 1:
            raise ValueError(f"proprio_dim: expected >= 1 when model.use_proprio is true, got {proprio_dim}")
        self.cfg = cfg
        self.image_size = img.image_size
        self.text = TextEncoder(cfg.language, vocab_size, embedding_dim)
        self.backbone = make_backbone(img, cfg.language.context_dim)
        positions = self.backbone.num_output_tokens(img.image_size)
        if positions < 1:
            raise ConfigError(f"model.image.image_size: {img.image_size} is too small for variant "
                              f"{img.variant!r} (no feature map left after its strides)")
        check_num_tokens(img, positions)
        # Zero-initialised so that it starts as a no-op and only adds what training finds useful.
        self.image_pos = nn.Parameter(torch.zeros(1, positions, img.token_dim)) if img.position_embedding else None
        self.token_learner = TokenLearner(img.token_dim, img.num_tokens, img.tokenlearner_hidden,
                                          num_positions=positions, field="model.image.num_tokens")
        self.proprio = nn.Linear(proprio_dim, img.token_dim) if cfg.use_proprio else None
        self.instruction = (nn.Linear(cfg.language.context_dim, img.token_dim)
                            if cfg.instruction_token else None)
        self.num_input_tokens = img.num_tokens + int(cfg.use_proprio) + int(cfg.instruction_token)
        self.controller = make_controller(cfg.controller, img.token_dim, self.num_input_tokens,
                                          num_action_dims=num_action_dims)
        self.controller_info = controller_info(cfg.controller.type)
        self.horizon = cfg.controller.memory_horizon if self.controller_info.carried_memory else 0
        out_dim = getattr(self.controller, "out_dim", img.token_dim)
        if self.controller_info.token_per_action_dim:
            self.head: nn.Module = TokenHead(out_dim, cfg.action_bins)
        else:
            self.head = ActionHead(out_dim, num_action_dims, cfg.action_bins)

    def encode_instruction(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B,L] + mask [B,L] (True = real token) -> context [B,C]."""
        return self.text(ids, mask)

    def encode_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """Precomputed instruction embedding [B,E] -> context [B,C]."""
        return self.text.encode_embedding(embedding)

    def encode_frames(self, images: torch.Tensor, context: torch.Tensor, proprio: torch.Tensor | None) -> torch.Tensor:
        """uint8 [N,H,W,3], context [N,C], proprio [N,S] | None -> input tokens
        [N, num_tokens (+1 proprio) (+1 instruction), D]."""
        features = self.backbone(preprocess_frames(images, self.image_size, self.cfg.image.resize), context)
        if self.image_pos is not None:
            features = features + self.image_pos
        tokens = [self.token_learner(features)]
        if self.proprio is not None:
            if proprio is None:
                raise ValueError(f"proprio: expected a float tensor [..., {self.proprio.in_features}] "
                                 "(model.use_proprio is true), got None")
            tokens.append(self.proprio(proprio.to(tokens[0].dtype)).unsqueeze(1))
        if self.instruction is not None:
            tokens.append(self.instruction(context).unsqueeze(1))
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]

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

    def init_state(self, batch: int) -> Any:
        """Recurrent state for `step`: the controller's initial memory (a tensor, or a tuple or dict of
        tensors, depending on model.controller.type); treat it as opaque."""
        if self.horizon:
            # The input tokens of the last (horizon - 1) frames: the state is rebuilt from them each step.
            ref = next(self.parameters())
            return torch.zeros(batch, 0, self.num_input_tokens, self.cfg.image.token_dim,
                               dtype=ref.dtype, device=ref.device)
        return self.controller.init_memory(batch)

    def step(self, image: torch.Tensor, context: torch.Tensor, proprio: torch.Tensor | None,
             state: Any, return_attention: bool = False):
        """One inference step: image uint8 [B,H,W,3] -> (logits [B,A,bins], new state). With
        return_attention (controllers with attention_maps: the TTM) also the step's memory selection weights
        {"read": [B,r,m+N], "write": [B,m,m+N+r]} (TokenLearner / attention weights over [memory; inputs(; outputs)])."""
        tokens = self.encode_frames(image, context, proprio)
        if return_attention:
            out, state, attn = self.controller_step(tokens, state, return_attention=True)
            return self.head(out), state, attn
        out, state = self.controller_step(tokens, state)
        return self.head(out), state

    def controller_step(self, tokens: torch.Tensor, state: Any, return_attention: bool = False):
        """The controller's part of `step`: input tokens [B,N,D] -> (output tokens, new state[, attention])."""
        if return_attention and not self.controller_info.attention_maps:
            kinds = " or ".join(repr(n) for n in controller_names(attention_maps=True))
            raise ValueError(f"return_attention: expected a policy with model.controller.type {kinds} (memory "
                             f"read/write weights), got {self.cfg.controller.type!r}")
        if self.horizon:
            # Exactly what training on windows of `horizon` steps computes for a window's last step
            # (windows shorter than the horizon at the episode start are front-padded there, and
            # padded steps leave the state untouched). Only the controller reruns; frames are encoded once.
            history = torch.cat([state, tokens.unsqueeze(1)], dim=1)[:, -self.horizon:]
            new_state = history[:, 1:] if history.shape[1] == self.horizon else history
            if return_attention:
                out, attn = self.controller(history, None, return_attention=True)
                return out[:, -1], new_state, {k: v[:, -1] for k, v in attn.items()}
            return self.controller(history, None)[:, -1], new_state
        if return_attention:
            return self.controller.step(tokens, state, return_attention=True)
        return self.controller.step(tokens, state)
