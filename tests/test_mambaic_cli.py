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
