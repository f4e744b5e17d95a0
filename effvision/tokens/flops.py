"""Analytic multiply-accumulate count of a (token-reduced) timm ViT.

Counts the matrix products, as the papers' GFLOPs figures do (1 MAC = one multiply-add): patch
embedding, qkv / output projections and the two attention products at each block's input token
count, the MLP at its post-reduction token count, and the classifier. Norms, softmax, activations and
the small matching products of the policies are left out (they are < 1% for DeiT-S).
"""

from __future__ import annotations

import math

from torch import nn


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def token_schedule(model: nn.Module, tokens: int | None = None) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) per block of ``model``."""
    if tokens is None:
        tokens = input_tokens(model)
    if hasattr(model.blocks, "token_schedule"):
        return model.blocks.token_schedule(tokens)
    return [(tokens, tokens)] * len(model.blocks)


def input_tokens(model: nn.Module) -> int:
    """Token count entering the first block at the model's default image size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def patch_embed_macs(model: nn.Module) -> int:
    proj = model.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        kernel = math.prod(proj.kernel_size) * proj.in_channels // proj.groups
        return model.patch_embed.num_patches * kernel * proj.out_channels
    return model.patch_embed.num_patches * _linear_macs(proj)


def block_macs(block: nn.Module, tokens_in: int, tokens_out: int) -> int:
    attn = block.attn
    attn_dim = attn.num_heads * attn.head_dim
    # every Linear of the attention: qkv (or q/k/v), output projection, optional gate
    projections = tokens_in * _linear_macs(attn)
    products = 2 * tokens_in * tokens_in * attn_dim
    return projections + products + tokens_out * _linear_macs(block.mlp)


def count_macs(model: nn.Module, schedule: list[tuple[int, int]] | None = None) -> dict:
    """MACs of one image through ``model``: {"total", "patch_embed", "blocks" (list), "head",
    "extensions" (block extensions such as Dense Adapters, at their blocks' MLP token counts)}.

    ``schedule`` overrides the per-block (attention, MLP) token counts; default: the model's own.
    """
    if schedule is None:
        schedule = token_schedule(model)
    blocks = [block_macs(block, n_in, n_out) for block, (n_in, n_out) in zip(model.blocks, schedule, strict=True)]
    # a head with its own count (CLCA's aggregation head) says so through ``macs()``
    if hasattr(model.head, "macs"):
        head = model.head.macs()
    else:
        head = _linear_macs(model.head) if isinstance(model.head, nn.Module) else 0
    head += _linear_macs(getattr(model, "head_dist", None) or nn.Identity())
    extensions = sum(
        extension.macs(schedule)
        for extension in getattr(model.blocks, "extensions", ())
        if hasattr(extension, "macs")
    )
    patch = patch_embed_macs(model)
    return {
        "total": patch + sum(blocks) + head + extensions,
        "patch_embed": patch,
        "blocks": blocks,
        "head": head,
        "extensions": extensions,
    }
