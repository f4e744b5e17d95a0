"""timm registry entries of the PEFT models: ``sparse_tuning_<base>`` and ``clca_<method>_<base>``.

Each entry point carries its method and base model explicitly and calls the builder in
:mod:`effvision.peft.models` (imported when a model is built, so registering stays light).
:func:`register_peft_models` is called by :func:`effvision.timm_models.register`.
"""

from __future__ import annotations

import sys
from functools import partial

from torch import nn

from effvision.tokens.registry import REDUCTION_METHODS, VIT_BASE_MODELS, create_registered, register_entrypoint

PEFT_BASE_MODELS = VIT_BASE_MODELS
#: CLCA's aggregation head reads one class token, so distilled DeiTs (class + distillation token) are left out
CLCA_BASE_MODELS = tuple(base for base in PEFT_BASE_MODELS if "distilled" not in base)
CLCA_METHODS = (*REDUCTION_METHODS, "sparse_tuning")

REGISTERED_MODELS = tuple(
    [f"sparse_tuning_{base}" for base in PEFT_BASE_MODELS]
    + [f"clca_{method}_{base}" for method in CLCA_METHODS for base in CLCA_BASE_MODELS]
)


def _named(entrypoint, name: str, doc: str):
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc
    return entrypoint


def _sparse_tuning_entrypoint(base_name: str):
    name = f"sparse_tuning_{base_name}"

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        from effvision.peft.models import create_sparse_tuning_model

        return create_registered(name, partial(create_sparse_tuning_model, base_name), pretrained, kwargs)

    return _named(entrypoint, name, f"{base_name} as a Sparse-Tuning model.")


def _clca_entrypoint(method: str, base_name: str):
    name = f"clca_{method}_{base_name}"

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        from effvision.peft.models import create_clca_model

        return create_registered(name, partial(create_clca_model, method, base_name), pretrained, kwargs)

    return _named(entrypoint, name, f"{base_name} reduced with {method}, plus CLCA.")


def register_peft_models() -> list[str]:
    """Register ``sparse_tuning_<base>`` and ``clca_<method>_<base>`` (method: ppt, tome, topk,
    sparse_tuning) for every base model (idempotent), each with its base's pretrained cfgs; returns the names."""
    module = sys.modules[__name__]
    entrypoints = [(_sparse_tuning_entrypoint(base), base) for base in PEFT_BASE_MODELS] + [
        (_clca_entrypoint(method, base), base) for method in CLCA_METHODS for base in CLCA_BASE_MODELS
    ]
    for entrypoint, base in entrypoints:
        if not hasattr(module, entrypoint.__name__):
            register_entrypoint(entrypoint, base)
    return list(REGISTERED_MODELS)
