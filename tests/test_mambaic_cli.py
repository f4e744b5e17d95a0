"""``effvision eval-codec`` / ``train-codec``: end to end on tiny data, clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effvision.cli import main
from effvision.codecs.mambaic import MambaIC
from effvision.codecs.mambaic.checkpoint import save_checkpoint
from tests.codec_factory import tiny_mambaic_config

torch.set_num_threads(1)

TINY = tiny_mambaic_config()


def _image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def test_eval_codec_reports_learned_jpeg_and_webp_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MambaIC(TINY)
    model.update()
    save_checkpoint(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "rows.json"
    assert main(["eval-codec", "--data", str(_image_dir(tmp_path)), "--checkpoint",
                 str(tmp_path / "tiny.safetensors"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["codec"] for row in rows] == ["tiny", "jpeg@tiny", "webp@tiny"]
    assert all(row["bpp"] > 0 for row in rows)


def test_eval_codec_with_wrong_config_checkpoint_fails_cleanly(tmp_path: Path, capsys) -> None:
    save_checkpoint(MambaIC(TINY), tmp_path / "tiny.safetensors")
    code = main(["eval-codec", "--data", str(_image_dir(tmp_path)), "--checkpoint",
                 str(tmp_path / "tiny.safetensors"), "--config", "lite"])
    assert code == 1
    assert "transform_channels: 16 != 48" in capsys.readouterr().err


def test_train_codec_on_a_folder_without_images_fails_cleanly(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train-codec", "--data", str(tmp_path / "empty"), "--steps", "1"]) == 1
    assert "no image files" in capsys.readouterr().err
