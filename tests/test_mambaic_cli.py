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
