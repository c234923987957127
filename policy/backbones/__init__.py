"""FiLM-conditioned image backbones, one file each, registered by name with what they support
(policy/backbones/registry.py, which also says how to add one):

    efficientnet  FiLM-EfficientNet, RT-1's image tokenizer (film_efficientnet.py)
    vittm         Vision Token Turing Machine (vittm.py)
    vit           a plain ViT, the baseline for ViTTM (vit.py, which also holds the ViT pieces ViTTM uses)
"""
from __future__ import annotations

from policy.backbones.registry import (BackboneInfo, backbone_info, backbone_names, check_registry_complete,
                                       make_backbone, register_backbone)
from policy.backbones import film_efficientnet, vit, vittm  # noqa: F401  (registers the backbones)

check_registry_complete()

__all__ = ["BackboneInfo", "backbone_info", "backbone_names", "make_backbone", "register_backbone"]
