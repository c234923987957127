"""Backbone benchmark: latency and FLOPs of the image backbones at one input size.

FiLM-EfficientNet (RT-1's B3 by default), ViTTM and plain ViTs of the same width and depth, each
with the same token_dim / context_dim, on one [batch, 3, S, S] input. FLOPs come from
torch.utils.flop_counter.FlopCounterMode (matmuls, convs and attention, the latter on the math backend;
one multiply-add = 2 FLOPs; elementwise ops are not counted);
`gmacs` = FLOPs / 2, the unit papers usually call "FLOPs" (ViT-B/16 at 224: 17.6). Latency: median
and p90 of `steps` timed forward passes (inference mode, after warm-up) on `threads` threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING

from rollout.bench import args as A
from rollout.bench import register
from rollout.bench.machine import machine

if TYPE_CHECKING:
    import torch

    from policy.config import ImageEncoderConfig


def default_patches(image_size: int) -> tuple[int, int]:
    """(process_patch, memory_patch) for an image size: an 8x8 process grid and a 14x14 memory grid where
    they divide the image (224 -> 28 and 16, as configs/rt1_ttm_vittm.yaml), else 4x4 and 8x8."""
    from policy.config import ConfigError

    if image_size % 8 == 0 and image_size % 14 == 0:
        return image_size // 8, image_size // 14
    if image_size % 8 == 0:
        return image_size // 4, image_size // 8
    raise ConfigError(f"--image-size: expected a multiple of 8 (or pass --process-patch and --memory-patch), "
                      f"got {image_size}")


def backbone_configs(image_size: int, vit_size: str, process_patch: int, memory_patch: int,
                     efficientnet_variant: str, token_dim: int) -> dict[str, ImageEncoderConfig]:
    from policy.config import ImageEncoderConfig

    common = dict(image_size=image_size, token_dim=token_dim, num_tokens=1)
    vit = dict(vit_size=vit_size, process_patch=process_patch, memory_patch=memory_patch)
    configs = {
        f"efficientnet-{efficientnet_variant}": ImageEncoderConfig(backbone="efficientnet",
                                                                   variant=efficientnet_variant, **common),
        f"vittm-{vit_size} process/{process_patch} memory/{memory_patch}": ImageEncoderConfig(
            backbone="vittm", **vit, **common),
        f"vit-{vit_size}/{memory_patch}": ImageEncoderConfig(backbone="vit", vit_patch=memory_patch, **vit, **common),
    }
    if process_patch != memory_patch:
        configs[f"vit-{vit_size}/{process_patch}"] = ImageEncoderConfig(backbone="vit", vit_patch=process_patch,
                                                                        **vit, **common)
    return configs


def count_flops(net: torch.nn.Module, images: torch.Tensor, context: torch.Tensor) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode has no formula for CPU's fused attention kernel (it would count attention as 0);
    # the math backend runs attention as counted matmuls.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(images, context)
    return int(counter.get_total_flops())


def bench_backbone(image_size: int = 224, threads: int = 2, steps: int = 20, batch: int = 1, vit_size: str = "s",
                   process_patch: int | None = None, memory_patch: int | None = None,
                   efficientnet_variant: str = "b3", token_dim: int = 512, context_dim: int = 512,
                   warmup: int = 3) -> dict:
    """Parameters, FLOPs and forward latency of each backbone; ratios relative to the EfficientNet."""
    import torch

    from policy.backbones import make_backbone

    if steps < 1 or threads < 1 or batch < 1:
        raise ValueError(f"steps, threads, batch: expected >= 1, got {steps}, {threads}, {batch}")
    torch.set_num_threads(threads)
    if process_patch is None or memory_patch is None:
        p, m = default_patches(image_size)
        process_patch, memory_patch = process_patch or p, memory_patch or m
    configs = backbone_configs(image_size, vit_size, process_patch, memory_patch, efficientnet_variant, token_dim)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    context = torch.randn(batch, context_dim, generator=g)
    results = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        net = make_backbone(cfg, context_dim).eval()
        flops = count_flops(net, images, context)
        with torch.inference_mode():
            for _ in range(warmup):
                out = net(images, context)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                net(images, context)
                times.append(time.perf_counter() - t)
        ms = sorted(1000 * x for x in times)
        results[name] = {
            "backbone": cfg.backbone, "params": sum(p.numel() for p in net.parameters()),
            "output_tokens": int(out.shape[1]), "gflops": round(flops / 1e9, 4), "gmacs": round(flops / 2e9, 4),
            "median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 3),
        }
    base = results[next(iter(configs))]
    for r in results.values():
        r["flops_vs_efficientnet"] = round(r["gflops"] / base["gflops"], 3) if base["gflops"] else None
        r["latency_vs_efficientnet"] = round(r["median_ms"] / base["median_ms"], 3) if base["median_ms"] else None
    return {"benchmark": "backbone", "image_size": image_size, "batch": batch, "threads": threads, "steps": steps,
            "vit_size": vit_size, "process_patch": process_patch, "memory_patch": memory_patch,
            "token_dim": token_dim, "context_dim": context_dim, "backbones": results, "machine": machine()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    A.add_image_size(p, 224, "input image size S (S x S)")
    p.add_argument("--vit-size", default="s", help="ViTTM / ViT size preset (tiny, s, b)")
    p.add_argument("--process-patch", type=int, default=None, help="ViTTM process patch (default image_size / 8)")
    p.add_argument("--memory-patch", type=int, default=None,
                   help="ViTTM memory patch = plain ViT patch (default image_size / 14)")
    A.add_steps(p, 20, "timed forward passes")
    A.add_threads(p)
    A.add_json(p)


def run(a: argparse.Namespace) -> dict:
    res = bench_backbone(a.image_size, a.threads, a.steps, vit_size=a.vit_size, process_patch=a.process_patch,
                         memory_patch=a.memory_patch)
    print(json.dumps(res, indent=2))
    return res


register("backbone", "image backbone parameters, FLOPs and latency: FiLM-EfficientNet-B3, ViTTM, plain ViTs",
         add_arguments, run)
