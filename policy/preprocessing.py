"""Frame preprocessing before the image backbone: uint8 frames -> resized, ImageNet-normalised floats."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N,H,W,3] frames -> ImageNet-normalised float [N,3,image_size,image_size]."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 frames [N,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (image_size, image_size):
        # Antialiased bilinear (tf.image.resize(antialias=True)) so that downscaling does not alias.
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std
