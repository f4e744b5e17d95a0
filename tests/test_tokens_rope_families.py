"""DINOv2, EVA-02 and RoPE ViTs (timm's Eva class): zero reduction equals timm, RoPE follows the tokens,
registered names, ONNX export."""

import copy

import pytest
import timm
import torch
from effvision.export import check_onnx, export_onnx

import effvision
from effvision.tokens import forward_tokens

# small versions of each family (random weights): (timm name, kwargs)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, depth=3)),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=3)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=3)),
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(img_size=64, depth=3, embed_dim=96, num_heads=3)),
    "rope": ("vit_small_patch16_rope_224", dict(img_size=64, depth=3, embed_dim=96, num_heads=3)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, depth=3, embed_dim=96, num_heads=3)),
}
ZERO = {"tome": dict(r=0), "ppt": dict(r=0), "topk": dict(keep_rate=1.0)}
REDUCING = {"tome": dict(r=3), "ppt": dict(r=4, layers=(1,)), "topk": dict(keep_rate=0.6, layers=(1,))}


def make(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():  # random biases, LayerScale and q/v biases, so no part can hide behind its init
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def images(family: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[family][1]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", sorted(ZERO))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_reduction_equals_timm_exactly(family, method):
    base = make(family)
    reduced = effvision.reduce(copy.deepcopy(base), method, **ZERO[method])
    x = images(family)
    with torch.no_grad():
        assert torch.equal(reduced(x), base(x))
        expected = base.forward_intermediates(x, indices=2, intermediates_only=True)
        actual = reduced.forward_intermediates(x, indices=2, intermediates_only=True)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("method", sorted(REDUCING))
@pytest.mark.parametrize("family", ["eva02", "rope_mixed"])
def test_each_token_carries_the_position_of_a_patch_it_holds(family, method):
    model = effvision.reduce(make(family), method, track_source=True, **REDUCING[method])
    with torch.no_grad():
        state = forward_tokens(model, images(family))
    prefix = model.num_prefix_tokens
    assert state.num_tokens < model.patch_embed.num_patches + prefix
    held = state.source.gather(2, state.position.unsqueeze(-1)).squeeze(-1)  # source[b, i, position[b, i]]
    assert torch.all(held == 1)
    assert torch.equal(state.position[:, :prefix], torch.arange(prefix).expand(2, -1))


def test_rope_rows_follow_the_representative_of_each_token():
    model = effvision.reduce(make("eva02"), "tome", r=3)
    with torch.no_grad():
        state = model.blocks.forward_state(model.token_state(images("eva02")))
    table = model.rope.get_embed()
    expected = table[state.position[:, 1:] - 1]  # row of the original patch each token carries
    assert torch.equal(state.rope_embedding(2)[:, 0], expected)


def test_mixed_rope_takes_each_blocks_own_table():
    model = effvision.reduce(make("rope_mixed"), "tome", r=3)
    with torch.no_grad():
        state = model.blocks.forward_state(model.token_state(images("rope_mixed")))
    tables = model.rope.get_embed()  # (depth, heads, patches, dim)
    for block in range(3):
        rows = state.rope_embedding(block)  # (B, heads, N - 1, dim)
        for b in range(2):
            assert torch.equal(rows[b], tables[block][:, state.position[b, 1:] - 1])


def test_reduced_families_run_with_fewer_tokens_and_count_macs():
    for family in ("dinov2_reg4", "eva02_clip", "rope"):
        model = effvision.reduce(make(family), "tome", r=3)
        info = effvision.reduction_info(model)
        assert info["tokens"][-1] < info["tokens"][0] and info["macs_ratio"] < 1
        with torch.no_grad():
            assert torch.isfinite(model(images(family))).all()


@pytest.mark.parametrize(
    "name",
    ["ppt_vit_small_patch14_dinov2", "tome_vit_small_patch14_reg4_dinov2", "topk_eva02_tiny_patch14_224",
     "ppt_vit_small_patch16_rope_224", "tome_vit_small_patch16_rope_mixed_224"],
)
def test_registered_names_build_reduced_models(name):
    assert name in timm.list_models(name.split("_")[0] + "_*")
    model = timm.create_model(name, depth=2, img_size=56 if "patch14" in name else 64)
    assert type(model).__name__.startswith("TokenReduced")
    assert len(set(effvision.reduction_info(model)["tokens"])) > 1


def test_dinov2_defaults_scale_with_the_patch_count():
    model = timm.create_model("ppt_vit_small_patch14_dinov2", depth=12)  # 518 px: 37 x 37 = 1369 patches
    assert model.blocks.policy.r == round(50 * 1369 / 196)
    tokens = effvision.reduction_info(model)["tokens"]
    assert [tokens[i] for i in (0, 4, 7, 10)] == [1370, 1021, 672, 337]  # the last step is capped at (672 - 1) // 2


# mixed RoPE with a reduction does not export with the TorchScript exporter yet (a transpose of unknown rank)
@pytest.mark.parametrize(("family", "method"), [("eva02", "ppt"), ("rope", "tome"), ("eva02_clip", "topk")])
def test_onnx_export_matches(tmp_path, family, method):
    model = effvision.reduce(make(family), method, **REDUCING[method])
    size = FAMILIES[family][1]["img_size"]
    path = export_onnx(model, tmp_path / "model.onnx", (1, 3, size, size))
    result = check_onnx(model, path, [images(family, 1), images(family, 3)])
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
