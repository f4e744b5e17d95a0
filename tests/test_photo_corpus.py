"""scripts/make_photo_corpus.py: the photo/artwork decision on synthetic images, crops, licenses (no network)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.scripts_loader import load_script

corpus = load_script("make_photo_corpus")


def _as_jpeg(pixels: np.ndarray, exif: Image.Exif | None = None) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92, exif=exif or Image.Exif())
    return Image.open(io.BytesIO(buffer.getvalue()))


def _flat_artwork(height: int = 600, width: int = 900) -> np.ndarray:
    """Vector-style art: a few flat colour fields cut by hard straight edges."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = (40, 90, 160)
    pixels[x + y < 700] = (230, 120, 60)
    pixels[(x - 600) ** 2 + (y - 200) ** 2 < 120**2] = (250, 240, 200)
    return pixels


def _natural_texture(height: int = 600, width: int = 900, seed: int = 0) -> np.ndarray:
    """1/f (pink) noise in colour plus sensor-like noise: the spectrum of natural photographs."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random((height, width)))
        field = np.real(np.fft.ifft2(amplitude * phase))
        channels.append((field - field.mean()) / field.std())
    pixels = 128 + 40 * np.stack(channels, -1) + rng.normal(0, 3, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def test_lossless_sources_are_renders() -> None:
    buffer = io.BytesIO()
    Image.fromarray(_natural_texture()).save(buffer, format="PNG")
    photo, reason, _ = corpus.classify(Image.open(buffer), "PNG")
    assert not photo and "PNG source" in reason


def test_camera_exif_makes_a_jpeg_a_photograph_even_when_flat() -> None:
    exif = Image.Exif()
    exif[corpus.EXIF_MAKE], exif[corpus.EXIF_MODEL] = "OLYMPUS", "E-M1"
    image = _as_jpeg(_flat_artwork(), exif)
    photo, reason, features = corpus.classify(image, image.format)
    assert photo and "OLYMPUS E-M1" in reason and features["camera"] == "OLYMPUS E-M1"


def test_flat_artwork_without_camera_is_dropped_by_its_flat_fraction() -> None:
    image = _as_jpeg(_flat_artwork())
    photo, reason, features = corpus.classify(image, image.format)
    assert not photo and "flat fraction" in reason
    assert features["flat_fraction"] >= corpus.MAX_FLAT_FRACTION


def test_natural_texture_without_camera_is_kept_by_its_statistics() -> None:
    image = _as_jpeg(_natural_texture())
    photo, reason, features = corpus.classify(image, image.format)
    assert photo and reason.startswith("statistics")
    assert features["flat_fraction"] < corpus.MAX_FLAT_FRACTION
    assert features["gradient_kurtosis"] < corpus.MAX_GRADIENT_KURTOSIS


def test_hard_edges_on_textured_fills_are_dropped_by_the_gradient_kurtosis() -> None:
    # not flat (a little noise everywhere), but the differences are mostly tiny with rare huge edges
    rng = np.random.default_rng(1)
    pixels = _flat_artwork().astype(np.float64)
    pixels[:, ::300] = 0  # thin dark lines: rare, very large differences
    pixels = np.clip(pixels + rng.normal(0, 1.5, pixels.shape), 0, 255).astype(np.uint8)
    stats = corpus.image_statistics(Image.fromarray(pixels))
    assert stats["flat_fraction"] < corpus.MAX_FLAT_FRACTION
    assert stats["gradient_kurtosis"] >= corpus.MAX_GRADIENT_KURTOSIS


def test_the_exclude_list_wins_over_the_statistics() -> None:
    image = _as_jpeg(_natural_texture())
    photo, reason, _ = corpus.classify(image, image.format, excluded="digital painting")
    assert not photo and reason == "exclude list: digital painting"


def test_test_crop_is_768x512_from_the_centre_and_jpeg_sources_go_down_at_least_2x() -> None:
    pixels = _natural_texture(1600, 2560)
    crop = corpus.test_crop(Image.fromarray(pixels), jpeg_source=True)
    assert crop.size == (768, 512)
    assert corpus.can_give_test_crop((2560, 1600), True)
    assert not corpus.can_give_test_crop((1200, 800), True)  # would be only 1.56x down
    assert corpus.can_give_test_crop((1200, 800), False)
    with pytest.raises(ValueError, match="cannot give"):
        corpus.test_crop(Image.fromarray(pixels[:800, :1200]), jpeg_source=True)


def test_training_base_never_goes_below_the_crop_size() -> None:
    small = Image.fromarray(_natural_texture(300, 450))
    assert min(corpus.training_base(small, True, 768, 256).size) == 256  # 2x down would be 150 px
    large = Image.fromarray(_natural_texture(1600, 2560))
    assert corpus.training_base(large, True, 768, 256).size == (1229, 768)


def test_random_crops_are_deterministic_given_the_seed() -> None:
    base = Image.fromarray(_natural_texture(400, 600))
    first = corpus.random_crops(base, 5, 64, 2.0, np.random.default_rng(7))
    again = corpus.random_crops(base, 5, 64, 2.0, np.random.default_rng(7))
    other = corpus.random_crops(base, 5, 64, 2.0, np.random.default_rng(8))
    assert all(c.size == (64, 64) for c in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other, strict=True))


def test_test_photos_are_drawn_by_seed_among_eligible_ones() -> None:
    photos = [corpus.Candidate(f"p/{i}", "p", "1", Path(f"{i}.jpg"), f"{i}.jpg", None, photo=True)
              for i in range(6)]
    eligible = {c.id: c.id != "p/0" for c in photos}
    chosen = corpus.choose_test(photos, eligible, 3, seed=0)
    assert len(chosen) == 3 and "p/0" not in chosen
    assert chosen == corpus.choose_test(photos, eligible, 3, seed=0)
    with pytest.raises(SystemExit, match="only 5 photos"):
        corpus.choose_test(photos, eligible, 6, seed=0)


def test_license_comes_from_the_last_matching_dep5_stanza() -> None:
    text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2014 KDE\nLicense: GPL-2+\n\n"
        "Files: 20.04/Kleiber_by_Lukas_Baubkus.jpg\nCopyright: 2021, Lukas Baubkus\nLicense: CC-BY-SA-3.0\n\n"
        "Files: debian/*\nCopyright: 2020 packager\nLicense: MIT\n"
    )
    assert corpus.copyright_license(text, Path("usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg")) == "CC-BY-SA-3.0"
    assert corpus.copyright_license(text, Path("usr/share/backgrounds/other.jpg")) == "GPL-2+"
    free_form = "Copyright:\n  Jakub\n\n   Licensed under Creative Commons Attribution-ShareAlike 3.0 License.\n"
    assert corpus.copyright_license(free_form, Path("x.webp")) == "Creative Commons Attribution-ShareAlike 3.0 License"
