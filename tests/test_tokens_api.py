"""Public API: timm registry, bad input, MAC counting, torch.export."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import effvision
from effvision.tokens import count_macs
from tests.vit_factory import clone_model, make_family

ISSUE_NAMES = [
    "ppt_deit_small_patch16_224",
    "ppt_deit_tiny_patch16_224",
    "ppt_deit_base_patch16_224",
    "tome_deit_small_patch16_224",
    "tome_vit_base_patch16_224",
    "topk_deit_small_patch16_224",
]


def test_registered_names_are_listed():
    for name in ISSUE_NAMES:
        assert name in timm.list_models(f"{name.split('_')[0]}_*")


def test_create_model_with_timm_kwargs_and_paper_defaults():
    model = timm.create_model("ppt_deit_tiny_patch16_224", num_classes=10, drop_path_rate=0.1)
    assert model.head.out_features == 10
    policy = model.blocks.policy
    assert (policy.r, policy.layers, policy.threshold) == (50, (3, 6, 9), 7e-5)
    assert timm.create_model("topk_deit_tiny_patch16_224", keep_rate=0.5).blocks.policy.keep_rate == 0.5
    assert timm.create_model("tome_deit_tiny_patch16_224").blocks.policy.r == [13] * 12


def test_pretrained_loads_base_weights_from_a_local_file(tmp_path):
    base = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / "deit_tiny.pth"
    torch.save(base.state_dict(), path)
    model = timm.create_model(
        "ppt_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    for (name, expected), actual in zip(base.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)


def test_any_timm_vit_by_name():
    model = effvision.create_reduced_model("tome", "vit_small_patch16_384", r=8, img_size=96)
    assert effvision.reduction_info(model)["tokens"][:3] == [37, 29, 21]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: effvision.reduce(make_family("vit"), "dynamicvit"), "unknown token-reduction method"),
        (lambda: effvision.create_reduced_model("ppt", "not_a_model"), "unknown timm model"),
        (lambda: timm.create_model("ppt_deit_tiny_patch16_224", r=99), "too large"),
        (lambda: effvision.reduce(make_family("vit"), "tome", r=33), "too large"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4, layers=(2, 6)), "out of range"),
        (lambda: effvision.reduce(make_family("vit"), "topk", keep_rate=1.5), "keep_rate"),
        (lambda: effvision.reduce(make_family("vit"), "topk", keep_rate=float("nan")), "keep_rate"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4, threshold=float("nan")), "threshold must be"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4, threshold=-1.0), "threshold must be"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", keep_rate=0.5), "not keep_rate"),
        # option types are checked, not coerced: int(3.7) was block 3, "36" was blocks 3 and 6, True was r=1
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4, layers=(3.7,)), "list of block indices"),
        (lambda: effvision.reduce(make_family("vit"), "topk", layers="24"), "list of block indices"),
        (lambda: effvision.reduce(make_family("vit"), "topk", layers=3), "list of block indices"),
        (lambda: effvision.reduce(make_family("vit"), "topk", layers=(True,)), "list of block indices"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4.0), "non-negative int"),
        (lambda: effvision.reduce(make_family("vit"), "ppt", r=4, threshold="1e-3"), "threshold must be"),
        (lambda: effvision.reduce(make_family("vit"), "topk", keep_rate="0.5"), "keep_rate"),
        (lambda: effvision.reduce(make_family("vit"), "topk", keep_rate=True), "keep_rate"),
        (lambda: effvision.reduce(make_family("no_class_token"), "ppt"), "no class token"),
        (lambda: effvision.reduce(timm.create_model("resnet18"), "tome"), "VisionTransformer"),
        (lambda: effvision.reduce(torch.nn.Linear(3, 3), "ppt"), "VisionTransformer"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_scalars_are_accepted_as_option_values():
    """Options from a config file or a sweep are often numpy scalars; they are ints and reals as Python's are."""
    import numpy as np

    model = effvision.reduce(make_family("vit"), "ppt", r=np.int64(4), layers=[np.int64(1), 3],
                             threshold=np.float32(1e-4))
    policy = model.blocks.policy
    assert (policy.r, policy.layers, type(policy.r)) == (4, (1, 3), int)
    assert effvision.reduce(make_family("vit"), "topk", layers=np.arange(1, 4)).blocks.policy.layers == (1, 2, 3)
    with pytest.raises(ValueError, match="list of block indices"):
        effvision.reduce(make_family("vit"), "topk", layers=np.array([1.5, 2.0]))


def test_wrong_image_size_is_a_clear_value_error():
    model = effvision.reduce(make_family("vit"), "ppt", r=4)
    with pytest.raises(ValueError, match="expects 64x64 images"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="3-channel images, got 1"):
        model(torch.randn(2, 1, 64, 64))


@pytest.mark.parametrize("method", ["none", "ppt", "tome", "topk"])
def test_analytic_macs_match_traced_matmul_count(method):
    options = {"none": {}, "ppt": dict(r=8, layers=(1, 3)), "tome": dict(r=5), "topk": dict(layers=(2,))}[method]
    model = effvision.reduce(make_family("vit", seed=3), method, **options)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randn(1, 3, 64, 64))
    traced_macs = counter.get_total_flops() / 2
    analytic = count_macs(model)["total"]
    # the trace also counts the policies' small extra products (matching, CLS-attention row)
    assert analytic <= traced_macs <= analytic * 1.05


@pytest.mark.parametrize("method", ["ppt", "tome", "topk"])
def test_torch_export_and_model_still_usable(method):
    options = {"ppt": dict(r=8, layers=(1, 3)), "tome": dict(r=5), "topk": dict(layers=(2,))}[method]
    model = effvision.reduce(make_family("vit", seed=4), method, **options)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        exported = torch.export.export(clone_model(model), (images,))
        torch.testing.assert_close(exported.module()(images), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images), expected)


def test_reducing_a_reduced_model_again_is_refused():
    """A second reduce() replaced the blocks: the first schedule, Sparse-Tuning's adapters (still parameters,
    never run) and CLCA's wiring were silently lost."""
    model = timm.create_model("sparse_tuning_deit_small_patch16_224", depth=4, embed_dim=64, num_heads=2,
                              img_size=64, patch_size=8)
    extensions = model.blocks.extensions
    with pytest.raises(ValueError, match="already token-reduced"):
        effvision.reduce(model, "ppt", r=8, layers=(1, 2))
    assert model.blocks.extensions == extensions and extensions
    tome = effvision.reduce(timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64), "tome", r=4)
    with pytest.raises(ValueError, match=r"already token-reduced \(tome\)"):
        effvision.reduce(tome, "topk", keep_rate=0.5, layers=(1,))
    assert effvision.reduction_info(tome)["tokens"] == [17, 13, 9, 5]


def test_a_block_that_overrides_forward_is_refused():
    """The reduced blocks recompute timm's Block forward from its parts: an override was dropped silently
    (its output differed from the base model's by 0.3 with nothing reduced)."""
    from timm.models.vision_transformer import Block, VisionTransformer

    class ScaledBlock(Block):
        def forward(self, x, **kwargs):
            return 0.5 * super().forward(x, **kwargs)

    class PlainSubclass(Block):
        pass

    with pytest.raises(ValueError, match="overrides forward"):
        effvision.reduce(VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                           block_fn=ScaledBlock), "tome", r=0)
    effvision.reduce(VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                       block_fn=PlainSubclass), "tome", r=2)


def test_a_hybrid_cnn_stem_vit_reduces():
    """The image check took the channel count from the patch projection, which in a hybrid ViT sees the CNN's
    features: every forward failed with "expected 64-channel images"."""
    base = timm.create_model("vit_tiny_r_s16_p8_224", depth=3, embed_dim=64, num_heads=2, img_size=128).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = base(images)
        assert torch.equal(effvision.reduce(clone_model(base), "tome", r=0)(images), expected)
        reduced = effvision.reduce(clone_model(base), "tome", r=6)
        assert reduced(images).shape == expected.shape
    assert effvision.reduction_info(reduced)["tokens"] == [17, 11, 6]
    with pytest.raises(ValueError, match="expected images"):
        reduced(torch.randn(3, 128, 128))
