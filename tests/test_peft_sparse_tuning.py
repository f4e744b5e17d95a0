"""Sparse-Tuning: Dense Adapters on token-reduced timm ViTs."""

import pytest
import timm
import torch

import effvision
from effvision.peft import DenseAdapter, add_clca, freeze_for_peft, sparse_tuning, trainable_parameter_report
from effvision.peft.dense_adapter import OUTPUTS_KEY, DenseAdapters
from effvision.tokens import TokenState, forward_tokens
from effvision.tokens.token_map import TokenMap
from tests.vit_factory import CLASS_TOKEN_FAMILIES, make_family

POLICIES = [("topk", dict(keep_rate=0.7, layers=(1, 3))), ("ppt", dict(r=8, layers=(1, 3), threshold=1.0)),
            ("tome", dict(r=6))]


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,options", POLICIES)
def test_zero_initialised_adapters_reproduce_the_reduced_backbone(method, options):
    reference = effvision.reduce(make_family("vit"), method, **options)
    tuned = sparse_tuning(make_family("vit"), method, **options)
    x = images()
    assert torch.equal(tuned(x), reference(x))


@pytest.mark.parametrize("family", CLASS_TOKEN_FAMILIES)
def test_every_family_is_unchanged_at_initialisation(family):
    reference = effvision.reduce(make_family(family), "topk", keep_rate=0.5, layers=(2,))
    tuned = sparse_tuning(make_family(family), keep_rate=0.5, layers=(2,))
    x = images()
    assert torch.equal(tuned(x), reference(x))


def test_only_adapters_and_head_receive_gradients():
    model = sparse_tuning(make_family("vit").train(), keep_rate=0.7, layers=(1, 3))
    with torch.no_grad():  # non-zero up-projections so gradients reach every down-projection
        for adapter in model.dense_adapters.adapters:
            adapter.up.weight.normal_(0, 0.02)
    model(images()).logsumexp(dim=-1).sum().backward()
    for name, param in model.named_parameters():
        trains = name.startswith(("dense_adapters.", "head."))
        assert param.requires_grad == trains, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == trains, name


def test_adapter_parameter_count_matches_the_formula():
    dim, depth, r = 48, 6, 16
    model = sparse_tuning(make_family("vit"), bottleneck=r, keep_rate=0.7, layers=(1, 3))
    downs = depth + (depth - 1) + (depth - 3)  # x_N always, a_{N-1} from block 1, a_{N-3} from block 3
    expected = downs * dim * r + depth * r + depth * (r * dim + dim)  # one down bias + up per adapter
    report = trainable_parameter_report(model)
    assert report["groups"]["dense_adapters"] == expected
    assert report["trainable"] == expected + 7 * dim + 7
    assert [a.num_inputs for a in model.dense_adapters.adapters] == [1, 2, 2, 3, 3, 3]


def test_up_projection_is_zero_and_output_exactly_zero():
    adapter = DenseAdapter(dim=8, bottleneck=4, num_inputs=3)
    out = adapter([torch.randn(2, 5, 8) for _ in range(3)])
    assert torch.equal(out, torch.zeros(2, 5, 8))


def test_earlier_outputs_follow_the_token_map():
    adapters = DenseAdapters(dim=4, depth=4, bottleneck=2)
    earlier = tuple(torch.randn(1, 5, 4) for _ in range(3))
    state = TokenState(x=torch.randn(1, 3, 4), extras={OUTPUTS_KEY: earlier})
    token_map = TokenMap(torch.tensor([[0, 3, 1]]), torch.tensor([[2]]), torch.tensor([[2]]))
    mapped = adapters.after_reduction(3, state, token_map).extras[OUTPUTS_KEY]
    for before, after in zip(earlier, mapped, strict=True):
        torch.testing.assert_close(after, torch.stack([before[0, 0], before[0, 3], before[0, 1] + before[0, 2]])[None])


def test_adapter_inputs_are_the_dense_connections():
    """Block 4's adapter gets x_4, a_3 and a_1 (each through its own down-projection)."""
    model = sparse_tuning(make_family("vit"), keep_rate=1.0, layers=())
    with torch.no_grad():
        for param in model.dense_adapters.parameters():
            param.normal_(0, 0.1)
    outputs = []
    for adapter in model.dense_adapters.adapters:
        adapter.register_forward_hook(lambda module, args, out: outputs.append((args[0], out)))
    model(images(batch=1))
    inputs_4, _ = outputs[4]
    assert len(inputs_4) == 3
    assert torch.equal(inputs_4[1], outputs[3][1]) and torch.equal(inputs_4[2], outputs[1][1])


def test_vit_base_keep_07_token_schedule_and_macs():
    model = timm.create_model("sparse_tuning_vit_base_patch16_224")
    info = effvision.reduction_info(model)
    assert info["tokens_after"][2:10:3] == [197, 140, 100]
    assert info["tokens_after"][-1] == 72
    assert sorted(set(info["tokens"])) == [72, 100, 140, 197]
    plain = effvision.reduction_info(timm.create_model("vit_base_patch16_224"))["gmacs"]
    assert 0.62 <= info["gmacs"] / plain <= 0.70
    with torch.no_grad():
        state = forward_tokens(model.eval(), torch.randn(1, 3, 224, 224))
    assert state.num_tokens == 72


def test_freeze_helper_reports_and_can_be_reapplied():
    model = add_clca(sparse_tuning(make_family("vit"), keep_rate=0.7, layers=(1, 3)), carriers=1)
    report = freeze_for_peft(model)
    assert set(report["groups"]) == {"dense_adapters", "head", "clca_cache"}
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sparse_tuning_model_exports():
    model = timm.create_model("clca_sparse_tuning_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                              embed_dim=48, num_heads=3, num_classes=5, layers=(1, 2), carriers=1).eval()
    with torch.no_grad():
        for param in model.dense_adapters.parameters():
            param.normal_(0, 0.05)
    x = images(size=32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
