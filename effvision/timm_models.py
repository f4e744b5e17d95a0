"""The one entry point that registers every effvision model name with timm.

``register()`` is idempotent and imports timm (and torch); ``import effvision`` arranges for it to run
when timm is imported, so ``timm.create_model("ppt_deit_small_patch16_224")`` works after
``import effvision`` without the package import itself paying for timm. Each part registers its own
names: token reduction (:mod:`effvision.tokens.registry`) and PEFT (:mod:`effvision.peft.registry`).
"""

from __future__ import annotations


def register() -> list[str]:
    """Register all ``<method>_<timm name>`` entries (token reduction and PEFT); returns the names."""
    from effvision.peft.registry import register_peft_models
    from effvision.tokens.registry import register_reduced_models

    return register_reduced_models() + register_peft_models()
