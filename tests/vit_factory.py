"""Small timm ViTs of every supported family, random weights (fast on CPU)."""

from __future__ import annotations

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=7)

FAMILIES = {
    "vit": lambda **kw: VisionTransformer(**{**TINY, **kw}),
    "deit_distilled": lambda **kw: VisionTransformerDistilled(**{**TINY, **kw}),
    "deit3_layerscale": lambda **kw: VisionTransformer(**{**TINY, "init_values": 0.1, **kw}),
    "clip_prenorm": lambda **kw: VisionTransformer(**{**TINY, "pre_norm": True, "qkv_bias": True, **kw}),
    "no_class_token": lambda **kw: VisionTransformer(**{**TINY, "class_token": False, "global_pool": "avg", **kw}),
    "register_tokens": lambda **kw: VisionTransformer(**{**TINY, "reg_tokens": 3, **kw}),
    "qk_norm": lambda **kw: VisionTransformer(**{**TINY, "qk_norm": True, **kw}),
}
CLASS_TOKEN_FAMILIES = [name for name in FAMILIES if name != "no_class_token"]


def make_family(name: str, seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = FAMILIES[name](**kwargs)
    # random (not zero) LayerScale / biases so a wrong block path cannot hide behind an identity
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def clone_model(model: VisionTransformer) -> VisionTransformer:
    import copy

    return copy.deepcopy(model)


def deit_small(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    return timm.create_model("deit_small_patch16_224", **kwargs).eval()


def mix_ppt_choices(model, images: torch.Tensor) -> None:
    """Set the threshold of a PPT-reduced ``model`` so that about half of ``images`` pool and half prune at its
    first reduction layer (PPT picks per image), and check that the choices really differ."""
    policy = model.blocks.policy
    variances = []
    original = type(policy).use_pooling
    policy.use_pooling = lambda significance: (
        variances.append(significance.var(dim=-1)) or original(policy, significance)
    )
    with torch.no_grad():
        model(images)
    del policy.use_pooling
    policy.threshold = variances[0].median().item() * 1.0001
    choices = (variances[0] < policy.threshold).tolist()
    assert any(choices) and not all(choices)
