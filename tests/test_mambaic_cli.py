"""``effvision train-codec``: end to end on tiny data, clear errors on bad input (eval-codec: test_eval_codec.py)."""

from __future__ import annotations

from pathlib import Path

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
    assert "--minutes must be positive" in capsys.readouterr().err
