"""Sparse-Tuning (Liu et al., arXiv 2405.14700): a frozen ViT, token sparsification and Dense Adapters.

Only the adapters and the classifier head train; the sparsification (top-k with a fused token at
blocks 3, 6, 9, keep 0.7 by default; any policy of :mod:`effvision.tokens` works) cuts the tokens
the frozen blocks process, and with them training memory and time.

Two adapter structures (``adapter=``): ``"released"`` (default), the authors' released code
(:mod:`effvision.peft.released_adapter`), which produced the paper's numbers; ``"dense"``, our reading
of the paper's figure (:mod:`effvision.peft.dense_adapter`). See docs/methods.md.
"""

from __future__ import annotations

from torch import nn

from effvision.peft.dense_adapter import DenseAdapters
from effvision.peft.placement import placed_like
from effvision.peft.released_adapter import ReleasedAdapters
from effvision.tokens.blocks import TokenReducingBlocks
from effvision.tokens.reduce import default_layers, reduce

# parameter-name prefixes that train in parameter-efficient fine-tuning: the adapters, CLCA's cache, and timm's
# classifier head as its forward_head runs it. The released code trains the adapters and `head` of a ViT
# pooled by its class token, where `fc_norm` is an identity and there is no `attn_pool`; with
# global_pool="avg" or "map", timm builds those two new for the head, and frozen at their initialisation they
# would leave a random attention pool in front of the classifier.
TRAINABLE_PREFIXES = ("dense_adapters.", "clca_cache.", "head.", "head_dist.", "fc_norm.", "attn_pool.")


ADAPTERS = ("released", "dense")


def add_dense_adapters(
    model: nn.Module,
    bottleneck: int = 64,
    adapter: str = "released",
    inner: int | None = None,
    stage_starts: tuple[int, ...] | None = None,
) -> nn.Module:
    """Add Sparse-Tuning's adapters to a token-reduced ViT, in place, as ``model.dense_adapters``.

    Args:
        model: a model prepared with :func:`effvision.reduce`.
        bottleneck: adapter width (64).
        adapter: ``"released"`` (N(0, 0.02) weights: outputs change at once) or ``"dense"`` (zero
            up-projection: outputs unchanged at initialisation).
        inner: released adapter's inner width (default ``bottleneck // 2``, 32).
        stage_starts: released adapter's stages (default: the policy's reduction layers, else a
            quarter, half and three quarters of the depth: (3, 6, 9) for 12 blocks).
    """
    if not isinstance(model.blocks, TokenReducingBlocks):
        raise ValueError("dense adapters need a model prepared with effvision.reduce(model, method, ...) first")
    if any(isinstance(ext, (DenseAdapters, ReleasedAdapters)) for ext in model.blocks.extensions):
        raise ValueError("this model already has dense adapters")
    depth = len(model.blocks)
    if adapter == "released":
        if stage_starts is None:
            layers = [layer for layer in getattr(model.blocks.policy, "layers", ()) if layer > 0]
            stage_starts = tuple(layers or default_layers(depth))
        inner = max(bottleneck // 2, 1) if inner is None else inner
        model.dense_adapters = placed_like(ReleasedAdapters(model.embed_dim, depth, stage_starts, bottleneck, inner),
                                           model)
    elif adapter == "dense":
        if inner is not None or stage_starts is not None:
            raise ValueError("inner and stage_starts belong to the released adapter, not adapter='dense'")
        model.dense_adapters = placed_like(DenseAdapters(model.embed_dim, depth, bottleneck), model)
    else:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    # first: extensions added later (CLCA) see the stream with the adapters' contributions
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
    adapter: str = "released",
    inner: int | None = None,
    stage_starts: tuple[int, ...] | None = None,
    **reduction_options,
) -> nn.Module:
    """Turn a timm ViT into a Sparse-Tuning model, in place.

    Args:
        model: a timm VisionTransformer, or one already reduced with :func:`effvision.reduce`
            (then ``reduction`` and ``reduction_options`` must be left at their defaults).
        reduction: token-reduction method ("topk" = EViT top-k + fused token, "ppt", "tome", "none").
        bottleneck: adapter width.
        freeze: freeze all but adapters + head (see :func:`freeze_for_peft`).
        adapter, inner, stage_starts: see :func:`add_dense_adapters` (``"released"``: the authors' code).
        **reduction_options: e.g. ``keep_rate=0.7, layers=(3, 6, 9)`` (the paper's setting, topk default).
    """
    if not isinstance(model.blocks, TokenReducingBlocks):
        reduce(model, reduction, **reduction_options)
    elif reduction_options:
        raise ValueError("the model is already reduced: pass no reduction options")
    add_dense_adapters(model, bottleneck, adapter, inner, stage_starts)
    if freeze:
        freeze_for_peft(model)
    return model
