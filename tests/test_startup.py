"""Start-up: ``import effvision`` and the cheap CLI answers import neither torch nor timm, the codec path
never imports timm, and the timm names are registered whichever of timm and effvision is imported first."""

import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_effvision_is_light_and_importing_timm_afterwards_registers_the_names():
    out = run_python("""
        import sys
        import effvision
        print(sorted(m for m in ("torch", "timm", "numpy") if m in sys.modules))
        import timm
        print(timm.is_model("ppt_deit_small_patch16_224"), timm.is_model("clca_tome_deit_small_patch16_224"))
        print(len(effvision.REGISTERED_MODELS) > 0, callable(effvision.reduce), callable(effvision.reduction_info))
        print(any(type(finder).__name__ == "_RegisterWhenTimmLoads" for finder in sys.meta_path))
    """)
    assert out.splitlines() == ["[]", "True True", "True True True", "False"]


def test_timm_imported_before_effvision_has_the_names():
    out = run_python("""
        import timm
        import effvision
        print(timm.is_model("tome_vit_base_patch16_224"), type(effvision.create_reduced_model).__name__)
    """)
    assert out == "True function"


def test_timm_first_imported_by_effvision_itself_registers_the_names():
    out = run_python("""
        import effvision
        model = effvision.create_reduced_model("tome", "deit_tiny_patch16_224", r=4)
        import timm
        print(timm.is_model("topk_deit_tiny_patch16_224"), type(model.blocks).__name__)
    """)
    assert out == "True TokenReducingBlocks"


def test_help_usage_errors_and_cheap_failures_do_not_import_torch(tmp_path):
    (tmp_path / "bad.evc").write_bytes(b"not a container")
    (tmp_path / "notes.png").write_text("not an image")
    out = run_python(f"""
        import sys
        from effvision import cli

        def exit_code(*argv):
            try:
                return cli.main(list(argv))
            except SystemExit as error:
                return error.code

        tmp = {str(tmp_path)!r}
        print(exit_code("--help"), exit_code("decode"), exit_code("encode", "--bogus", "x.png"),
              exit_code("decode", tmp + "/missing.evc"), exit_code("decode", tmp + "/bad.evc"),
              exit_code("decode", tmp + "/bad.evc", "-o", tmp + "/out.jpg"), exit_code("info", tmp + "/bad.evc"),
              exit_code("encode", tmp + "/missing.png"), exit_code("encode", tmp + "/notes.png"))
        print(sorted(m for m in ("torch", "timm", "compressai", "numpy") if m in sys.modules))
    """)
    assert out.splitlines()[-2:] == ["0 2 2 1 1 1 1 1 1", "[]"]


def test_coding_with_the_shipped_codec_imports_no_timm(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "tiny.png")
    out = run_python(f"""
        import sys
        from effvision import cli
        tiny = {str(tmp_path / "tiny")!r}
        encoded = cli.main(["encode", tiny + ".png", "-o", tiny + ".evc", "--device", "cpu"])
        decoded = cli.main(["decode", tiny + ".evc", "-o", tiny + "-out.png", "--device", "cpu"])
        print(encoded, decoded, "timm" in sys.modules)
    """)
    assert out == "0 0 False"
    assert Image.open(tmp_path / "tiny-out.png").size == (32, 32)


def test_the_codecs_own_drop_path_matches_timms():
    from timm.layers import DropPath as TimmDropPath

    from effvision.codecs.mambaic.vss import DropPath

    x = torch.randn(6, 4, 5, 3)
    for probability in (0.0, 0.25, 1.0):
        ours, theirs = DropPath(probability).train(), TimmDropPath(probability).train()
        torch.manual_seed(0)
        expected = theirs(x)
        torch.manual_seed(0)
        assert torch.equal(ours(x), expected)
        assert torch.equal(ours.eval()(x), x)
