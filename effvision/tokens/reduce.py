"""``effvision.reduce``: turn a timm VisionTransformer into a token-reduced one, in place."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from effvision.tokens.attention import check_attention_module
from effvision.tokens.blocks import NoReduction, TokenReducingBlocks
from effvision.tokens.flops import count_macs, input_tokens, token_schedule
from effvision.tokens.model import check_image_size, reduced_class, register_fx_leaf
from effvision.tokens.policies import POLICIES, ModelShape, default_layers, make_policy
from effvision.tokens.state import TokenState

METHODS = tuple(POLICIES)
__all__ = ["METHODS", "default_layers", "forward_tokens", "model_shape", "reduce", "reduction_info"]


def check_vit_class(model: nn.Module) -> None:
    """A ValueError unless ``model`` is a timm VisionTransformer or Eva (what token reduction works on)."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(
            f"token reduction needs a timm VisionTransformer (ViT, DeiT, DeiT-3, CLIP ViT, DINOv2...) or Eva "
            f"(EVA-02, RoPE ViTs), got {type(model).__name__}"
        )


def _check_vit(model: nn.Module) -> None:
    from timm.models.eva import Eva

    check_vit_class(model)
    if isinstance(model, Eva) and (model.patch_drop is not None or model.dynamic_img_size):
        raise ValueError("token reduction of Eva models needs patch_drop_rate=0 and a fixed image size")
    for index, block in enumerate(model.blocks):
        if hasattr(block, "attn"):
            check_attention_module(block.attn, f"blocks[{index}].attn: ")
        else:
            raise ValueError(f"block {index} ({type(block).__name__}) has no self-attention module")


def _check_size_hook(module: nn.Module, args: tuple) -> None:
    """The forward pre-hook older versions registered on ``patch_embed``: kept so that their pickled models
    load; :func:`reduce` now checks in the model's forward instead (a hook cannot be TorchScript-compiled)."""
    check_image_size(module, args[0])


def _example_shapes(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """Shapes of one image's inputs to the reduced blocks: the (N, C) tokens, and Eva's RoPE table."""
    tokens = (input_tokens(model), model.embed_dim)
    if getattr(model, "rope", None) is None:
        return (tokens,)
    parameter = next(iter(model.parameters()))
    image = torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                        device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        _, rope = model._embed(image)
    return (tokens,) if rope is None else (tokens, tuple(rope.shape))


def model_shape(model: nn.Module) -> ModelShape:
    """Depth, patch count, prefix tokens and class token of a timm ViT (what policy defaults depend on)."""
    return ModelShape(
        depth=len(model.blocks),
        patches=model.patch_embed.num_patches,
        num_prefix=model.num_prefix_tokens,
        has_class_token=getattr(model, "cls_token", None) is not None,
    )


def reduce(model: nn.Module, method: str, *, track_source: bool = False, **options) -> nn.Module:
    """Make ``model`` (a timm VisionTransformer) token-reduced, in place, and return it.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, DeiT-3, CLIP-style ViT, DINOv2)
            or ``Eva`` (EVA-02, ``vit_*_rope_*``: RoPE follows the tokens, see :class:`TokenState`).
        method: "ppt", "tome", "topk" or "none" (see :data:`effvision.tokens.policies.POLICIES`).
        track_source: keep a source map (which original patches each token holds); see
            :func:`effvision.tokens.forward_tokens`.
        **options: method options. ppt: ``r=50, layers=(3, 6, 9), threshold=7e-5``; tome:
            ``r=13`` (int, per-block list or ``(r, inflection)``); topk: ``keep_rate=0.7,
            layers=(3, 6, 9)``; all: ``proportional_attention`` (on for ppt/tome, off for topk). The
            r defaults are the papers' values at 196 patches, scaled to the model's patch count.

    The parameters and their names are unchanged, so base checkpoints load as before. The model's class
    becomes ``TokenReduced<its timm class>`` (:mod:`effvision.tokens.model`), which keeps timm's contract
    (``forward_intermediates``, ``features_only``, block hooks, grad checkpointing, pickling) on the
    reduced tokens.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {type(method).__name__}")
    if isinstance(getattr(model, "blocks", None), TokenReducingBlocks):
        # reducing again replaced the blocks: the first schedule, and adapters / CLCA attached to them, were lost
        done = getattr(model.blocks, "reduction", None)
        raise ValueError(
            f"the model is already token-reduced{f' ({done[0]})' if done else ''}; reduce a plain timm ViT "
            "(methods compose through the registered names, e.g. clca_ppt_*, or sparse_tuning(reduction=...))"
        )
    _check_vit(model)
    register_fx_leaf()
    policy = make_policy(method, model_shape(model), **options)
    blocks = model.blocks
    inner = list(blocks) if isinstance(blocks, nn.Sequential) else list(blocks.children())
    model.blocks = TokenReducingBlocks(inner, policy, model.num_prefix_tokens, track_source)
    model.blocks.reduction = (method, dict(options))  # what set_input_size makes the schedule from again
    model.__class__ = reduced_class(type(model))
    model.blocks.example_shapes = _example_shapes(model)
    model.set_grad_checkpointing(bool(getattr(model, "grad_checkpointing", False)))
    return model


def _recorded_reduction(model: nn.Module) -> tuple[str, dict]:
    reduction = getattr(model.blocks, "reduction", None)
    if reduction is None:
        raise ValueError("this reduced model does not record how it was reduced (saved by an older effvision): "
                         "create it again with img_size=... instead of set_input_size")
    return reduction


def check_schedule_for_size(model: nn.Module, img_size=None, patch_size=None) -> None:
    """Raise the policy's error if the reduction cannot be made for ``set_input_size(img_size, patch_size)``,
    before timm changes anything (so that a refused size leaves the model as it was). The patch count is
    counted as timm's ``PatchEmbed`` counts it: each side floor-divided by the patch side."""
    method, options = _recorded_reduction(model)
    embed = model.patch_embed
    patch = embed.patch_size if patch_size is None else _pair(patch_size)
    size = embed.img_size if img_size is None else _pair(img_size)
    if size is None or patch is None:
        return  # dynamic sizes: timm itself decides, and the forward checks each image
    patches = (size[0] // patch[0]) * (size[1] // patch[1])
    make_policy(method, dataclasses.replace(model_shape(model), patches=patches), **options)


def _pair(value) -> tuple[int, int]:
    from timm.layers import to_2tuple

    return tuple(to_2tuple(value))


def refresh_schedule(model: nn.Module) -> None:
    """Make a reduced model's policy again for its current patch count (after timm's ``set_input_size``),
    from the method and options it was reduced with: defaults scale with the patch count, as with
    ``create_model(img_size=...)``, and given options are checked against it."""
    method, options = _recorded_reduction(model)
    model.blocks.policy = make_policy(method, model_shape(model), **options)
    model.blocks.example_shapes = _example_shapes(model)


def reduction_info(model: nn.Module) -> dict:
    """Token schedule and MACs of a (reduced) ViT at its default image size.

    Returns ``{"method", "tokens" (into each block), "tokens_after" (into each MLP), "gmacs",
    "base_gmacs", "macs_ratio"}``; the base numbers are the same model without reduction.
    """
    tokens = input_tokens(model)
    schedule = token_schedule(model, tokens)
    policy = getattr(model.blocks, "policy", NoReduction())
    macs = count_macs(model, schedule)["total"]
    base = count_macs(model, [(tokens, tokens)] * len(schedule))["total"]
    return {
        "method": policy.name,
        "tokens": [n_in for n_in, _ in schedule],
        "tokens_after": [n_out for _, n_out in schedule],
        "gmacs": macs / 1e9,
        "base_gmacs": base / 1e9,
        "macs_ratio": macs / base,
    }


def forward_tokens(model: nn.Module, images: Tensor) -> TokenState:
    """Run a reduced ViT up to (not including) its final norm and return the full token state:
    features, sizes and, when reduced with ``track_source=True``, the source map (B, N, N0)."""
    if not isinstance(model.blocks, TokenReducingBlocks):
        raise ValueError("forward_tokens needs a model prepared with effvision.reduce(...)")
    return model.blocks.forward_state(model.token_state(images))
