"""CLCA: cross-layer aggregation head and the cross-layer cache as the released code computes them."""

import pytest
import timm
import torch

import effvision
from effvision.peft import CrossLayerAggregationHead, CrossLayerCache, add_clca
from effvision.peft.clca import CACHE_KEY, POOL_END_KEY
from effvision.tokens import TokenState, count_macs, forward_tokens
from tests.peft_reference import Reduction, clca_reference
from tests.vit_factory import make_family

POLICIES = [("topk", dict(keep_rate=0.7, layers=(1, 3))), ("ppt", dict(r=8, layers=(1, 3))),
            ("tome", dict(r=4))]
# 12 blocks like ViT-B: reductions at 3, 6, 9 and the release's extra re-injection after block 10
REFERENCE_POLICIES = [
    ("topk", dict(keep_rate=0.7, layers=(3, 6, 9))),
    ("tome", dict(r=3)),
    ("ppt", dict(r=8, layers=(3, 6, 9), threshold=0.0)),  # every image prunes
    ("ppt", dict(r=8, layers=(3, 6, 9), threshold=1.0)),  # every image pools
]


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def randomize_head(model, seed=4):
    """Non-trivial BatchNorm statistics and affine parameters, as after training, and larger logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.normal_(1, 0.1, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
        model.head.pointwise.weight.mul_(20.0)  # logits of order 1, so small differences show at 1e-5
    return model


def sharpened_vit(seed=0):
    """A 12-block tiny ViT whose attention is far from uniform (query/key weights scaled up), so tokens
    injected by the cache weigh on the class token."""
    model = make_family("vit", seed=seed, depth=12)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(4.0)
    return model


def reference_case(method, options, **clca):
    model = add_clca(effvision.reduce(sharpened_vit(), method, **options), **clca)
    return randomize_head(model).eval()


@pytest.mark.parametrize("method,options", REFERENCE_POLICIES, ids=["topk", "tome", "ppt-prune", "ppt-pool"])
@pytest.mark.parametrize("carriers", [0, 2], ids=["average", "carriers"])
def test_model_equals_the_step_by_step_reference(method, options, carriers):
    model = reference_case(method, options, carriers=carriers)
    cache = model.clca_cache
    head_layers = (3, 6, 9, 11) if method != "tome" else tuple(range(12))
    assert cache.layers == (3, 6, 9, 10) if method != "tome" else tuple(range(11))
    carrier_params = (cache.carrier_tokens, cache.carrier_pos_embed) if carriers else None
    x = images()
    with torch.no_grad():
        expected, tokens = clca_reference(model, x, Reduction(method, **options), cache.layers, head_layers,
                                          carrier_params)
        got = model(x)
        without_cache = add_clca(effvision.reduce(sharpened_vit(), method, **options), cache=False)
        without_cache.head.load_state_dict(model.head.state_dict())
        plain_head = without_cache.eval()(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain_head).abs().max() > 2e-4  # the cache changes the logits (20x the tolerance)
    assert forward_tokens(model, x).num_tokens == tokens == effvision.reduction_info(model)["tokens_after"][-1]


def test_carriers_pass_the_models_norm_pre_as_released():
    """The release appends its carriers in _pos_embed, before norm_pre: on a pre-norm (CLIP) ViT they were
    appended after it, unnormalised (logits off by 1.2 on a CLIP-B shrunk to width 192)."""
    model = make_family("clip_prenorm", seed=2, depth=6)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(4.0)
    options = dict(keep_rate=0.7, layers=(1, 3))
    model = randomize_head(add_clca(effvision.reduce(model, "topk", **options), carriers=2)).eval()
    cache = model.clca_cache
    with torch.no_grad():
        cache.carrier_tokens.normal_(0, 1.0)  # far from the norm's output scale, so skipping it shows
        expected, _ = clca_reference(model, images(), Reduction("topk", **options), cache.layers, (1, 3, 5),
                                     (cache.carrier_tokens, cache.carrier_pos_embed))
        torch.testing.assert_close(model(images()), expected, atol=1e-5, rtol=1e-5)


def test_carriers_only_cache_equals_the_reference():
    options = dict(keep_rate=0.5, layers=(3, 6, 9))
    model = reference_case("topk", options, carriers=3, average=False)
    cache = model.clca_cache
    assert cache.tokens_per_block() == 3
    assert cache.cached_count(3) == 3 * 3 and cache.cached_count(10) == 1 * 3  # blocks 0-2; block 9
    x = images()
    with torch.no_grad():
        expected, tokens = clca_reference(model, x, Reduction("topk", **options), cache.layers, (3, 6, 9, 11),
                                          (cache.carrier_tokens, cache.carrier_pos_embed), average=False)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    info = effvision.reduction_info(model)
    assert info["tokens"][4] == info["tokens_after"][3] + 3 * 3 and info["tokens_after"][-1] == tokens


def test_vit_base_schedule_is_the_reduction_schedule_plus_injected_tokens():
    model = timm.create_model("clca_topk_vit_base_patch16_224")
    info = effvision.reduction_info(model)
    assert model.clca_cache.layers == (3, 6, 9, 10)
    # appended after blocks 3 (the averages of blocks 0-2: 3 tokens), 6 (3-5: 3), 9 (6-8: 3) and 10 (9: 1);
    # the next reduction keeps ceil(0.7 * (N - 1)) of them and the patches alike, as the release does
    assert [info["tokens_after"][block] for block in (3, 6, 9)] == [140, 1 + 100 + 1, 1 + 73 + 1]
    assert info["tokens"][4] == 143 and info["tokens"][7] == 105 and info["tokens"][10] == 78
    assert info["tokens"][11] == 79 and info["tokens_after"][11] == 79
    carriers = effvision.reduction_info(timm.create_model("clca_topk_vit_base_patch16_224", carriers=2))
    assert carriers["tokens"][0] == 197 + 2 and carriers["tokens"][4] == carriers["tokens_after"][3] + 3 * 3


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


def test_cached_token_is_the_plain_mean_of_the_tokens_before_the_last_injection():
    """The release averages x[:, 1:curr_num_pool]: sizes do not weigh, tokens appended since the last
    injection are left out."""
    cache = CrossLayerCache(dim=3, layers=(2,), depth=4)
    x = torch.randn(1, 6, 3)
    size = torch.tensor([[1.0, 1.0, 7.0, 1.0, 1.0, 1.0]])
    state = TokenState(x=x, size=size, num_prefix=2, extras={CACHE_KEY: (), POOL_END_KEY: 5})
    state = cache.before_block(1, state)
    torch.testing.assert_close(state.extras[CACHE_KEY][0][:, 0], x[0, 2:5].mean(dim=0)[None])
    assert state.num_tokens == 6


def test_cache_is_appended_unprotected_then_cleared_and_the_block_cached_after():
    cache = CrossLayerCache(dim=3, layers=(2,), depth=4)
    cached = (torch.randn(2, 1, 3), torch.randn(2, 1, 3))
    x = torch.randn(2, 4, 3)
    state = TokenState(x=x, num_prefix=1, extras={CACHE_KEY: cached, POOL_END_KEY: 4})
    out = cache.before_block(3, state)  # after block 2, the cache layer
    assert out.num_tokens == 4 + 2 and out.num_prefix == 1 and out.extras[CACHE_KEY] == ()
    assert out.extras[POOL_END_KEY] == 4
    torch.testing.assert_close(out.x[:, :4], x)
    torch.testing.assert_close(out.x[:, 4:], torch.cat(cached, dim=1))
    assert torch.equal(out.size, torch.ones(2, 6))
    # a cache layer before the last one caches its own average after the injection, over the old tokens
    earlier = CrossLayerCache(dim=3, layers=(2, 3), depth=5)
    out = earlier.before_block(3, state)
    assert len(out.extras[CACHE_KEY]) == 1
    torch.testing.assert_close(out.extras[CACHE_KEY][0][:, 0], x[:, 1:].mean(dim=1))
    assert cache.before_block(2, state).num_tokens == 4  # block 1 is no cache layer: nothing appended


def test_carriers_start_from_the_class_token_and_the_last_tokens_are_cached():
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), carriers=2)
    cache = model.clca_cache
    torch.testing.assert_close(cache.carrier_tokens, model.cls_token.expand(1, 2, -1))
    cached = torch.randn(2, 2, 48)
    x = torch.randn(2, 9, 48)
    state = TokenState(x=x, num_prefix=1, extras={CACHE_KEY: (cached,), POOL_END_KEY: 9})
    out = cache.before_block(2, state)  # after block 1: append, then cache block 1's average and last 2 tokens
    average, carriers = out.extras[CACHE_KEY]
    torch.testing.assert_close(average[:, 0], x[:, 1:].mean(dim=1))
    torch.testing.assert_close(carriers, cached)  # the tokens just appended are the last ones now


def test_rope_models_take_appended_tokens_unrotated():
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, num_classes=7)
    model = add_clca(effvision.reduce(model, "topk", keep_rate=0.7), carriers=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 7) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("method,options", POLICIES)
def test_composes_with_every_policy_and_the_schedule_counts_injected_tokens(method, options):
    model = add_clca(effvision.reduce(make_family("vit"), method, **options), carriers=1)
    base = effvision.reduction_info(effvision.reduce(make_family("vit"), method, **options))
    info = effvision.reduction_info(model)
    assert info["tokens_after"][-1] > base["tokens_after"][-1]
    x = images()
    state = forward_tokens(model, x)
    assert state.num_tokens == info["tokens_after"][-1]
    assert model(x).shape == (2, 7)


def test_cache_mac_count_follows_the_longer_schedule():
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), head=False)
    plain = effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3))
    assert count_macs(model)["total"] > count_macs(plain)["total"]
    # cache layers 1, 3 and 4 (recover at last): +1 (block 0), +2 (blocks 1-2), +1 (block 3)
    assert model.clca_cache.layers == (1, 3, 4)
    assert effvision.reduction_info(model)["tokens"] == [65, 65, 48, 48, 37, 38]


def test_recover_last_can_be_turned_off_and_layers_chosen():
    reduced = effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3))
    assert add_clca(reduced, head=False, recover_last=False).clca_cache.layers == (1, 3)
    other = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), head=False,
                     cache_layers=(2,))
    assert effvision.reduction_info(other)["tokens"] == [65, 65, 47, 49, 36, 36]  # +2 (blocks 0-1) after block 2


def test_registered_clca_names_build():
    model = timm.create_model("clca_topk_vit_base_patch16_224", num_classes=10)
    assert model.head.num_layers == 4 and model.clca_cache.layers == (3, 6, 9, 10)
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
    with pytest.raises(ValueError, match="last block"):
        add_clca(effvision.reduce(make_family("vit"), "topk"), cache_layers=(5,))
    with pytest.raises(ValueError, match="caches nothing"):
        add_clca(effvision.reduce(make_family("vit"), "topk"), average=False)


def test_clca_model_with_carriers_exports():
    model = add_clca(effvision.reduce(make_family("vit"), "ppt", r=8, layers=(1, 3)), carriers=2).eval()
    x = images()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_training_on_one_image_is_a_clear_error_and_eval_takes_one_image():
    """BatchNorm (as released) cannot train on one image; its own message named no cause."""
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), carriers=1)
    with pytest.raises(ValueError, match="training needs 2 or more images a batch"):
        model.train()(images(batch=1))
    with pytest.raises(RuntimeError):  # what timm's benchmark.py records per model instead of stopping on
        model.train()(images(batch=1))
    assert model.train()(images(batch=2)).shape == (2, 7)
    with torch.no_grad():
        assert model.eval()(images(batch=1)).shape == (1, 7)


def test_split_batch_norm_takes_the_heads_norms_and_keeps_their_statistics():
    """timm's ``--aug-splits 2 --split-bn`` turns every batch norm into a ``SplitBatchNorm2d``, the head's
    BatchNorm1d included: it failed with "expected 4D input (got 3D input)"."""
    import copy

    from timm.layers import SplitBatchNorm2d, convert_splitbn_model

    model = randomize_head(add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3))))
    split = convert_splitbn_model(copy.deepcopy(model), 2)
    assert isinstance(split.head.norm_in, SplitBatchNorm2d) and isinstance(split.head.norm_mid, SplitBatchNorm2d)
    x = images(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(split.eval()(x), model.eval()(x))
        split.train()(x)  # the first half updates the main statistics, the second the auxiliary ones
        model.train()(x[:2])
        torch.testing.assert_close(split.head.norm_mid.running_mean, model.head.norm_mid.running_mean)
        torch.testing.assert_close(split.head.norm_in.running_var, model.head.norm_in.running_var)


def test_a_global_pool_the_clca_head_cannot_apply_is_refused_when_the_model_is_made():
    """timm's ``--gp avg`` was silently ignored on CLCA models (the head pools the class tokens itself);
    ``reset_classifier(global_pool="avg")`` already refused it."""
    with pytest.raises(ValueError, match="global_pool='avg'"):
        timm.create_model("clca_ppt_vit_tiny_patch16_224", global_pool="avg")
    assert timm.create_model("clca_ppt_vit_tiny_patch16_224", global_pool="token").global_pool == ""
    assert timm.create_model("clca_ppt_vit_tiny_patch16_224", global_pool="avg", clca_head=False).global_pool == "avg"


def test_block_hooks_see_the_released_loops_tokens_and_reach_the_aggregation_head():
    """The release appends cached tokens and collects the class token in its loop, between blocks: a block's
    pre-hook sees the appended tokens, a forward hook's replacement reaches the head, backward hooks fire."""
    model = reference_case("topk", dict(keep_rate=0.7, layers=(3, 6, 9)))
    x = images()
    with torch.no_grad():
        plain = model(x)
    inputs = []
    handle = model.blocks[4].register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape[1]))
    with torch.no_grad():
        model(x)
    handle.remove()
    schedule = effvision.reduction_info(model)["tokens"]
    assert inputs == [schedule[4]]  # after block 3's reduction and the three appended cached tokens
    last = model.blocks[11]
    handle = last.register_forward_hook(lambda module, args, out: out * 0)
    with torch.no_grad():
        zeroed = model(x)
    handle.remove()
    assert not torch.allclose(zeroed, plain)
    gradients = []
    handle = last.register_full_backward_hook(lambda module, grad_in, grad_out: gradients.append(grad_out[0]))
    model(x).sum().backward()
    handle.remove()
    assert len(gradients) == 1 and gradients[0].abs().sum() > 0


def test_stop_early_returns_the_last_run_blocks_tokens_as_timm_does():
    """forward_intermediates(stop_early=True) before the head's last collected block: no head input exists,
    so the final output is the normed tokens after the last run block (timm's ViT semantics), not an error."""
    model = add_clca(effvision.reduce(make_family("vit"), "topk", keep_rate=0.7, layers=(1, 3)), carriers=1).eval()
    x = images()
    with torch.no_grad():
        final, intermediates, states = model.forward_intermediates(x, indices=[1], stop_early=True, output_fmt="NLC",
                                                                   return_token_states=True)
        full, full_intermediates = model.forward_intermediates(x, indices=[1], output_fmt="NLC")
    torch.testing.assert_close(final, model.norm(states[-1].x))
    torch.testing.assert_close(intermediates[0], full_intermediates[0])
    assert full.shape == (2, 3, 48)  # the head's input when every block ran: CLS after blocks 1, 3 and 5
    assert final.shape[0] == 2 and final.shape[1] > 3
