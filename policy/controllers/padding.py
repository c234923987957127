"""Padding in training unrolls: move the valid steps to the front (keeping their order), unroll, put the
outputs back. Padding then sits after every valid step, where causality keeps it from them, so the valid
steps' outputs equal those of an unroll over the valid steps alone; padded steps' outputs are meaningless."""
from __future__ import annotations

import torch


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


def gather_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.take_along_dim(x, order.view(*order.shape, *(1,) * (x.dim() - 2)), dim=1)


def scatter_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_steps: out[b, order[b, j]] = x[b, j]."""
    index = order.view(*order.shape, *(1,) * (x.dim() - 2)).expand_as(x)
    return torch.empty_like(x).scatter(1, index, x)


def unroll_valid(fn, tokens: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a padding-free unroll `fn` to the valid steps moved to the front, then restore positions."""
    order = valid_first_order(step_mask)
    if order is None:
        return fn(tokens)
    return scatter_steps(fn(gather_steps(tokens, order)), order)
