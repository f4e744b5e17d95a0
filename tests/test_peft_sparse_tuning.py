"""Sparse-Tuning: the released adapter structure (default) and the dense reading of the figure."""

import pytest
import timm
import torch

import effvision
from effvision.peft import DenseAdapter, add_clca, freeze_for_peft, sparse_tuning, trainable_parameter_report
from effvision.peft.dense_adapter import OUTPUTS_KEY, DenseAdapters
from effvision.tokens import TokenState, forward_tokens
from effvision.tokens.token_map import TokenMap
from tests.peft_reference import Reduction, sparse_tuning_reference
from tests.vit_factory import CLASS_TOKEN_FAMILIES, make_family

POLICIES = [("topk", dict(keep_rate=0.7, layers=(1, 3))), ("ppt", dict(r=8, layers=(1, 3), threshold=1.0)),
            ("tome", dict(r=6))]
# 12 blocks like ViT-B, so the stages are the release's: blocks 0-2, 3-5, 6-8, 9-11
REFERENCE_POLICIES = [
    ("topk", dict(keep_rate=0.7, layers=(3, 6, 9))),
    ("tome", dict(r=3)),
    ("ppt", dict(r=8, layers=(3, 6, 9), threshold=0.0)),  # every image prunes
    ("ppt", dict(r=8, layers=(3, 6, 9), threshold=1.0)),  # every image pools
]


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, std=0.1, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.dense_adapters.parameters():
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("method,options", REFERENCE_POLICIES, ids=["topk", "tome", "ppt-prune", "ppt-pool"])
def test_released_structure_equals_the_step_by_step_reference(method, options):
    model = sparse_tuning(make_family("vit", depth=12), method, bottleneck=16, inner=8, **options)
    randomize_adapters(model)
    x = images()
    with torch.no_grad():
        expected = sparse_tuning_reference(model, x, Reduction(method, **options))
        got = model(x)
        backbone = effvision.reduce(make_family("vit", depth=12), method, **options)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - backbone).abs().max() > 1e-2  # the adapters really change the logits


def test_released_adapter_parameter_count_and_initialisation():
    model = timm.create_model("sparse_tuning_vit_base_patch16_224")
    adapters = model.dense_adapters.adapters
    assert len(adapters) == 12
    per_adapter = (768 * 64 + 64) + (64 * 32 + 32) + (32 * 64 + 64) + (96 * 64 + 64) + (64 * 768 + 768)
    report = trainable_parameter_report(model)
    assert report["groups"] == {"dense_adapters": 12 * per_adapter, "head": 768 * 1000 + 1000}
    assert report["groups"]["dense_adapters"] == 1_314_432
    weights = torch.cat([linear.weight.flatten() for adapter in adapters for linear in adapter.linears()])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    assert all(linear.bias.abs().sum() == 0 for adapter in adapters for linear in adapter.linears())


def test_released_stages_end_before_each_reduction_block_and_at_the_last_block():
    model = timm.create_model("sparse_tuning_vit_base_patch16_224")
    assert model.dense_adapters.stage_ends == (2, 5, 8, 11)
    tome = sparse_tuning(make_family("vit", depth=12), "tome", r=3)
    assert tome.dense_adapters.stage_ends == (2, 5, 8, 11)


def test_dense_variant_parameter_count_matches_the_formula():
    dim, depth, r = 48, 6, 16
    model = sparse_tuning(make_family("vit"), bottleneck=r, adapter="dense", keep_rate=0.7, layers=(1, 3))
    downs = depth + (depth - 1) + (depth - 3)  # x_N always, a_{N-1} from block 1, a_{N-3} from block 3
    expected = downs * dim * r + depth * r + depth * (r * dim + dim)  # one down bias + up per adapter
    report = trainable_parameter_report(model)
    assert report["groups"]["dense_adapters"] == expected
    assert report["trainable"] == expected + 7 * dim + 7
    assert [a.num_inputs for a in model.dense_adapters.adapters] == [1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("method,options", POLICIES)
def test_dense_variant_is_zero_initialised_and_reproduces_the_reduced_backbone(method, options):
    reference = effvision.reduce(make_family("vit"), method, **options)
    tuned = sparse_tuning(make_family("vit"), method, adapter="dense", **options)
    x = images()
    assert torch.equal(tuned(x), reference(x))


@pytest.mark.parametrize("family", CLASS_TOKEN_FAMILIES)
def test_every_family_runs_both_adapters(family):
    for adapter in ("released", "dense"):
        model = sparse_tuning(make_family(family), adapter=adapter, keep_rate=0.5, layers=(2,))
        assert model(images()).shape == (2, 7)


@pytest.mark.parametrize("adapter", ["released", "dense"])
def test_only_adapters_and_head_receive_gradients(adapter):
    model = sparse_tuning(make_family("vit").train(), adapter=adapter, keep_rate=0.7, layers=(1, 3))
    randomize_adapters(model, std=0.02)
    model(images()).logsumexp(dim=-1).sum().backward()
    for name, param in model.named_parameters():
        trains = name.startswith(("dense_adapters.", "head."))
        assert param.requires_grad == trains, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == trains, name


def test_dense_up_projection_is_zero_and_output_exactly_zero():
    adapter = DenseAdapter(dim=8, bottleneck=4, num_inputs=3)
    out = adapter([torch.randn(2, 5, 8) for _ in range(3)])
    assert torch.equal(out, torch.zeros(2, 5, 8))


def test_dense_earlier_outputs_follow_the_token_map():
    adapters = DenseAdapters(dim=4, depth=4, bottleneck=2)
    earlier = tuple(torch.randn(1, 5, 4) for _ in range(3))
    state = TokenState(x=torch.randn(1, 3, 4), extras={OUTPUTS_KEY: (1, earlier)})
    token_map = TokenMap(torch.tensor([[0, 3, 1]]), torch.tensor([[2]]), torch.tensor([[2]]))
    _, mapped = adapters.after_reduction(3, state, token_map).extras[OUTPUTS_KEY]
    for before, after in zip(earlier, mapped, strict=True):
        torch.testing.assert_close(after, torch.stack([before[0, 0], before[0, 3], before[0, 1] + before[0, 2]])[None])


def test_dense_adapter_inputs_are_the_dense_connections():
    """Block 4's adapter gets x_4, a_3 and a_1 (each through its own down-projection)."""
    model = sparse_tuning(make_family("vit"), adapter="dense", keep_rate=1.0, layers=())
    randomize_adapters(model)
    outputs = []
    for adapter in model.dense_adapters.adapters:
        adapter.register_forward_hook(lambda module, args, out: outputs.append((args[0], out)))
    model(images(batch=1))
    inputs_4, _ = outputs[4]
    assert len(inputs_4) == 3
    assert torch.equal(inputs_4[1], outputs[3][1]) and torch.equal(inputs_4[2], outputs[1][1])


@pytest.mark.parametrize("adapter,params", [("released", 1_314_432), ("dense", 2_172_672)])
def test_vit_base_keep_07_token_schedule_macs_and_parameters(adapter, params):
    model = timm.create_model("sparse_tuning_vit_base_patch16_224", adapter=adapter)
    info = effvision.reduction_info(model)
    assert [info["tokens_after"][block] for block in (2, 3, 6, 9)] == [197, 140, 100, 72]
    assert sorted(set(info["tokens"])) == [72, 100, 140, 197]
    plain = effvision.reduction_info(timm.create_model("vit_base_patch16_224"))["gmacs"]
    assert 0.62 <= info["gmacs"] / plain <= 0.70
    assert trainable_parameter_report(model)["groups"]["dense_adapters"] == params
    with torch.no_grad():
        state = forward_tokens(model.eval(), torch.randn(1, 3, 224, 224))
    assert state.num_tokens == 72


def test_bad_adapter_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown adapter"):
        sparse_tuning(make_family("vit"), adapter="figure")
    with pytest.raises(ValueError, match="released adapter"):
        sparse_tuning(make_family("vit"), adapter="dense", inner=8)
    with pytest.raises(ValueError, match="stage starts"):
        sparse_tuning(make_family("vit"), stage_starts=(0, 3))


@pytest.mark.parametrize("adapter", ["released", "dense"])
def test_freeze_helper_reports_and_can_be_reapplied(adapter):
    model = add_clca(sparse_tuning(make_family("vit"), adapter=adapter, keep_rate=0.7, layers=(1, 3)), carriers=1)
    report = freeze_for_peft(model)
    assert set(report["groups"]) == {"dense_adapters", "head", "clca_cache"}
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("global_pool", "pool_parts"), [("token", set()), ("avg", {"fc_norm"}),
                                                       ("map", {"attn_pool"})])
def test_the_pooling_parts_of_timms_head_train_with_it(global_pool, pool_parts):
    """With global_pool='avg' or 'map' timm builds fc_norm / attn_pool new in front of the classifier; they
    were frozen at their initialisation (a random attention pool). With the class token nothing changes."""
    model = timm.create_model("sparse_tuning_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              embed_dim=48, num_heads=3, num_classes=5, layers=(1, 2), global_pool=global_pool)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dense_adapters", "head"} | pool_parts
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert {"blocks", "patch_embed"} <= frozen and not frozen & pool_parts


@pytest.mark.parametrize("adapter", ["released", "dense"])
def test_sparse_tuning_with_clca_exports(adapter):
    model = timm.create_model("clca_sparse_tuning_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              embed_dim=48, num_heads=3, num_classes=5, layers=(1, 2), carriers=1,
                              adapter=adapter).eval()
    randomize_adapters(model, std=0.05)
    x = images(size=32)
    info = effvision.reduction_info(model)
    assert forward_tokens(model, x).num_tokens == info["tokens_after"][-1]
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
