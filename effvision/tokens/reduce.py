"""``effvision.reduce``: turn a timm VisionTransformer into a token-reduced one, in place."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from effvision.tokens.attention import check_attention_module
from effvision.tokens.blocks import NoReduction, TokenReducingBlocks
from effvision.tokens.flops import count_macs, input_tokens, token_schedule
from effvision.tokens.policies import PPTPolicy, ToMePolicy, TopKPolicy, parse_r_schedule
from effvision.tokens.state import TokenState

METHODS = ("ppt", "tome", "topk", "none")


def default_layers(depth: int) -> tuple[int, ...]:
    """Reduction blocks at a quarter, half and three quarters of the depth: (3, 6, 9) for 12 blocks."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def default_tome_r(depth: int) -> int:
    """ToMe's off-the-shelf r: 13 for 12-block models (DeiT-S / ViT-S/B), 8 for 24 blocks."""
    return 13 if depth <= 12 else 8


def _check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"token reduction needs a timm VisionTransformer (ViT, DeiT, DeiT-3, CLIP ViT...), "
            f"got {type(model).__name__}"
        )
    for index, block in enumerate(model.blocks):
        if hasattr(block, "attn"):
            check_attention_module(block.attn)
        else:
            raise ValueError(f"block {index} ({type(block).__name__}) has no self-attention module")


def _check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    layers = tuple(int(layer) for layer in layers)
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise ValueError(f"reduction layers {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    return layers


def _check_size_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on ``patch_embed``: a clear ValueError for wrong input shapes."""
    x = args[0]
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


def make_policy(method: str, model: nn.Module, **options):
    """Build the policy for ``method`` with the paper defaults, overridden by ``options``."""
    depth = len(model.blocks)
    tokens = input_tokens(model)
    prefix = model.num_prefix_tokens
    patches = tokens - prefix
    unknown_options = set(options) - {"r", "layers", "threshold", "keep_rate", "proportional_attention"}
    if unknown_options:
        raise ValueError(f"unknown option(s) {sorted(unknown_options)} for method {method!r}")
    prop = options.get("proportional_attention")
    if method in ("ppt", "topk") and not getattr(model, "has_class_token", model.cls_token is not None):
        raise ValueError(f"method {method!r} scores tokens by CLS attention; this model has no class token")

    if method == "tome":
        if "layers" in options or "threshold" in options or "keep_rate" in options:
            raise ValueError("tome takes r (int, list or (r, inflection)), not layers/threshold/keep_rate")
        schedule = parse_r_schedule(options.get("r", default_tome_r(depth)), depth)
        if max(schedule, default=0) > patches // 2:
            raise ValueError(
                f"r={max(schedule)} too large: bipartite matching removes at most {patches // 2} of the "
                f"{patches} patch tokens per block"
            )
        return ToMePolicy(schedule, proportional_attention=True if prop is None else prop)
    if method == "ppt":
        if "keep_rate" in options:
            raise ValueError("ppt takes r, layers and threshold, not keep_rate")
        r = options.get("r", 50)
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"ppt r must be a non-negative int, got {r!r}")
        if r > patches // 2:
            raise ValueError(
                f"r={r} too large: PPT removes at most (N-1)//2 = {patches // 2} of the {patches} patch tokens"
            )
        threshold = float(options.get("threshold", 7e-5))
        if threshold < 0:
            raise ValueError(f"ppt threshold must be >= 0, got {threshold}")
        layers = _check_layers(options.get("layers", default_layers(depth)), depth)
        return PPTPolicy(r=r, layers=layers, threshold=threshold,
                         proportional_attention=True if prop is None else prop)
    if method == "topk":
        if "r" in options or "threshold" in options:
            raise ValueError("topk takes keep_rate and layers, not r/threshold")
        keep_rate = float(options.get("keep_rate", 0.7))
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"topk keep_rate must be in (0, 1], got {keep_rate}")
        layers = _check_layers(options.get("layers", default_layers(depth)), depth)
        return TopKPolicy(keep_rate=keep_rate, layers=layers,
                          proportional_attention=False if prop is None else prop)
    if method == "none":
        if options:
            raise ValueError(f"method 'none' takes no options, got {sorted(options)}")
        return NoReduction()
    raise ValueError(f"unknown token-reduction method {method!r}; choose one of {', '.join(METHODS)}")


def reduce(model: nn.Module, method: str, *, track_source: bool = False, **options) -> nn.Module:
    """Make ``model`` (a timm VisionTransformer) token-reduced, in place, and return it.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, DeiT-3, CLIP-style ViT).
        method: "ppt", "tome", "topk" or "none".
        track_source: keep a source map (which original patches each token holds); see
            :func:`effvision.tokens.forward_tokens`.
        **options: method options. ppt: ``r=50, layers=(3, 6, 9), threshold=7e-5``; tome:
            ``r=13`` (int, per-block list or ``(r, inflection)``); topk: ``keep_rate=0.7,
            layers=(3, 6, 9)``; all: ``proportional_attention`` (on for ppt/tome, off for topk).

    The parameters and their names are unchanged, so base checkpoints load as before.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {type(method).__name__}")
    _check_vit(model)
    policy = make_policy(method, model, **options)
    blocks = model.blocks
    inner = list(blocks) if isinstance(blocks, nn.Sequential) else list(blocks.children())
    model.blocks = TokenReducingBlocks(inner, policy, model.num_prefix_tokens, track_source)
    if not getattr(model.patch_embed, "_effvision_size_check", False):
        model.patch_embed.register_forward_pre_hook(_check_size_hook)
        model.patch_embed._effvision_size_check = True
    # timm's checkpoint_seq would call the blocks one by one and skip the reduction: checkpoint inside.
    model.grad_checkpointing = False
    model.set_grad_checkpointing = lambda enable=True: setattr(model.blocks, "grad_checkpointing", enable)
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
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    return model.blocks.forward_state(TokenState.start(x, model.blocks.num_prefix, model.blocks.track_source))
