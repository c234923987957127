"""Frame preprocessing before the image backbone: uint8 frames -> resized, ImageNet-normalised floats.

Resize methods (model.image.resize; policy.config.RESIZE_METHODS):
- "bilinear" (default): RT-1's `tf.image.resize(image, (size, size))` (google-research/robotics_transformer,
  film_efficientnet/pretrained_efficientnet_encoder.py): bilinear with half-pixel centres and no
  antialiasing, computed in float32 the way TF's kernel computes it (same source coordinates, clamped
  neighbours and lerp order), so it gives TF's result bit for bit (tests/policy/test_fidelity_rt1.py).
  Downscaling by more than 2x aliases, as the reference does.
- "antialias": antialiased bilinear (`F.interpolate(antialias=True)`, as `tf.image.resize(antialias=True)`):
  no aliasing when downscaling, but not RT-1's input (0.35 in normalised pixel units at 256x320 -> 300).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from policy.config import RESIZE_METHODS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tf_bilinear_weights(out_size: int, in_size: int, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF's half-pixel bilinear interpolation weights for one axis, in float32: source coordinate
    (i + 0.5) * (in / out) - 0.5, neighbours floor / ceil clamped to the image, lerp = coordinate - floor."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
    lerp = (src - floor).astype(np.float32)
    return (torch.from_numpy(lower).to(device), torch.from_numpy(upper).to(device),
            torch.from_numpy(lerp).to(device))


def resize_bilinear_tf(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 [N,C,H,W] -> [N,C,size]: `tf.image.resize(method="bilinear", antialias=False)` (TF2,
    half-pixel centres), with TF's arithmetic: lerp along the width first, then along the height."""
    y_lo, y_hi, y_lerp = _tf_bilinear_weights(size[0], x.shape[-2], x.device)
    x_lo, x_hi, x_lerp = _tf_bilinear_weights(size[1], x.shape[-1], x.device)
    x_lerp, y_lerp = x_lerp.to(x.dtype), y_lerp.to(x.dtype)[:, None]

    def along_width(rows: torch.Tensor) -> torch.Tensor:
        left, right = rows[..., x_lo], rows[..., x_hi]
        return left + (right - left) * x_lerp

    top, bottom = along_width(x[..., y_lo, :]), along_width(x[..., y_hi, :])
    return top + (bottom - top) * y_lerp


def resize_frames(x: torch.Tensor, image_size: int, resize: str = "bilinear") -> torch.Tensor:
    """float [N,3,H,W] pixel values -> [N,3,image_size,image_size] by `resize` (module docstring)."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"model.image.resize: expected one of {list(RESIZE_METHODS)}, got {resize!r}")
    if x.shape[-2:] == (image_size, image_size):
        return x  # tf.image.resize returns frames of the target size unchanged, too
    if resize == "antialias":
        return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return resize_bilinear_tf(x, (image_size, image_size))


def preprocess_frames(frames: torch.Tensor, image_size: int, resize: str = "bilinear") -> torch.Tensor:
    """uint8 [N,H,W,3] frames -> ImageNet-normalised float [N,3,image_size,image_size]."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 frames [N,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    x = resize_frames(frames.permute(0, 3, 1, 2).float(), image_size, resize)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std
