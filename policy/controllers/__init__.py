"""Controllers: the sequence model between a step's input tokens and the action head.

One file per controller, each registering its class by name with what it supports
(policy/controllers/registry.py, which also says how to add one):

    ttm                 Token Turing Machine (ttm.py): m memory tokens, constant cost per step.
    rt1                 RT-1's transformer over a window of the last `window` frames (rt1.py).
    causal_transformer  a causal transformer over the whole episode with a KV cache (causal_transformer.py).
    lstm                an LSTM over each step's flattened tokens (lstm.py).

Shared pieces: layers.py (attention, pre-LN blocks, Keras init), padding.py (valid steps first).
"""
from __future__ import annotations

from policy.controllers.registry import (ControllerInfo, check_registry_complete, controller_info, controller_names,
                                         make_controller, register_controller)
from policy.controllers import causal_transformer, lstm, rt1, ttm  # noqa: F401  (registers the controllers)

check_registry_complete()

__all__ = ["ControllerInfo", "controller_info", "controller_names", "make_controller", "register_controller"]
