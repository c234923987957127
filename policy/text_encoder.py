"""Instruction -> FiLM context vector [B, context_dim].

source "sentencepiece": token ids [B,L] + mask [B,L] (True = real token) -> embedding + learned
positions -> pre-LN transformer layers -> LayerNorm -> masked mean pool -> Linear.
source "embedding": a precomputed sentence embedding [B,E] (e.g. OXE's 512-d USE) -> Linear.
The model.language fields are checked by LanguageConfig.validate (policy/config.py).
"""
from __future__ import annotations

import torch
from torch import nn

from policy.config import LanguageConfig


class TextEncoder(nn.Module):
    def __init__(self, cfg: LanguageConfig, vocab_size: int, embedding_dim: int = 512):
        super().__init__()
        self.source = cfg.source
        if cfg.source == "embedding":
            if embedding_dim < 1:
                raise ValueError(f"embedding_dim: expected >= 1 for model.language.source='embedding', got {embedding_dim}")
            self.proj = nn.Linear(embedding_dim, cfg.context_dim)
            return
        if vocab_size < 2:
            raise ValueError(f"vocab_size: expected >= 2 (the tokenizer's vocabulary), got {vocab_size}")
        self.max_tokens = cfg.max_tokens
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_tokens, cfg.width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.context_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.source != "sentencepiece":
            raise ValueError("instruction ids: this model takes precomputed embeddings "
                             "(model.language.source='embedding'); call encode_embedding instead")
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[1] > self.max_tokens:
            raise ValueError(f"instruction ids/mask: expected equal shapes [B, L<={self.max_tokens}] "
                             f"(model.language.max_tokens), got {tuple(ids.shape)} and {tuple(mask.shape)}")
        mask = mask.bool()
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        # An instruction with no real token attends everywhere rather than nowhere (which gives NaN).
        ignore = ~(mask | ~mask.any(dim=1, keepdim=True))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=ignore)
        x = self.norm(x)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.proj(pooled)

    def encode_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.source != "embedding":
            raise ValueError("instruction embedding: this model encodes token ids "
                             "(model.language.source='sentencepiece'); call encode_instruction instead")
        if embedding.dim() != 2 or embedding.shape[1] != self.proj.in_features:
            raise ValueError(f"instruction embedding: expected [B, {self.proj.in_features}], got {tuple(embedding.shape)}")
        return self.proj(embedding.float())
