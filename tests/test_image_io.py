"""effvision.image_io: one set of rules for reading and writing images."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from effvision.errors import UserError
from effvision.image_io import (
    MAX_PIXELS,
    check_pixels,
    normalize_mode,
    open_image,
    save_image,
    to_rgb_array,
)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_above_the_pixel_limit_is_refused_from_its_header():
    with pytest.raises(UserError, match=f"big.png: image of 8193x8192 pixels exceeds the {MAX_PIXELS}-pixel limit"):
        open_image(png_header_only(8193, 8192), name="big.png")


def test_a_smaller_limit_can_be_asked_for():
    with pytest.raises(UserError, match="exceeds the 100-pixel limit"):
        open_image(png_header_only(11, 10), max_pixels=100)


def test_check_pixels_accepts_the_limit_and_refuses_one_more_and_empty_images():
    check_pixels(8192, 8192)
    with pytest.raises(UserError, match="exceeds"):
        check_pixels(8192, 8193)
    with pytest.raises(UserError, match="empty"):
        check_pixels(0, 5)


def test_missing_file_and_non_image_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere.png: no such file"):
        open_image(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match="not an image"):
        open_image(b"hello")


def test_exif_orientation_is_applied():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # show rotated 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    image = open_image(buffer.getvalue())
    assert image.size == (2, 3)
    assert np.array_equal(np.asarray(image), np.rot90(pixels, k=-1))


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", [0, 257, 65535], [0, 1, 255]),  # 16-bit: scaled from 0..65535, whatever the maximum
        ("I", [0, 128, 255], [0, 128, 255]),  # 32-bit holding 8-bit values
        ("I", [0, 32896, 65535], [0, 128, 255]),  # 32-bit holding 16-bit values
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # float in unit range
        ("F", [0.0, 257.0, 65535.0], [0, 1, 255]),  # float above 255: taken as 16-bit
        ("F", [-1.0, float("nan"), 255.0], [0, 0, 255]),
    ],
)
def test_high_bit_depth_grayscale_is_scaled_to_8_bits(mode, values, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    normalized = normalize_mode(image)
    assert normalized.mode == "L" and np.asarray(normalized)[0].tolist() == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("RGB", "RGB"), ("L", "L"), ("RGBA", "RGBA"), ("LA", "LA"), ("1", "L"), ("P", "RGB"), ("CMYK", "RGB"),
     ("YCbCr", "RGB"), ("La", "LA"), ("RGBa", "RGBA"), ("PA", "RGBA")],
)
def test_every_mode_becomes_one_of_the_four_stored_modes(mode, expected):
    assert normalize_mode(Image.new(mode, (3, 2))).mode == expected


def test_a_palette_image_with_a_transparent_colour_keeps_its_alpha():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    assert np.asarray(normalize_mode(image)).tolist() == [[[255, 0, 0, 255], [0, 0, 255, 0]]]


def test_rgb_array_composites_alpha_on_white_and_replicates_gray():
    image = Image.fromarray(np.array([[[0, 0], [100, 0]]], dtype=np.uint8), "LA")
    array = to_rgb_array(image)
    assert array.shape == (1, 2, 3) and array.dtype == np.float32
    assert array.tolist() == [[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    opaque = to_rgb_array(Image.fromarray(np.array([[[100, 255]]], dtype=np.uint8), "LA"))
    assert opaque[0, 0].tolist() == [np.float32(100) / np.float32(255)] * 3


@pytest.mark.parametrize(("suffix", "mode"), [(".png", "RGBA"), (".bmp", "RGB"), (".ppm", "RGB"), (".tiff", "RGBA")])
def test_save_image_writes_the_suffix_format_dropping_alpha_where_it_has_none(tmp_path, suffix, mode):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    save_image(Image.fromarray(pixels, "RGBA"), tmp_path / f"out{suffix}")
    saved = Image.open(tmp_path / f"out{suffix}")
    assert saved.mode == mode and np.array_equal(np.asarray(saved), pixels[..., : len(mode)])
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_save_image_refuses_unknown_formats_and_keeps_existing_files(tmp_path):
    with pytest.raises(UserError, match="unsupported output format"):
        save_image(Image.new("RGB", (1, 1)), tmp_path / "out.jpg")
    (tmp_path / "out.png").write_bytes(b"keep")
    with pytest.raises(UserError, match="exists"):
        save_image(Image.new("RGB", (1, 1)), tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes() == b"keep"


def progressive_jpeg_with_repeated_scans(repeats: int, side: int = 64) -> bytes:
    """A valid progressive JPEG whose last scan (a refinement pass) is repeated ``repeats`` more times."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    position, scans = 2, []
    while data[position + 1] != 0xD9:  # walk the marker segments up to EOI
        marker = data[position + 1]
        end = position + 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not FF00 or RSTn
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            scans.append((position, end))
        position = end
    start, stop = scans[-1]
    return data[:stop] + data[start:stop] * repeats + data[stop:]


def test_a_jpeg_with_more_scans_than_any_encoder_writes_is_refused_before_decoding():
    """Each scan is a pass over the image: 1000 repeats of a 95-byte scan took 37 s at 64 MP."""
    from effvision.image_io import MAX_JPEG_SCANS

    normal = progressive_jpeg_with_repeated_scans(0)
    assert open_image(normal).size == (64, 64)
    crafted = progressive_jpeg_with_repeated_scans(MAX_JPEG_SCANS)
    with Image.open(io.BytesIO(crafted)) as image:
        image.load()  # Pillow itself decodes it: the file is valid, only its scan count is hostile
    with pytest.raises(UserError, match=f"scans \\(at most {MAX_JPEG_SCANS}"):
        open_image(crafted)


def test_formats_outside_the_read_list_are_refused_before_pillow_decodes_them():
    """An ICO entry may hold a PNG that Pillow decodes inside Image.open (1 GB for a 420 kB file); EPS would
    run Ghostscript."""
    entry = png_header_only(4, 4)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(entry), 22) + entry
    with pytest.raises(UserError, match="not one of the formats read"):
        open_image(ico)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TGA")
    with pytest.raises(UserError, match="not one of the formats read"):
        open_image(buffer.getvalue())


def test_an_exif_tag_whose_type_does_not_fit_its_value_is_a_clear_error():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    exif[0x010F] = "camera"  # Make, ASCII
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24)).save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    assert data.count(b"\x01\x0f\x00\x02") == 1
    crafted = data.replace(b"\x01\x0f\x00\x02", b"\x01\x08\x00\x02")  # Make -> CellWidth, a SHORT tag
    with pytest.raises(UserError, match="photo.jpg: corrupt EXIF"):
        open_image(crafted, name="photo.jpg")
    assert open_image(data).size == (24, 20)  # the intact file is turned upright


@pytest.mark.parametrize("progressive", [False, True])
def test_a_huffman_jpeg_too_short_for_its_declared_size_is_refused(progressive):
    """A 16x16 JPEG whose frame header says 8000x8000 decoded to 64 MP of grey (libjpeg fills what is missing).
    A complete Huffman-coded JPEG holds at least a bit per 8x8 luma block: the smallest files Pillow writes
    (one grey, quality 1, optimised tables) are well above that bound."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (100, 150, 200)).save(buffer, "JPEG", progressive=progressive)
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    crafted = data[:frame + 5] + struct.pack(">HH", 8000, 8000) + data[frame + 9:]
    with pytest.raises(UserError, match="truncated JPEG: it declares 8000x8000 pixels"):
        open_image(crafted)
    for mode in ("L", "RGB"):
        smallest = io.BytesIO()
        Image.new(mode, (1024, 1024), 128).save(smallest, "JPEG", quality=1, optimize=True, progressive=progressive)
        assert open_image(smallest.getvalue()).size == (1024, 1024)
