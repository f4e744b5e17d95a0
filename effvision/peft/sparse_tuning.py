"""Sparse-Tuning (Liu et al., arXiv 2405.14700): a frozen ViT, token sparsification and Dense Adapters.

Only the adapters and the classifier head train; the sparsification (top-k with a fused token at
blocks 3, 6, 9, keep 0.7 by default; any policy of :mod:`effvision.tokens` works) cuts the tokens
the frozen blocks process, and with them training memory and time.
"""

from __future__ import annotations

from torch import nn

from effvision.peft.dense_adapter import DenseAdapters
from effvision.tokens.blocks import TokenReducingBlocks
from effvision.tokens.reduce import reduce

# parameter-name prefixes that train in parameter-efficient fine-tuning
TRAINABLE_PREFIXES = ("dense_adapters.", "clca_cache.", "head.", "head_dist.")


def add_dense_adapters(model: nn.Module, bottleneck: int = 64) -> nn.Module:
    """Add Dense Adapters (zero-initialised: outputs unchanged) to a token-reduced ViT, in place."""
    if not isinstance(model.blocks, TokenReducingBlocks):
        raise ValueError("dense adapters need a model prepared with effvision.reduce(model, method, ...) first")
    if any(isinstance(ext, DenseAdapters) for ext in model.blocks.extensions):
        raise ValueError("this model already has dense adapters")
    model.dense_adapters = DenseAdapters(model.embed_dim, len(model.blocks), bottleneck)
    # first: the other extensions may append tokens the adapters must see (see DenseAdapters)
    model.blocks.extensions = (model.dense_adapters, *model.blocks.extensions)
    return model


def freeze_for_peft(model: nn.Module, trainable_prefixes: tuple[str, ...] = TRAINABLE_PREFIXES) -> dict:
    """Freeze every parameter except those named with ``trainable_prefixes``; returns
    :func:`trainable_parameter_report`."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable_prefixes))
    return trainable_parameter_report(model)


def trainable_parameter_report(model: nn.Module) -> dict:
    """{"trainable", "total", "fraction", "groups": {top-level module: trainable count}}."""
    groups: dict[str, int] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            group = name.split(".")[0]
            groups[group] = groups.get(group, 0) + param.numel()
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1), "groups": groups}


def sparse_tuning(
    model: nn.Module,
    reduction: str = "topk",
    bottleneck: int = 64,
    freeze: bool = True,
    **reduction_options,
) -> nn.Module:
    """Turn a timm ViT into a Sparse-Tuning model, in place.

    Args:
        model: a timm VisionTransformer, or one already reduced with :func:`effvision.reduce`
            (then ``reduction`` and ``reduction_options`` must be left at their defaults).
        reduction: token-reduction method ("topk" = EViT top-k + fused token, "ppt", "tome", "none").
        bottleneck: Dense-Adapter width.
        freeze: freeze all but adapters + head (see :func:`freeze_for_peft`).
        **reduction_options: e.g. ``keep_rate=0.7, layers=(3, 6, 9)`` (the paper's setting, topk default).
    """
    if not isinstance(model.blocks, TokenReducingBlocks):
        reduce(model, reduction, **reduction_options)
    elif reduction_options:
        raise ValueError("the model is already reduced: pass no reduction options")
    add_dense_adapters(model, bottleneck)
    if freeze:
        freeze_for_peft(model)
    return model
