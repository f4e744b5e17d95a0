"""timm registry entries ``<method>_<timm name>`` for token-reduced ViTs.

:func:`register_reduced_models` (called by :func:`effvision.timm_models.register`, the one entry point)
makes ``timm.create_model("ppt_deit_small_patch16_224", pretrained=True)`` work. Entry points carry
their method and base model explicitly (nothing parses a registered name back apart) and accept timm's
usual kwargs (``pretrained``, ``num_classes``, ``pretrained_cfg_overlay``, ``img_size``,
``features_only``, ``out_indices``...) plus the method's options (``r``, ``layers``, ``threshold``,
``keep_rate``...), build the base timm model (which loads its weights) and reduce it.
:func:`create_reduced_model` does the same for any timm ViT name.

timm is imported inside the functions, not at module level, so registering from timm's own import
(``effvision.timm_models.register`` runs when timm is first imported) never re-enters this module.
"""

from __future__ import annotations

import sys

from torch import nn

from effvision.tokens.policies import POLICIES
from effvision.tokens.reduce import reduce

REDUCTION_METHODS = ("ppt", "tome", "topk")
METHOD_OPTIONS = (*dict.fromkeys(option for method in REDUCTION_METHODS for option in POLICIES[method].options),
                  "track_source")
FEATURE_OPTIONS = ("features_only", "out_indices", "feature_cls")

# timm VisionTransformer bases (Sparse-Tuning and CLCA are registered for these too, see effvision.peft)
VIT_BASE_MODELS = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_base_patch16_clip_224",
)
# DINOv2 (timm VisionTransformer with LayerScale; reg4: 4 register tokens), default 518 px (37x37 patches)
DINOV2_BASE_MODELS = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
)
# timm Eva class with rotary position embeddings: EVA-02 and the RoPE ViTs (axial and "mixed" RoPE)
ROPE_BASE_MODELS = (
    "eva02_tiny_patch14_224",
    "eva02_small_patch14_224",
    "eva02_base_patch14_224",
    "eva02_large_patch14_224",
    "vit_small_patch16_rope_224",
    "vit_base_patch16_rope_224",
    "vit_large_patch16_rope_224",
    "vit_small_patch16_rope_mixed_224",
    "vit_base_patch16_rope_mixed_224",
    "vit_large_patch16_rope_mixed_224",
)
BASE_MODELS = VIT_BASE_MODELS + DINOV2_BASE_MODELS + ROPE_BASE_MODELS

REGISTERED_MODELS = tuple(f"{method}_{base}" for method in REDUCTION_METHODS for base in BASE_MODELS)


def features_only_model(model: nn.Module, out_indices=3, feature_cls="getter") -> nn.Module:
    """timm's ``features_only=True`` wrapper around a reduced model: ``FeatureGetterNet``, which prunes
    the blocks after the last index and calls the model's ``forward_intermediates`` (NCHW maps on the
    patch grid, unmerged; see :mod:`effvision.tokens.model`)."""
    from timm.models._features import FeatureGetterNet

    if feature_cls not in ("getter", FeatureGetterNet):
        raise ValueError(f"token-reduced models support feature_cls='getter' (timm's ViT default), got {feature_cls!r}")
    features = FeatureGetterNet(model, out_indices=out_indices, output_fmt="NCHW")
    features.pretrained_cfg = features.default_cfg = getattr(model, "pretrained_cfg", {})
    return features


def create_reduced_model(method: str, base_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(base_name, pretrained, **kwargs)`` reduced with ``method``.

    Method options (``r``, ``layers``, ``threshold``, ``keep_rate``, ``proportional_attention``,
    ``track_source``) are taken out of ``kwargs``; ``features_only=True`` (with ``out_indices``) wraps the
    reduced model as timm does; everything else goes to timm.
    """
    import timm

    if method not in REDUCTION_METHODS:
        raise ValueError(f"unknown token-reduction method {method!r}; choose one of {', '.join(REDUCTION_METHODS)}")
    if not timm.is_model(base_name):
        raise ValueError(f"unknown timm model {base_name!r}")
    options = {key: kwargs.pop(key) for key in METHOD_OPTIONS if key in kwargs}
    features = {key: kwargs.pop(key) for key in FEATURE_OPTIONS if key in kwargs}
    model = reduce(timm.create_model(base_name, pretrained=pretrained, **kwargs), method, **options)
    if features.pop("features_only", False):
        return features_only_model(model, **features)
    return model


def _make_entrypoint(method: str, base_name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_reduced_model(method, base_name, pretrained=pretrained, **kwargs)

    name = f"{method}_{base_name}"
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base_name} with {method} token reduction (paper defaults; override via kwargs)."
    return entrypoint


def register_reduced_models() -> list[str]:
    """Register ``<method>_<base>`` for every method and base model (idempotent); returns the names."""
    from timm.models import register_model

    module = sys.modules[__name__]
    for method in REDUCTION_METHODS:
        for base_name in BASE_MODELS:
            if not hasattr(module, f"{method}_{base_name}"):
                entrypoint = _make_entrypoint(method, base_name)
                setattr(module, entrypoint.__name__, entrypoint)
                register_model(entrypoint)
    return list(REGISTERED_MODELS)
