"""timm registry entries ``<method>_<timm name>`` for token-reduced ViTs.

After ``import effvision``: ``timm.create_model("ppt_deit_small_patch16_224", pretrained=True)``.
Entry points accept timm's usual kwargs (``pretrained``, ``num_classes``, ``pretrained_cfg_overlay``,
``img_size``...) plus the method's options (``r``, ``layers``, ``threshold``, ``keep_rate``), build
the base timm model (which loads its weights) and reduce it. :func:`create_reduced_model` does the same
for any timm ViT name.
"""

from __future__ import annotations

import sys

import timm
from timm.models import register_model
from torch import nn

from effvision.tokens.reduce import reduce

REDUCTION_METHODS = ("ppt", "tome", "topk")
METHOD_OPTIONS = ("r", "layers", "threshold", "keep_rate", "proportional_attention", "track_source")

BASE_MODELS = (
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


def create_reduced_model(method: str, base_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(base_name, pretrained, **kwargs)`` reduced with ``method``.

    Method options (``r``, ``layers``, ``threshold``, ``keep_rate``, ``proportional_attention``,
    ``track_source``) are taken out of ``kwargs``; everything else goes to timm.
    """
    if method not in REDUCTION_METHODS:
        raise ValueError(f"unknown token-reduction method {method!r}; choose one of {', '.join(REDUCTION_METHODS)}")
    if not timm.is_model(base_name):
        raise ValueError(f"unknown timm model {base_name!r}")
    options = {key: kwargs.pop(key) for key in METHOD_OPTIONS if key in kwargs}
    model = timm.create_model(base_name, pretrained=pretrained, **kwargs)
    return reduce(model, method, **options)


def _make_entrypoint(method: str, base_name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_reduced_model(method, base_name, pretrained=pretrained, **kwargs)

    name = f"{method}_{base_name}"
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base_name} with {method} token reduction (paper defaults; override via kwargs)."
    return entrypoint


def register_all() -> list[str]:
    """Register ``<method>_<base>`` for every method and base model; returns the names."""
    module = sys.modules[__name__]
    names = []
    for method in REDUCTION_METHODS:
        for base_name in BASE_MODELS:
            entrypoint = _make_entrypoint(method, base_name)
            setattr(module, entrypoint.__name__, entrypoint)
            register_model(entrypoint)
            names.append(entrypoint.__name__)
    return names


def _make_peft_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        from effvision.peft.models import create_peft_model  # lazy: keeps `import effvision` light

        return create_peft_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: Sparse-Tuning / CLCA model (see effvision.peft.models)."
    return entrypoint


def register_peft() -> list[str]:
    """Register ``sparse_tuning_<base>`` and ``clca_<method>_<base>`` (method: ppt, tome, topk,
    sparse_tuning) for every base model; returns the names."""
    module = sys.modules[__name__]
    prefixes = ["sparse_tuning"] + [f"clca_{method}" for method in (*REDUCTION_METHODS, "sparse_tuning")]
    names = []
    for prefix in prefixes:
        for base_name in BASE_MODELS:
            entrypoint = _make_peft_entrypoint(f"{prefix}_{base_name}")
            setattr(module, entrypoint.__name__, entrypoint)
            register_model(entrypoint)
            names.append(entrypoint.__name__)
    return names


REGISTERED_MODELS = register_all() + register_peft()
