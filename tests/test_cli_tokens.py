"""The token-reduction side of the CLI: ``effvision demo`` and ``effvision reduce-info``."""

import json

import pytest

from effvision.cli import main


def test_demo_token_part_prints_schedule_gmacs_and_speed(capsys):
    assert main(["demo", "--skip-codecs", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "[197, 197, 197, 197, 147, 147, 147, 97, 97, 97, 49, 49]" in out
    assert "GMACs: DeiT-S 4.60, PPT-DeiT-S 2.94" in out
    assert "img/s" in out


def test_reduce_info_json(capsys):
    assert main(["reduce-info", "topk_deit_tiny_patch16_224", "--keep-rate", "0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "topk"
    assert info["tokens"][4] == 1 + 98 + 1


def test_reduce_info_user_errors_exit_1(capsys):
    assert main(["reduce-info", "no_such_model"]) == 1
    assert main(["reduce-info", "ppt_deit_tiny_patch16_224", "--r", "500"]) == 1
    err = capsys.readouterr().err
    assert "unknown model" in err and "too large" in err
    assert "Traceback" not in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["reduce-info"])
    assert exit_info.value.code == 2


def test_compressai_jit_script_deprecation_is_hidden_but_other_warnings_are_not(monkeypatch):
    import warnings

    from effvision import cli
    from effvision.commands import reduce_info

    def noisy_run(args):
        warnings.warn("`torch.jit.script` is deprecated. Please switch to torch.compile", FutureWarning, stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(reduce_info, "run", noisy_run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["reduce-info", "ppt_deit_small_patch16_224"]) == 0
    assert [str(w.message) for w in caught] == ["something the user should see"]


def test_reduce_info_builds_no_weights_and_reports_what_a_real_model_has(capsys, monkeypatch):
    """The schedule needs only the model's structure: built for real, vit_giant_patch14_dinov2 took 5.2 GB."""
    import timm
    import torch

    import effvision

    real = effvision.reduction_info(timm.create_model("ppt_deit_tiny_patch16_224"))
    devices = []
    create = timm.create_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    assert main(["reduce-info", "ppt_deit_tiny_patch16_224", "--json"]) == 0
    assert devices and set(devices) == {"meta"}
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(real))
