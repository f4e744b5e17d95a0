"""Zero reduction reproduces timm exactly, for every supported ViT family."""

import pytest
import torch

import effvision
from tests.vit_factory import CLASS_TOKEN_FAMILIES, FAMILIES, clone_model, make_family


def _zero_options(method: str) -> dict:
    return {"ppt": {"r": 0}, "tome": {"r": 0}, "topk": {"keep_rate": 1.0}, "none": {}}[method]


# ppt and topk score tokens by CLS attention, so they apply to class-token models only
CASES = [(family, method) for family in FAMILIES for method in ("tome", "none")] + [
    (family, method) for family in CLASS_TOKEN_FAMILIES for method in ("ppt", "topk")
]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_zero_reduction_matches_unpatched_timm(family, method):
    base = make_family(family, seed=1)
    reduced = effvision.reduce(clone_model(base), method, **_zero_options(method))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, actual = base(x), reduced(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_unfused_attention_path_matches_timm():
    base = make_family("vit", seed=2)
    for block in base.blocks:
        block.attn.fused_attn = False
    reduced = effvision.reduce(clone_model(base), "tome", r=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reduced(x), base(x), atol=1e-5, rtol=0)


def test_state_dict_keys_are_unchanged_by_reduction():
    base = make_family("deit3_layerscale")
    reduced = effvision.reduce(clone_model(base), "ppt", r=4)
    assert list(reduced.state_dict()) == list(base.state_dict())
    reduced.load_state_dict(base.state_dict())
