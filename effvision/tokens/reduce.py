"""``effvision.reduce``: turn a timm VisionTransformer into a token-reduced one, in place."""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from effvision.tokens.attention import check_attention_module
from effvision.tokens.blocks import NoReduction, TokenReducingBlocks
from effvision.tokens.flops import count_macs, input_tokens, token_schedule
from effvision.tokens.model import reduced_class, register_fx_leaf
from effvision.tokens.policies import POLICIES, ModelShape, default_layers, make_policy
from effvision.tokens.state import TokenState

METHODS = tuple(POLICIES)
__all__ = ["METHODS", "default_layers", "forward_tokens", "model_shape", "reduce", "reduction_info"]


def _check_vit(model: nn.Module) -> None:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(
            f"token reduction needs a timm VisionTransformer (ViT, DeiT, DeiT-3, CLIP ViT, DINOv2...) or Eva "
            f"(EVA-02, RoPE ViTs), got {type(model).__name__}"
        )
    if isinstance(model, Eva) and (model.patch_drop is not None or model.dynamic_img_size):
        raise ValueError("token reduction of Eva models needs patch_drop_rate=0 and a fixed image size")
    for index, block in enumerate(model.blocks):
        if hasattr(block, "attn"):
            check_attention_module(block.attn)
        else:
            raise ValueError(f"block {index} ({type(block).__name__}) has no self-attention module")


def _check_size_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on ``patch_embed``: a clear ValueError for wrong input shapes."""
    x = args[0]
    if isinstance(x, torch.fx.Proxy):
        return  # torch.fx symbolic tracing: no shapes to check
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    channels = getattr(getattr(module, "proj", None), "in_channels", x.shape[1])
    if x.shape[1] != channels:
        raise ValueError(f"expected {channels}-channel images, got {x.shape[1]} channels")
    expected = tuple(module.img_size)
    if getattr(module, "strict_img_size", True) and not getattr(module, "dynamic_img_size", False):
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"this token-reduced model expects {expected[0]}x{expected[1]} images (its token schedule is "
                f"fixed), got {x.shape[-2]}x{x.shape[-1]}; create it with img_size=... for other sizes"
            )


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
    _check_vit(model)
    register_fx_leaf()
    policy = make_policy(method, model_shape(model), **options)
    blocks = model.blocks
    inner = list(blocks) if isinstance(blocks, nn.Sequential) else list(blocks.children())
    model.blocks = TokenReducingBlocks(inner, policy, model.num_prefix_tokens, track_source)
    if not getattr(model.patch_embed, "_effvision_size_check", False):
        model.patch_embed.register_forward_pre_hook(_check_size_hook)
        model.patch_embed._effvision_size_check = True
    model.__class__ = reduced_class(type(model))
    model.set_grad_checkpointing(bool(getattr(model, "grad_checkpointing", False)))
    return model


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
