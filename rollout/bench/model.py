"""`bench model`: one config's freshly initialised policy model, no data needed.

Reports parameters per component and in total, image tokens per frame before and after TokenLearner,
FLOPs per policy step, and the largest difference between stepping one frame at a time and the training
unroll on the same random inputs (should be <= 1e-5 in float32): for the whole model on random frames,
and for the controller and head alone on random unit-scale tokens.

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one `PolicyModel.step` at batch 1 (encode
the frame, controller, action head); one multiply-add = 2 FLOPs; elementwise ops are not counted. The
counted step runs with autograd enabled and the math attention backend, so that torch's fused CPU
attention and the fast-path encoder layer (which the counter has no formula for, and would count as 0)
are not used; LSTM layers (mkldnn on CPU) are counted by a formula for their matmuls. FLOPs are given
for the first step and for the last of `steps`: rt1 costs more until its window is full, a causal
transformer more with every step (its KV cache grows), ttm and lstm cost the same at every step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.machine import machine


def _rnn_layer_flops(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """aten.mkldnn_rnn_layer: per time step and sample, x @ W_ih^T and h @ W_hh^T (4 gates)."""
    steps_times_batch = 1
    for s in input_shape[:-1]:
        steps_times_batch *= s
    return 2 * steps_times_batch * (w_ih_shape[0] * w_ih_shape[1] + w_hh_shape[0] * w_hh_shape[1])


def _count(fn, *args) -> tuple[int, object]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.mkldnn_rnn_layer: _rnn_layer_flops}
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), \
            FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


def count_step_flops(model, image, context, proprio, state) -> dict:
    """FLOPs of one `model.step`, counted part by part: encoding the frame into input tokens (backbone,
    TokenLearner, proprio / instruction tokens), the controller step, the action head."""
    encode, tokens = _count(model.encode_frames, image, context, proprio)
    controller, (out, _) = _count(model.controller_step, tokens, state)
    head, _ = _count(model.head, out)
    total = encode + controller + head
    return {"flops": total, "gflops": round(total / 1e9, 4),
            "per_component": {"encode_frame": encode, "controller": controller, "head": head}}


def param_counts(model) -> dict:
    per = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    per.update({name: p.numel() for name, p in model.named_parameters(recurse=False)})
    per = {k: v for k, v in per.items() if v}
    total = sum(p.numel() for p in model.parameters())
    bn_stats = sum(b.numel() for b in model.backbone.buffers() if b.dtype.is_floating_point)
    return {
        "per_component": per,
        "total": total,
        "total_excluding_language": total - per.get("text", 0),
        # RT-1's count: Keras count_params() includes BatchNorm moving statistics; its instruction
        # embedding (USE) is computed outside the model.
        "backbone_batchnorm_statistics": bn_stats,
        "total_rt1_convention": total - per.get("text", 0) + bn_stats,
        "controller_and_head": per.get("controller", 0) + per.get("head", 0),
    }


def bench_model(config: str, steps: int = 20, threads: int = 2, action_dims: int = 11, proprio_dim: int = 8,
                seed: int = 0, device: str = "cpu", overrides: list[str] | None = None) -> dict:
    import torch

    from policy.config import load_config
    from policy.controllers import controller_info
    from policy.model import PolicyModel

    if steps < 1 or threads < 1 or action_dims < 1:
        raise ValueError(f"--steps, --threads, --action-dims: expected >= 1, got {steps}, {threads}, {action_dims}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = load_config(config, overrides)
    m = cfg.model
    model = PolicyModel(m, vocab_size=m.language.vocab_size, num_action_dims=action_dims,
                        proprio_dim=proprio_dim if m.use_proprio else 0).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    size = m.image.image_size
    images = torch.randint(0, 256, (1, steps, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    proprio = torch.randn(1, steps, proprio_dim, generator=g).to(device) if m.use_proprio else None
    with torch.no_grad():
        if m.language.source == "embedding":
            context = model.encode_embedding(torch.randn(1, model.text.proj.in_features, generator=g).to(device))
        else:
            ids = torch.randint(3, m.language.vocab_size, (1, m.language.max_tokens), generator=g).to(device)
            context = model.encode_instruction(ids, torch.ones_like(ids, dtype=torch.bool))
        t0 = time.perf_counter()
        full = model(images, context, proprio)
        unroll_s = time.perf_counter() - t0
        if model.horizon:
            # Bounded memory (model.controller.memory_horizon H): training sees windows of the last H
            # steps, so step t is compared with the forward pass over the window ending at t.
            h = model.horizon
            full = torch.stack([model(images[:, max(0, t - h + 1):t + 1], context,
                                      proprio[:, max(0, t - h + 1):t + 1] if proprio is not None else None)[:, -1]
                                for t in range(steps)], dim=1)
        state = model.init_state(1)
        states, diffs, times = [], [], []
        for t in range(steps):
            states.append(state)
            t0 = time.perf_counter()
            logits, state = model.step(images[:, t], context, proprio[:, t] if proprio is not None else None, state)
            times.append(time.perf_counter() - t0)
            diffs.append(float((logits - full[:, t]).abs().max()))
        # The controller and head alone on unit-scale random tokens: a fresh backbone in eval mode has
        # untrained BatchNorm statistics, and a deep one (B3) then outputs near-zero tokens.
        n_in = m.image.num_tokens + int(m.use_proprio) + int(m.instruction_token)
        tokens = torch.randn(1, steps, n_in, m.image.token_dim, generator=g).to(device)
        ctrl_full = model.head(model.controller(tokens))
        ctrl_state, ctrl_diffs = model.controller.init_memory(1), []
        for t in range(steps):
            out, ctrl_state = model.controller.step(tokens[:, t], ctrl_state)
            ctrl_diffs.append(float((model.head(out) - ctrl_full[:, t]).abs().max()))
    flops = {}
    for name, t in (("first_step", 0), ("last_step", steps - 1)):
        flops[name] = {"step": t, **count_step_flops(model, images[:, t], context,
                                                     proprio[:, t] if proprio is not None else None, states[t])}
    ctrl = model.controller
    info = controller_info(m.controller.type)
    positions = model.backbone.num_output_tokens(size)
    return {
        "benchmark": "model", "config": str(config), "overrides": list(overrides or []), "name": cfg.name,
        "controller": m.controller.type,
        "backbone": m.image.backbone, "image_size": size, "action_dims": action_dims,
        "proprio_dim": proprio_dim if m.use_proprio else 0, "steps": steps, "threads": threads, "device": device,
        "params": param_counts(model),
        "tokens": {
            "backbone_tokens_per_frame": positions,
            "tokenlearner_tokens_per_frame": m.image.num_tokens,
            "controller_input_tokens_per_step": m.image.num_tokens + int(m.use_proprio) + int(m.instruction_token),
            "controller_output_tokens_per_step": int(full.shape[2]) if info.token_per_action_dim
            else int(m.controller.read_tokens),
            **({"rt1_window_positions": int(ctrl.pos_emb.in_features)} if info.windowed_history else {}),
        },
        "flops_per_step": flops,
        "stepwise_vs_unrolled_max_abs_diff": max(diffs),
        "controller_stepwise_vs_unrolled_max_abs_diff": max(ctrl_diffs),
        "timing": {"unrolled_s": round(unroll_s, 3), "step_median_ms": round(1000 * statistics.median(times), 2)},
        "machine": machine(),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_config(p, "config of the freshly initialised model")
    A.add_steps(p, 20, "policy steps compared, stepwise vs unrolled")
    p.add_argument("--action-dims", type=A.positive_int, default=11, help="action dimensions (RT-1: 11)")
    p.add_argument("--proprio-dim", type=int, default=8, help="proprio size (if the config uses it)")
    p.add_argument("--device", default="cpu", help="torch device")
    A.add_threads(p)
    A.add_overrides(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    res = bench_model(str(A.config_path(a)), a.steps, a.threads, action_dims=a.action_dims, proprio_dim=a.proprio_dim,
                      device=a.device, overrides=a.overrides)
    print(json.dumps(res, indent=2))
    return res


register("model", "a config's parameters per component, image tokens per frame, FLOPs per policy step, "
         "stepwise-vs-unrolled difference", add_arguments, run)
