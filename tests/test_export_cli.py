"""`effvision export`: timm names and codec transforms, with --check numbers."""

import pytest
import torch

from effvision import cli
from effvision.codecs.base import register_codec, unregister_codec


@pytest.fixture(autouse=True)
def export_command_only(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"export": "export"})


def test_timm_model_export_prints_the_check_numbers(tmp_path, capsys):
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "deit.onnx"), "--img-size", "32", "--check"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "top-1 agreement 1.000" in out
    assert (tmp_path / "deit.onnx").stat().st_size > 0


def test_codec_transform_exports_with_dynamic_height_and_width(tmp_path, capsys):
    from effvision.codecs.adapters import CompressAIImageCodec
    from tests.codec_factory import image_size_factorized_prior

    torch.manual_seed(0)
    codec = CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16")
    register_codec("factorized-test", lambda **_: codec)
    try:
        argv = ["export", "factorized-test:g_s", str(tmp_path / "g_s.onnx"), "--img-size", "32", "--check"]
        assert cli.main(argv) == 0
    finally:
        unregister_codec("factorized-test")
    out = capsys.readouterr().out
    assert "(2, 24, 4, 6)" in out  # checked at twice the traced latent height and three times its width
    assert "top-1" not in out


def test_existing_output_needs_force(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"keep")
    assert cli.main(["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx")]) == 1
    assert (tmp_path / "m.onnx").read_bytes() == b"keep" and "--force" in capsys.readouterr().err


def test_unknown_model_is_a_user_error(tmp_path, capsys):
    assert cli.main(["export", "no_such_model", str(tmp_path / "m.onnx")]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_unknown_codec_transform_lists_the_choices(tmp_path, capsys):
    from effvision.codecs.adapters import CompressAIImageCodec
    from tests.codec_factory import image_size_factorized_prior

    codec = CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16")
    register_codec("factorized-test", lambda **_: codec)
    try:
        assert cli.main(["export", "factorized-test:nope", str(tmp_path / "m.onnx")]) == 1
    finally:
        unregister_codec("factorized-test")
    assert "g_a" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [(["--img-size", "0"], "--img-size must be between"),
                                             (["--img-size", "-3"], "--img-size must be between"),
                                             (["--opset", "99"], "--opset must be"),
                                             (["--opset", "13", "--exporter", "dynamo"], "writes opset 18 or later"),
                                             (["--atol", "nan"], "--atol must be a finite number"),
                                             (["--atol", "-1"], "--atol must be a finite number")])
def test_bad_sizes_and_opsets_are_user_errors_before_any_work(tmp_path, capsys, option, message):
    assert cli.main(["export", "vit_tiny_patch16_224", str(tmp_path / "m.onnx"), *option]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_an_image_size_that_would_take_hours_is_refused_before_building(tmp_path, capsys):
    """--img-size 8192 at patch 16 is 262144 tokens: tracing it ran for hours; it is now refused up front, as in
    finetune. A codec transform is not exported larger than the tile the codec itself runs on."""
    from effvision.codecs.adapters import CompressAIImageCodec
    from tests.codec_factory import image_size_factorized_prior

    assert cli.main(["export", "vit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "8192"]) == 1
    assert "262144 tokens per image; at most 16384" in capsys.readouterr().err
    codec = CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16", tile_size=64)
    register_codec("factorized-test", lambda **_: codec)
    try:
        assert cli.main(["export", "factorized-test:g_s", str(tmp_path / "g.onnx"), "--img-size", "128"]) == 1
    finally:
        unregister_codec("factorized-test")
    assert "larger than factorized-test's tile size (64 px)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_nan_the_other_side_lacks_is_an_infinite_difference_never_a_pass():
    from effvision.export.onnx import max_abs_difference

    expected = torch.tensor([[1.0, float("nan"), float("inf")]])
    assert max_abs_difference(expected.clone(), expected) == 0  # NaN and inf in both at the same place
    assert max_abs_difference(torch.tensor([[1.5, float("nan"), float("inf")]]), expected) == 0.5
    assert max_abs_difference(torch.tensor([[float("nan"), float("nan"), float("inf")]]), expected) == float("inf")
    assert max_abs_difference(torch.tensor([[1.0, 2.0, float("inf")]]), expected) == float("inf")
    assert max_abs_difference(torch.tensor([[1.0, float("nan"), float("-inf")]]), expected) == float("inf")


def test_an_onnx_output_with_nan_fails_the_check(tmp_path, monkeypatch, capsys):
    """Before, ``max(0.0, nan)`` kept 0.0: a graph that produced NaN reported "max abs diff 0" and passed."""
    import effvision.export.ort as ort

    class NaNSession:
        def __init__(self, path, providers=None):
            pass

        def __call__(self, batch):
            return torch.full((batch.shape[0], 1000), float("nan"))

    monkeypatch.setattr(ort, "OrtModel", NaNSession)
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "deit.onnx"), "--img-size", "32", "--check"]
    assert cli.main(argv) == 1
    assert "onnxruntime output differs by inf" in capsys.readouterr().err


def test_a_model_whose_outputs_are_nan_fails_the_check(tmp_path, capsys):
    """NaN on both sides counts as agreement, so a NaN model reported "max abs diff 0, top-1 agreement 1.000".
    (Finite but huge weights: a checkpoint of NaN weights is refused before the export.)"""
    import timm

    weights = {key: torch.full_like(value, 1e30) if value.is_floating_point() else value
               for key, value in timm.create_model("deit_tiny_patch16_224", img_size=32).state_dict().items()}
    torch.save(weights, tmp_path / "nan.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "deit.onnx"), "--img-size", "32", "--check",
            "--checkpoint", str(tmp_path / "nan.pth")]
    assert cli.main(argv) == 1
    assert "gives NaN or infinite outputs" in capsys.readouterr().err
    # the file that failed its check is not left behind, nor does it replace a good one with --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]
    (tmp_path / "deit.onnx").write_bytes(b"a good export")
    assert cli.main([*argv, "--force"]) == 1
    assert (tmp_path / "deit.onnx").read_bytes() == b"a good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit.onnx", "nan.pth"]


def test_a_directory_as_output_and_a_checkpoint_that_does_not_fit_are_clear_errors(tmp_path, capsys):
    assert cli.main(["export", "deit_tiny_patch16_224", str(tmp_path), "--force", "--img-size", "32"]) == 1
    assert "is a directory" in capsys.readouterr().err  # before: "cannot write", after the whole export
    torch.save({"pos_embed": torch.zeros(1, 5, 3)}, tmp_path / "small.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", "--checkpoint",
            str(tmp_path / "small.pth")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err  # before: only "Error(s) in loading state_dict for VisionTransformer:"
    assert "Missing key(s) in state_dict" in err and "size mismatch for pos_embed" in err


def test_a_checkpoint_of_integer_weights_is_refused(tmp_path, capsys):
    """An int64 copy of the weights was cast into the model: the ONNX file held truncated weights and the check,
    against the same model, passed."""
    import timm

    state = {key: value.to(torch.int64) for key, value in timm.create_model("deit_tiny_patch16_224",
                                                                            img_size=32).state_dict().items()}
    torch.save(state, tmp_path / "int.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", "--checkpoint",
            str(tmp_path / "int.pth")]
    assert cli.main(argv) == 1
    assert "is torch.int64; the model's is torch.float32" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_the_dynamo_exporter_below_its_opset_is_refused_by_the_library_too(tmp_path):
    from effvision.export.onnx import export_onnx

    with pytest.raises(ValueError, match="opset 18 or later"):
        export_onnx(torch.nn.Linear(3, 2), tmp_path / "m.onnx", (1, 3), opset=13, exporter="dynamo")
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    """An ONNX file of NaN weights was written without a word."""
    import timm

    state = timm.create_model("deit_tiny_patch16_224", img_size=32).state_dict()
    state["head.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", "--checkpoint",
            str(tmp_path / "nan.pth")]
    assert cli.main(argv) == 1
    assert "'head.weight' holds NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_pretrained_without_network_names_the_weights_and_what_to_do(monkeypatch, tmp_path, capsys):
    """Offline, ``export --pretrained`` printed a bare LocalEntryNotFoundError."""
    import timm.models._hub as timm_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")

    monkeypatch.setattr(timm_hub, "hf_hub_download", offline)
    assert cli.main(["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--pretrained"]) == 1
    err = capsys.readouterr().err
    assert "could not get the pretrained weights of deit_tiny_patch16_224" in err
    assert "timm/deit_tiny_patch16_224.fb_in1k" in err and "--checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("option, message", [
    (["--opset", "7"], "at opset 7 (torchscript exporter): ONNX export failed on expand"),
    (["--img-size", "7"], "with input (batch, 3, 7, 7) at opset 18"),
])
def test_an_export_torch_cannot_make_is_one_clear_line(tmp_path, capfd, option, message):
    """An operator the opset lacks, or an input smaller than the patch: one line saying so, not a bare torch
    error after the exporter's whole IR graph (hundreds of lines, printed on stdout)."""
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", *option]
    assert cli.main(argv) == 1
    captured = capfd.readouterr()
    assert message in captured.err and "cannot export deit_tiny_patch16_224" in captured.err
    assert "graph(" not in captured.out + captured.err and len((captured.out + captured.err).splitlines()) <= 3
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_export_removes_the_temporary_files(tmp_path, monkeypatch, capsys):
    """``kill``/``timeout`` (SIGTERM) ended the process at once and left two hidden temporary files; it now
    unwinds like Ctrl-C: nothing left behind, exit status 143."""
    import os
    import signal

    import effvision.export.onnx as onnx_module

    def export_then_terminated(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half an onnx file")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(onnx_module, "export_onnx", export_then_terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert cli.main(["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32"]) == 143
    assert list(tmp_path.iterdir()) == [] and "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the CLI's only while it runs


@pytest.mark.parametrize("argv, message", [
    (["vit_tiny_patch16_224", "-"], "export writes an ONNX file"),
    (["vit_tiny_patch16_224", "m.onnx", "--quality", "3"], "--quality picks a codec's shipped weights"),
    (["mambaic:g_a", "m.onnx", "--quality", "3", "--checkpoint", "w.safetensors"], "one of --quality, --checkpoint"),
    (["mambaic:g_a", "m.onnx", "--quality", "3", "--pretrained"], "one of --quality, --checkpoint"),
])
def test_options_that_would_be_silently_ignored_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", *argv]) == 1
    assert message in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_transform_the_exporter_cannot_make_dynamic_falls_back_to_a_fixed_size(tmp_path, monkeypatch, capsys):
    """The fixed-size fallback ran only when the dynamic export succeeded and then failed at another size; an
    exporter's refusal of the dynamic shapes (torch 2.14's dynamo on MambaIC's h_a) ended the run with the first
    line of its colour-coded report. The refusal is staged here, as the dynamo exporter words it."""
    import effvision.export.onnx as onnx_module

    real_export = onnx_module.export_onnx

    def refuse_dynamic(model, path, shape, **options):
        if options.get("dynamic_hw"):
            try:
                raise ValueError("Attempting to permute a tensor of rank 5, but received a permutation of length 4!")
            except ValueError as cause:
                raise RuntimeError("\x1b[96mFailed to export the model with torch.export.\x1b[0m This is step "
                                   "1/3 of exporting the model to ONNX.\n## Exception summary") from cause
        return real_export(model, path, shape, **options)

    monkeypatch.setattr(onnx_module, "export_onnx", refuse_dynamic)
    argv = ["export", "mambaic:h_a", str(tmp_path / "h_a.onnx"), "--check"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "does not export with a dynamic height/width; fixed at (4, 4)" in err and "\x1b[" not in err
    assert "ValueError: Attempting to permute a tensor of rank 5" in err and "step 1/3" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h_a.onnx"]


def test_a_checkpoint_fine_tuned_to_other_classes_exports_with_num_classes(tmp_path, capsys):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "three.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", "--checkpoint",
            str(tmp_path / "three.pth")]
    assert cli.main(argv) == 1
    assert "pass --num-classes" in capsys.readouterr().err
    assert cli.main([*argv, "--num-classes", "3", "--check"]) == 0
    assert "top-1 agreement 1.000" in capsys.readouterr().out
    assert cli.main([*argv, "--num-classes", "-1", "--force"]) == 1
    assert "--num-classes must be between 0" in capsys.readouterr().err


def test_a_fine_tuning_run_folder_exports_its_trained_model(tmp_path, monkeypatch, capsys):
    """A run keeps only its trained weights: export rebuilds its model from its config and base weights."""
    import onnxruntime

    from effvision.finetune import checkpoint, loop
    from tests.test_finetune_cli import finetune_args, write_dataset

    data = write_dataset(tmp_path / "data", per_class=(4, 2))
    run = tmp_path / "run"
    monkeypatch.setitem(cli.COMMANDS, "finetune", "finetune")
    assert cli.main(finetune_args(data, run, epochs=1)) == 0  # a tiny Sparse-Tuning ViT, 32 px, 3 classes
    assert cli.main(["export", str(run), str(tmp_path / "run.onnx"), "--check"]) == 0
    assert "top-1 agreement 1.000" in capsys.readouterr().out
    model = loop.create_model(loop.read_run_config(run / checkpoint.CONFIG))
    checkpoint.load_weights(model, run / checkpoint.WEIGHTS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "run.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (2, 3) and abs(got - expected).max() < 1e-4
    assert cli.main(["export", str(run), str(tmp_path / "x.onnx"), "--num-classes", "5"]) == 1
    assert "is a fine-tuning run" in capsys.readouterr().err


def test_a_folder_that_is_no_run_is_named_as_such(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), str(tmp_path / "m.onnx")]) == 1
    assert "is a folder but not a fine-tuning run" in capsys.readouterr().err


def test_a_folder_named_like_a_timm_model_does_not_hide_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deit_tiny_patch16_224").mkdir()  # not a run: no config.json
    assert cli.main(["export", "deit_tiny_patch16_224", "m.onnx", "--img-size", "32"]) == 0
    (tmp_path / "deit_tiny_patch16_224" / "config.json").write_text("{}")  # now it looks like a run too
    assert cli.main(["export", "deit_tiny_patch16_224", "n.onnx", "--img-size", "32"]) == 1
    assert "both a timm model name and a fine-tuning run folder" in capsys.readouterr().err


def test_the_num_classes_hint_is_given_only_when_the_head_does_not_fit(tmp_path, capsys):
    import timm

    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=48).state_dict(), tmp_path / "48.pth")
    argv = ["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--img-size", "32", "--checkpoint",
            str(tmp_path / "48.pth")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "size mismatch for pos_embed" in err and "--num-classes" not in err
