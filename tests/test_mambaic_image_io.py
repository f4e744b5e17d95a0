"""Image loading for training and evaluation: every mode becomes RGB in [0, 1]; bad files are clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effvision.codecs.metrics import ms_ssim, psnr
from effvision.errors import UserError
from effvision.image_io import load_image, save_image, to_uint8


def test_non_image_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        load_image(path)


def test_truncated_image_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_image(path)


def test_grayscale_is_replicated_to_rgb(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 255, (7, 9), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.shape == (3, 7, 9)
    assert torch.equal(image[0], torch.from_numpy(gray.astype(np.float32) / 255))
    assert torch.equal(image[0], image[2])


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red, the transparent rest becomes white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 1, 1].tolist() == [1.0, 1.0, 1.0]


def test_16_bit_grayscale_is_scaled_to_unit_range(tmp_path: Path) -> None:
    data = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "d.png")
    image = load_image(tmp_path / "d.png")
    assert image[:, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert image[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_saved_png_round_trips_8_bit_values(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (3, 5, 6)).float() / 255
    save_image(Image.fromarray(to_uint8(image)), tmp_path / "out.png")
    assert torch.equal(load_image(tmp_path / "out.png"), image)


def test_psnr_of_a_known_error() -> None:
    reference = torch.zeros(1, 3, 8, 8)
    assert math.isclose(psnr(reference, reference + 0.1), 20.0, rel_tol=1e-6)


def test_ms_ssim_of_identical_images_is_one() -> None:
    image = torch.rand(1, 3, 64, 64)
    assert math.isclose(ms_ssim(image, image), 1.0, rel_tol=1e-5)
