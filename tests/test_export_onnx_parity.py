"""ONNX export + onnxruntime parity: every registered token-reduced family, batch 1 and 5, fp32."""

import onnx
import pytest
import timm
import torch
from effvision.export import OrtModel, check_onnx, export_onnx

import effvision
from effvision.timm_models import register
from tests.vit_factory import mix_ppt_choices

ATOL = 1e-4
# 7x7 patches and 4 blocks (reduction at blocks 1, 2, 3) keep the tests fast; r is scaled to 49 patches
# (the defaults are for 196); other families use their defaults.
IMG_SIZE = 112
DEPTH = 4
OPTIONS_AT_112 = {"ppt": {"r": 8}, "tome": {"r": 3}}
BASE = "_deit_tiny_patch16_224"
# Every registered family: ppt, tome, topk, sparse_tuning and clca_<each of them>.
FAMILIES = sorted({name.removesuffix(BASE) for name in register() if name.endswith(BASE)})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight and BatchNorm statistic, so zero-initialised branches (adapter
    up-projections) and identity-like normalisations take part in the comparison."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def reduced_deit_tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    options = OPTIONS_AT_112.get(family.removeprefix("clca_"), {})
    model = timm.create_model(f"{family}{BASE}", img_size=IMG_SIZE, depth=DEPTH, **options)
    return randomize(model).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """method -> (model, path of its TorchScript-exported ONNX file), exported once per module."""
    cache = {}

    def get(method: str):
        if method not in cache:
            model = reduced_deit_tiny(method)
            path = export_onnx(model, tmp_path_factory.mktemp(method) / "model.onnx", (1, 3, IMG_SIZE, IMG_SIZE))
            cache[method] = model, path
        return cache[method]

    return get


def batches(*sizes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, IMG_SIZE, IMG_SIZE, generator=generator) for size in sizes]


def test_every_family_is_covered():
    assert {"ppt", "tome", "topk", "sparse_tuning", "clca_ppt"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_model_matches_onnxruntime_at_batch_1_and_5(family, exported):
    model, path = exported(family)
    assert len(set(effvision.reduction_info(model)["tokens"])) > 1  # tokens really are removed
    result = check_onnx(model, path, batches(1, 5))
    assert [b["batch"] for b in result["batches"]] == [1, 5]
    assert result["max_abs_diff"] <= ATOL and result["top1_agreement"] == 1.0


def test_ppt_batch_mixing_pooled_and_pruned_images_matches(tmp_path):
    """PPT picks prune or pool per image; the export must keep that choice data-dependent."""
    model = reduced_deit_tiny("ppt")
    images = batches(6)[0]
    mix_ppt_choices(model, images)  # half the images pool at the first layer
    export_onnx(model, tmp_path / "ppt.onnx", (1, 3, IMG_SIZE, IMG_SIZE))
    assert check_onnx(model, tmp_path / "ppt.onnx", [images])["max_abs_diff"] <= ATOL


def test_dynamo_exporter_matches_for_ppt(tmp_path):
    model = reduced_deit_tiny("ppt")
    export_onnx(model, tmp_path / "ppt.onnx", (1, 3, IMG_SIZE, IMG_SIZE), exporter="dynamo")
    assert check_onnx(model, tmp_path / "ppt.onnx", batches(1, 5))["max_abs_diff"] <= ATOL


def test_exported_batch_axis_is_symbolic(exported):
    graph = onnx.load(str(exported("tome")[1])).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_ort_model_runs_the_exported_file(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG_SIZE, depth=2).eval()
    export_onnx(model, tmp_path / "deit.onnx", (1, 3, IMG_SIZE, IMG_SIZE))
    images = batches(3)[0]
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(OrtModel(tmp_path / "deit.onnx")(images), expected, atol=ATOL)


def test_existing_file_is_kept_without_overwrite(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        export_onnx(torch.nn.Identity(), tmp_path / "model.onnx", (1, 3, 8, 8), overwrite=False)
    assert (tmp_path / "model.onnx").read_bytes() == b"keep"


def test_export_restores_training_mode(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout()).train()
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 8, 8))
    assert model.training


def test_dynamo_export_is_one_self_contained_file(tmp_path):
    """The dynamo exporter put the weights in "<temporary name>.data" beside the file: the move into place left
    that hidden file behind, and the model moved elsewhere alone lost its weights."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG_SIZE, depth=2).eval()
    export_onnx(model, tmp_path / "deit.onnx", (1, 3, IMG_SIZE, IMG_SIZE), exporter="dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit.onnx"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "deit.onnx").rename(elsewhere / "deit.onnx")
    assert check_onnx(model, elsewhere / "deit.onnx", batches(2))["max_abs_diff"] <= ATOL


def test_dynamo_keeps_the_batch_axis_dynamic_for_a_codec_transform(tmp_path):
    """torch.export specialises an axis it sees at size 1: MambaIC's hyper-analysis exported from a batch-1
    example took batch 1 only, silently (onnxruntime: "Got: 5 Expected: 1")."""
    from effvision.codecs.base import load_codec

    hyper_analysis = load_codec("mambaic", quality=1).model.h_a
    export_onnx(hyper_analysis, tmp_path / "h_a.onnx", (1, 50, 4, 4), exporter="dynamo")
    assert onnx.load(str(tmp_path / "h_a.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert check_onnx(hyper_analysis, tmp_path / "h_a.onnx", torch.randn(5, 50, 4, 4))["max_abs_diff"] <= ATOL


def test_export_and_check_leave_the_model_as_it_was(tmp_path):
    """Restoring the root's mode reset every sub-module's flag to it (a frozen-BN patch embed came back in
    training mode); a bfloat16 model could not take the float32 example at all."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=1).train()
    model.patch_embed.eval()
    model = model.to(torch.bfloat16)
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    result = check_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert result["max_abs_diff"] <= ATOL and result["finite"]
    assert model.training and not model.patch_embed.training and model.blocks[0].training
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_model_without_one_tensor_out_and_a_folder_as_onnx_file_are_clear_errors(tmp_path):
    class Pair(torch.nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": x}

    with pytest.raises(TypeError, match="one tensor out; this one returns dict"):
        export_onnx(Pair(), tmp_path / "pair.onnx", (1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OrtModel(tmp_path)
