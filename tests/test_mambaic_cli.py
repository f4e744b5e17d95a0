"""``effvision train-codec``: end to end on tiny data, clear errors on bad input (eval-codec: test_eval_codec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effvision.cli import main

torch.set_num_threads(1)


def test_train_codec_on_a_folder_without_images_fails_cleanly(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train-codec", "--data", str(tmp_path / "empty"), "--steps", "1"]) == 1
    assert "no image files" in capsys.readouterr().err


def test_train_codec_refuses_a_final_learning_rate_above_the_start(tmp_path: Path, capsys) -> None:
    import numpy as np
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    arguments = ["train-codec", "--data", str(tmp_path / "data"), "--steps", "1", "--lr", "1e-4", "--final-lr", "1e-3"]
    assert main(arguments) == 1
    assert "--final-lr must be between 0 and --lr" in capsys.readouterr().err


def test_train_codec_minutes_stops_with_a_model_and_a_state_to_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    import numpy as np
    from PIL import Image

    from effvision.training import TimeLimit

    (tmp_path / "data").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    monkeypatch.setattr(TimeLimit, "expired", lambda self: self.seconds is not None)  # out of time at once
    arguments = ["train-codec", "--data", str(tmp_path / "data"), "--steps", "50", "--crop", "32", "--batch-size",
                 "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--minutes", "5"]
    assert main(arguments) == 0
    assert "stopped by --minutes at step 1 of 50" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert main([*arguments[:-2], "--minutes", "-1"]) == 1
    assert "--minutes must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--lambda", "nan"], "--lambda must be a finite number > 0, got nan"),  # was: NaN loss, then ValueError
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--crop", "1000000"], "--crop must be between 1 and 8192"),  # was: a 12 TB allocation
    (["--batch-size", "4096", "--crop", "8192"], "at most a quarter of this machine's memory"),
    (["--save-every", "0"], "--save-every must be at least 1"),  # was: ZeroDivisionError at step 1
    # the input batch is 0.75 GiB, but a training step on it would need hundreds (was: an allocator error)
    (["--batch-size", "1", "--crop", "8192"], "a training step on 1 crops of 8192 px would take"),
])
def test_train_codec_options_no_training_can_run_are_clear_errors(tmp_path: Path, capsys, option, message) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")  # checked before any image is read
    assert main(["train-codec", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *option]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_images_are_held_to_a_memory_budget(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from effvision.errors import UserError
    from effvision.training import load_image_folder

    for index in range(3):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / f"{index}.png")
    assert [tuple(image.shape) for image in load_image_folder(tmp_path)] == [(3, 40, 50)] * 3
    assert load_image_folder(tmp_path, uint8=True)[0].shape == (40, 50, 3)
    assert load_image_folder(tmp_path, budget_bytes=3 * 40 * 50 * 3 * 4)  # exactly fits
    with pytest.raises(UserError, match="after 3 of 3"):
        load_image_folder(tmp_path, budget_bytes=3 * 40 * 50 * 3 * 4 - 1)
    with pytest.raises(UserError, match="no image of at least 41x41"):
        load_image_folder(tmp_path, minimum_side=41)


def _one_image_folder(folder: Path, side: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)).save(folder / "a.png")
    return folder


def test_a_run_in_the_output_folder_is_continued_or_replaced_only_when_asked(tmp_path: Path, capsys) -> None:
    """Without --resume a new run overwrote train_state.pt and model.safetensors of the run already there."""
    data = _one_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"last week's model")
    base = ["train-codec", "--data", str(data), "--steps", "1", "--crop", "32", "--batch-size", "1", "--device", "cpu"]
    assert main([*base, "--out", str(run)]) == 1
    assert "already holds a run (model.safetensors): pass --resume" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == b"last week's model"
    (tmp_path / "a-file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "a-file")]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main([*base, "--out", str(run), "--force"]) == 0
    assert (run / "model.safetensors").read_bytes() != b"last week's model"


def test_validation_images_too_large_to_validate_whole_are_refused_before_training(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """Validation runs whole images after the first steps: an 8000x8000 PNG failed there, losing the run."""
    from effvision import bounded_config

    monkeypatch.setattr(bounded_config, "physical_memory_bytes", lambda: 2**30)  # a 1 GiB machine
    data = _one_image_folder(tmp_path / "data")
    val = _one_image_folder(tmp_path / "val", side=1024)
    arguments = ["train-codec", "--data", str(data), "--val-data", str(val), "--steps", "1", "--crop", "32",
                 "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(arguments) == 1
    assert "validating a whole 1024x1024 image" in capsys.readouterr().err


def test_validation_keeps_no_autograd_graph() -> None:
    from effvision.codecs.mambaic import MambaIC
    from effvision.codecs.mambaic.train import validate

    model = MambaIC("lite")
    seen = []
    model.g_s.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    metrics = validate(model, [torch.rand(3, 64, 64)], 0.013, "mse", "cpu")
    assert seen == [False] and set(metrics) == {"loss", "bpp", "psnr"}


def test_decoding_with_other_weights_says_which_weights_decode_it(tmp_path: Path, capsys) -> None:
    """The message said "pass the checkpoint it was encoded with" also when the file was written with the shipped
    weights, where the remedy is to pass no --checkpoint at all."""
    import numpy as np
    from PIL import Image

    assets = Path(__file__).resolve().parents[1] / "effvision" / "assets"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["encode", str(tmp_path / "a.png"), "--quality", "1"]) == 0
    capsys.readouterr()
    argv = ["decode", str(tmp_path / "a.evc"), "-o", str(tmp_path / "b.png"), "--checkpoint",
            str(assets / "mambaic-lite-q2.safetensors")]
    assert main(argv) == 1
    assert "no --checkpoint for shipped or --pretrained weights" in capsys.readouterr().err
    assert main(argv[:4]) == 0


def test_train_codec_resume_checks_its_run_and_force_starts_over(tmp_path: Path, capsys) -> None:
    """--resume with changed settings was taken (--lr ignored, the model labelled with the new --lambda); --resume
    with nothing to resume started from scratch; --force left the old state for a later --resume to continue; an
    unwritable --out failed only at the first checkpoint."""
    import numpy as np
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    run = tmp_path / "run"
    arguments = ["train-codec", "--data", str(tmp_path / "data"), "--crop", "32", "--batch-size", "1",
                 "--device", "cpu", "--config", "lite", "--out", str(run)]
    assert main([*arguments, "--resume", "--steps", "1"]) == 1
    assert "there is no" in capsys.readouterr().err and not run.exists()
    assert main([*arguments, "--steps", "1"]) == 0
    assert main([*arguments, "--steps", "2", "--resume", "--lambda", "0.5", "--lr", "1e-3"]) == 1
    error = capsys.readouterr().err
    assert "--lambda 0.013 -> 0.5" in error and "--lr 0.0001 -> 0.001" in error
    assert main([*arguments, "--steps", "2", "--resume"]) == 0  # more steps: the same run, continued
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == 2
    assert main([*arguments, "--steps", "2", "--resume", "--force"]) == 1
    (run / "model.safetensors").unlink()
    (run / "stale").mkdir()
    assert main([*arguments, "--steps", "5", "--force", "--minutes", "1e-9"]) == 0  # stopped after its first step
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == 1  # not the old run's step 2
    if Path("/proc/self").is_dir():  # a folder nobody can create, not even root
        capsys.readouterr()
        assert main([*arguments[:-1], "/proc/effvision-test-run", "--steps", "1"]) == 1
        assert "cannot write /proc/effvision-test-run" in capsys.readouterr().err


def test_train_codec_says_when_images_are_smaller_than_the_crop(tmp_path: Path, capsys) -> None:
    """Their crops are edge-padded; that went without a word (train-vqgan refuses such images)."""
    import numpy as np
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.fromarray(np.zeros((48, 80, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    arguments = ["train-codec", "--data", str(tmp_path / "data"), "--steps", "1", "--crop", "64", "--batch-size",
                 "1", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(arguments) == 0
    assert "1 of 1 training images are smaller than --crop 64" in capsys.readouterr().out
