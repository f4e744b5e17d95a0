"""CLCA: cross-layer aggregation head and cross-layer cache on token-reduced timm ViTs."""

import pytest
import timm
import torch

import effvision
from effvision.peft import CrossLayerAggregationHead, CrossLayerCache, add_clca
from effvision.peft.clca import CACHE_KEY
from effvision.tokens import TokenState, count_macs, forward_tokens
from tests.vit_factory import make_family

POLICIES = [("topk", dict(keep_rate=0.7, layers=(1, 3))), ("ppt", dict(r=8, layers=(1, 3))),
            ("tome", dict(r=4))]


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_head_parameter_count_and_shapes_match_the_formula():
    dim, layers, classes = 16, 4, 5
    head = CrossLayerAggregationHead(dim, layers, classes)
    expected = 2 * dim + (2 * dim * layers + 2 * dim) + 4 * dim + (2 * dim * classes + classes)
    assert sum(p.numel() for p in head.parameters()) == expected
    assert head.depthwise.groups == dim and head.depthwise.kernel_size == (layers,)
    assert head(torch.randn(3, layers, dim)).shape == (3, classes)
    assert head.macs() == 2 * dim * layers + 2 * dim * classes


def test_head_takes_cls_after_each_reduction_block_and_the_last():
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), cache=False)
    x = images()
    stacked = model.forward_features(x)
    assert stacked.shape == (2, 3, 48)  # blocks 1, 3 and 5
    state = forward_tokens(model, x)
    torch.testing.assert_close(stacked[:, -1], state.x[:, 0])
    assert isinstance(model.norm, torch.nn.Identity)
    assert model(x).shape == (2, 7)


def test_cache_averages_patch_tokens_by_size():
    cache = CrossLayerCache(dim=3, layers=(2,))
    x = torch.randn(1, 4, 3)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    state = cache.after_block(0, TokenState(x=x, size=size, num_prefix=1))
    expected = (2 * x[:, 1] + x[:, 2] + x[:, 3]) / 4
    torch.testing.assert_close(state.extras[CACHE_KEY][0][:, 0], expected)


def test_cache_reinjects_averages_and_carriers_then_clears():
    cls = torch.randn(1, 1, 3)
    cache = CrossLayerCache(dim=3, layers=(2, 5), carriers=2, cls_token=cls)
    cached = (torch.randn(2, 1, 3), torch.randn(2, 1, 3))
    state = TokenState(x=torch.randn(2, 4, 3), size=torch.ones(2, 4), extras={CACHE_KEY: cached})
    out = cache.after_reduction(2, state, None)
    assert out.num_tokens == 4 + 2 + 2 and out.extras[CACHE_KEY] == ()
    torch.testing.assert_close(out.x[:, 4:6], torch.cat(cached, dim=1))
    torch.testing.assert_close(out.x[:, 6:], cls.expand(2, 2, 3))
    assert torch.equal(out.size[:, 4:], torch.ones(2, 4))
    assert cache.carrier_tokens.shape == (2, 2, 3)
    assert cache.after_reduction(3, state, None) is state


@pytest.mark.parametrize("method,options", POLICIES)
def test_composes_with_every_policy_and_the_schedule_counts_injected_tokens(method, options):
    model = add_clca(effvision.reduce(make_family("vit"), method, **options), carriers=1)
    base = effvision.reduction_info(effvision.reduce(make_family("vit"), method, **options))
    info = effvision.reduction_info(model)
    layers = model.clca_cache.layers
    for index, previous in zip(layers, (0, *layers[:-1]), strict=False):
        assert model.blocks.extensions[0].injected_tokens(index) == index - previous + 1
    assert info["tokens_after"][-1] > base["tokens_after"][-1]
    x = images()
    state = forward_tokens(model, x)
    assert state.num_tokens == info["tokens_after"][-1]
    assert model(x).shape == (2, 7)


def test_cache_mac_count_follows_the_longer_schedule():
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), head=False)
    plain = effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3))
    assert count_macs(model)["total"] > count_macs(plain)["total"]
    assert effvision.reduction_info(model)["tokens"] == [65, 65, 48, 48, 37, 37]  # +1 GAP at 1, +2 at 3


def test_registered_clca_names_build():
    model = timm.create_model("clca_topk_vit_base_patch16_224", num_classes=10)
    assert model.head.num_layers == 4 and model.clca_cache.layers == (3, 6, 9)
    small = timm.create_model("clca_ppt_deit_small_patch16_224", clca_cache=False)
    assert small.head.num_layers == 4 and not hasattr(small, "clca_cache")


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="token-reduced"):
        add_clca(make_family("vit"))
    with pytest.raises(ValueError, match="reduces no tokens"):
        add_clca(effvision.reduce(make_family("vit"), "none"))
    with pytest.raises(ValueError, match="carrier"):
        add_clca(effvision.reduce(make_family("vit"), "topk"), cache=False, carriers=1)
    with pytest.raises(ValueError, match="class token"):
        add_clca(effvision.reduce(make_family("deit_distilled"), "tome", r=4))


def test_clca_model_exports():
    model = add_clca(effvision.reduce(make_family("vit"), "ppt", r=8, layers=(1, 3)), carriers=1).eval()
    x = images()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_cache_can_also_reinject_after_a_block_that_does_not_reduce():
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), head=False,
                     cache_layers=(1, 3, 4))
    assert effvision.reduction_info(model)["tokens_after"] == [65, 48, 48, 37, 38, 38]  # +1 GAP, +2, +1
    assert forward_tokens(model, images()).num_tokens == 38
