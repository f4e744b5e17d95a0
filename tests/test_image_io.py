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
    MAX_PNG_CHUNKS,
    MAX_PPM_HEADER_BYTES,
    check_pixels,
    list_images,
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


@pytest.mark.parametrize(("suffix", "mode"),
                         [(".png", "RGBA"), (".bmp", "RGB"), (".ppm", "RGB"), (".tiff", "RGBA"), (".webp", "RGBA")])
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


def test_an_exif_tag_whose_type_does_not_fit_its_value_does_not_stop_the_orientation():
    """Pillow's exif_transpose re-serialised every tag and failed on this one (it was a clear error then); only
    the orientation tag is read now, so the file opens, turned upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    exif[0x010F] = "camera"  # Make, ASCII
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24)).save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    assert data.count(b"\x01\x0f\x00\x02") == 1
    crafted = data.replace(b"\x01\x0f\x00\x02", b"\x01\x08\x00\x02")  # Make -> CellWidth, a SHORT tag
    assert open_image(crafted, name="photo.jpg").size == (24, 20)
    assert open_image(data).size == (24, 20)  # the intact file is turned upright too


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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_tiff(width: int, height: int, *, rows_per_strip: int | None = None, tile: int | None = None) -> bytes:
    """An uncompressed 8-bit grey little-endian TIFF in strips of ``rows_per_strip`` rows, or square tiles."""
    if tile is None:
        rows = rows_per_strip or height
        segments = -(-height // rows)
        sizes = [width * min(rows, height - i * rows) for i in range(segments)]
        layout = [(278, 4, 1, rows)]
        offsets_tag, counts_tag = 273, 279
    else:
        segments = -(-width // tile) * -(-height // tile)
        sizes = [tile * tile] * segments
        layout = [(322, 4, 1, tile), (323, 4, 1, tile)]
        offsets_tag, counts_tag = 324, 325
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), *layout, (offsets_tag, 4, segments, None), (counts_tag, 4, segments, None)]
    arrays_at = 8 + 2 + 12 * len(entries) + 4  # header, directory, then the two arrays, then the pixels
    offsets = np.cumsum([arrays_at + 8 * segments] + sizes[:-1]).astype("<u4")
    arrays = {offsets_tag: offsets.tobytes(), counts_tag: np.asarray(sizes, "<u4").tobytes()}
    directory, extra = struct.pack("<H", len(entries)), b""
    for tag, kind, count, value in sorted(entries):
        if value is None and count == 1:
            field = arrays[tag]
        elif value is None:
            field = struct.pack("<I", arrays_at + len(extra))
            extra += arrays[tag]
        else:
            field = struct.pack("<H" if kind == 3 else "<I", value).ljust(4, b"\0")
        directory += struct.pack("<HHI", tag, kind, count) + field
    body = bytes(range(256)) * (-(-sum(sizes) // 256))
    arrays_bytes = extra.ljust(8 * segments, b"\0")
    return b"II*\0" + struct.pack("<I", 8) + directory + b"\0" * 4 + arrays_bytes + body[:sum(sizes)]


def test_a_tiff_in_reasonable_strips_or_tiles_reads_as_its_pixels():
    expected = None
    for data in (grey_tiff(64, 48), grey_tiff(64, 48, rows_per_strip=1), grey_tiff(64, 48, tile=16)):
        image = open_image(data)
        assert (image.mode, image.size) == ("L", (64, 48))
        if "tile" not in image.info and expected is None:
            expected = np.asarray(image)
    assert np.array_equal(np.asarray(open_image(grey_tiff(64, 48, rows_per_strip=1))), expected)


@pytest.mark.parametrize(("size", "layout"), [((8, 400000), {"rows_per_strip": 1}), ((128, 64), {"tile": 1})])
def test_a_tiff_of_more_strips_or_tiles_than_its_pixels_need_is_refused_before_pillow_parses_it(size, layout):
    """Pillow builds a Python entry of about 340 bytes for every strip or tile inside ``Image.open``: an 8 MB
    file of an 8 px wide image in 1-row strips took 680 MB, 1x1 tiles of a 2 MP image 1.4 GB and 24 s."""
    with pytest.raises(UserError, match="strips or tiles"):
        open_image(grey_tiff(*size, **layout))


def test_a_png_of_many_tiny_chunks_is_refused_before_pillow_walks_them():
    """Pillow parses chunks one by one in Python, and keeps private ones: 2 million empty chunks (24 MB) took
    6 s and 290 MB."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    assert open_image(data).getpixel((0, 0)) == (10, 20, 30)
    for flooded in (data[:33] + png_chunk(b"prVt", b"") * 6000 + data[33:],  # before the image data
                    data[:-12] + png_chunk(b"tEXt", b"a\0b") * 6000 + data[-12:]):  # after it, before IEND
        with pytest.raises(UserError, match="chunks"):
            open_image(flooded)


def test_an_animated_png_of_many_frames_opens_at_its_first_frame():
    """Pillow stops at the next frame's fcTL, so the later frames' chunks are not walked, nor counted."""
    frames = [Image.new("RGB", (4, 4), (i % 256, 0, 0)) for i in range(3000)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert 2 * data.count(b"fdAT") > MAX_PNG_CHUNKS + len(data) // 2048  # fcTL + fdAT a frame: over the bound
    image = open_image(data)
    assert image.size == (4, 4) and image.getpixel((0, 0)) == (0, 0, 0)


def test_a_netpbm_header_longer_than_any_real_one_is_refused():
    """Pillow reads a Netpbm header byte by byte: a 20 MB comment took 6 s."""
    pixels = bytes(range(12))
    assert open_image(b"P5\n# a comment\n4 3\n255\n" + pixels).size == (4, 3)
    with pytest.raises(UserError, match="Netpbm header"):
        open_image(b"P5\n#" + b"x" * MAX_PPM_HEADER_BYTES + b"\n4 3\n255\n" + pixels)


def test_a_16_bit_netpbm_image_is_scaled_from_its_bit_depth_not_its_values():
    """A dark 16-bit PGM (every value at most 255) was taken as 8-bit and came out bright."""
    values = [0, 10, 100, 255]
    pgm = b"P5\n2 2\n65535\n" + b"".join(v.to_bytes(2, "big") for v in values)
    assert np.asarray(normalize_mode(open_image(pgm))).ravel().tolist() == [0, 0, 0, 1]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(values, np.uint16).reshape(2, 2)).save(buffer, "PNG")  # the same as a PNG
    assert np.asarray(normalize_mode(open_image(buffer.getvalue()))).ravel().tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize(("mode", "colour", "transparent", "stored"),
                         [("L", 90, 90, "LA"), ("RGB", (1, 2, 3), (1, 2, 3), "RGBA"), ("I;16", 3000, 3000, "LA")])
def test_a_png_transparent_colour_becomes_alpha_for_grey_and_rgb_images(mode, colour, transparent, stored):
    """tRNS was kept only for palette images: grey and RGB images came out opaque."""
    image = Image.new(mode, (3, 2), colour)
    image.putpixel((0, 0), 7 if mode != "RGB" else (7, 7, 7))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=transparent)
    opened = normalize_mode(open_image(buffer.getvalue()))
    assert opened.mode == stored
    alpha = np.asarray(opened)[..., -1]
    assert alpha[0, 0] == 255 and (alpha.ravel()[1:] == 0).all()
    assert (to_rgb_array(opened)[0, 1] == 1.0).all()  # see-through pixels composite onto white


def test_avif_files_are_found_in_folders_as_they_are_read(tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "photo.avif")
    assert list_images(tmp_path) == [tmp_path / "photo.avif"]
    assert open_image(tmp_path / "photo.avif").size == (16, 16)


def test_open_image_takes_paths_and_bytes_and_refuses_anything_else():
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, "PNG")
    assert open_image(bytearray(buffer.getvalue())).size == open_image(memoryview(buffer.getvalue())).size == (2, 2)
    with pytest.raises(TypeError, match="path"):
        open_image(np.zeros((2, 2, 3), np.uint8))


def test_an_avif_whose_image_data_cannot_be_decoded_is_a_clear_error():
    """libavif's decoding failures reach Python as RuntimeError, which went past as a traceback (found by
    mutating valid files: 7000 mutants of 14 kinds of file now all end in a UserError or an image)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buffer, "AVIF")
    data = buffer.getvalue()
    payload = data.find(b"mdat") + 4
    with pytest.raises(UserError, match="corrupt or truncated"):
        open_image(data[:payload] + bytes(len(data) - payload))


def _png(width: int, height: int, depth: int, colour_type: int, raw_rows: bytes, extra: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def test_a_16_bit_grey_and_alpha_png_stays_grey():
    """Pillow opens it as RGBA: it was coded in colour and came back tinted (grey 0 as (4, 0, 3))."""
    rows = b"".join(b"\x00" + b"".join(struct.pack(">HH", 257 * (17 * x), 65535 - 4096 * y) for x in range(4))
                    for y in range(3))
    image = open_image(_png(4, 3, 16, 4, rows))
    assert image.mode == "LA"
    assert np.asarray(image)[..., 0].tolist() == [[0, 17, 34, 51]] * 3


def test_what_coding_leaves_out_is_said(tmp_path):
    from PIL import ImageCms

    from effvision.image_io import what_is_not_kept

    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert what_is_not_kept(open_image(tmp_path / "anim.gif")) == ["only the first frame of the animation is coded"]
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    frames[0].save(tmp_path / "lab.png", icc_profile=lab)
    frames[0].save(tmp_path / "srgb.png", icc_profile=srgb)
    assert "colour profile" in what_is_not_kept(open_image(tmp_path / "lab.png"))[0]
    assert what_is_not_kept(open_image(tmp_path / "srgb.png")) == []


def test_one_file_named_twice_is_one_input(tmp_path, monkeypatch):
    from effvision.io_utils import expand_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rgb.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "rgb.png")
    assert expand_inputs(["rgb.png", "./rgb.png", "link.png"], (".png",)) == ["rgb.png"]


def test_a_folder_input_says_its_subfolders_are_not_searched(tmp_path):
    """``encode photos/`` skipped ``photos/sub/*.png`` without a word (``eval-codec --data`` searches them)."""
    from effvision.io_utils import SubfoldersNotSearched, expand_inputs

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "b.png")
    with pytest.warns(SubfoldersNotSearched, match="1 subfolder"):
        assert expand_inputs([str(tmp_path)], (".png",)) == [str(tmp_path / "a.png")]
    pattern = str(tmp_path / "**" / "*.png")
    assert sorted(expand_inputs([pattern], (".png",))) == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]


# ---- structures Pillow parses piece by piece, and transparent colours it reads wrongly (hostile-image audit)


def png_with_exif(orientation: int, rationals: int) -> bytes:
    """A 2x1 RGB PNG whose eXIf block holds the orientation tag and a private array of ``rationals`` rationals."""
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    ifd += struct.pack(">HHII", 50000, 5, rationals, 38) + b"\0" * 4
    exif = b"MM\0*\0\0\0\x08" + ifd + struct.pack(">II", 1, 3) * rationals
    pixels = b"\0" + bytes([10, 20, 30, 200, 210, 220])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0))
            + png_chunk(b"eXIf", exif) + png_chunk(b"IDAT", zlib.compress(pixels)) + png_chunk(b"IEND", b""))


def test_a_large_exif_block_costs_no_more_than_reading_its_orientation():
    """Pillow's exif_transpose re-serialised the whole block to drop the tag: 11 s for these 4 MB (140 s and
    1.6 GB for 40 MB); only the tag is read now."""
    import time

    start = time.perf_counter()
    image = open_image(png_with_exif(6, 500_000))
    assert time.perf_counter() - start < 5
    assert image.size == (1, 2)  # turned: 2x1 stored, shown 1x2
    assert np.asarray(image)[:, 0].tolist() == [[10, 20, 30], [200, 210, 220]]
    assert "exif" not in image.info  # the turned image carries no orientation to apply twice


def test_a_tiff_whose_tags_hold_millions_of_numbers_is_refused_before_pillow_parses_them():
    """A 1x1 TIFF whose XResolution held 5 million rationals took 37 s and 894 MB to open."""
    count = 300_000
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1), (282, 5, count, 16 + 2 + 12 * 10 + 4)]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    data = b"II*\0" + struct.pack("<I", 16) + b"\x80" + b"\0" * 7 + directory + struct.pack("<II", 1, 3) * count
    with pytest.raises(UserError, match="tags hold 300007 numbers"):
        open_image(data)
    assert open_image(grey_tiff(8, 8)).size == (8, 8)


def jpeg_with_comments(count: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]  # empty comment segments before the frame


def test_a_jpeg_of_millions_of_empty_segments_is_refused_before_pillow_walks_them():
    """2.6 million empty comment segments (10 MB) took Pillow 15 s and 225 MB to open."""
    with pytest.raises(UserError, match="marker segments"):
        open_image(jpeg_with_comments(200_000))
    assert open_image(jpeg_with_comments(3000)).size == (16, 16)  # many, but within the bound


def grey_png_with_transparent_level(bits: int, levels: list[int], transparent: int) -> bytes:
    """A 1-row grey PNG of ``bits`` bits per pixel (packed) with a tRNS grey level."""
    row = 0
    for level in levels:
        row = (row << bits) | level
    width_bits = bits * len(levels)
    packed = (row << (-width_bits % 8)).to_bytes(-(-width_bits // 8), "big")
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", len(levels), 1, bits, 0, 0, 0, 0))
            + png_chunk(b"tRNS", struct.pack(">H", transparent)) + png_chunk(b"IDAT", zlib.compress(b"\0" + packed))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("bits", [2, 4])
def test_the_transparent_level_of_a_2_or_4_bit_grey_png_becomes_alpha(bits):
    """Pillow scales such pixels to 0..255 but not their tRNS level: the transparent pixels stayed opaque."""
    top = 2**bits - 1
    image = normalize_mode(open_image(grey_png_with_transparent_level(bits, [0, 1, top, 1], transparent=1)))
    assert image.mode == "LA"
    assert np.asarray(image)[0, :, 1].tolist() == [255, 0, 255, 0]


def test_the_transparent_colour_of_a_16_bit_rgb_png_is_dropped_with_a_note():
    """Pillow decodes 16-bit RGB to 8 bits and compared those with the 16-bit tRNS colour: the pixel 0x64FF
    became transparent and the transparent 0x0064 stayed opaque."""
    from effvision.image_io import what_is_not_kept

    pixels = struct.pack(">6H", 0x64FF, 0x64FF, 0x64FF, 0x0064, 0x0064, 0x0064)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
            + png_chunk(b"tRNS", struct.pack(">3H", 100, 100, 100)) + png_chunk(b"IDAT", zlib.compress(b"\0" + pixels))
            + png_chunk(b"IEND", b""))
    image = open_image(data)
    assert normalize_mode(image).mode == "RGB"
    assert any("transparent colour is not applied" in note for note in what_is_not_kept(image))


def grey_tiff_of_depth(bits: int, packed: bytes, width: int, white_is_zero: bool = False,
                       sample_format: int | None = None, samples: int = 1) -> bytes:
    """A one-row uncompressed grey (or ``samples``-channel) TIFF, little-endian, of ``bits`` bits per sample
    holding ``packed`` bytes; ``sample_format``: 1 unsigned, 2 signed, 3 floating point."""
    count = 9 + (sample_format is not None)
    entries = [(256, 3, 1, width), (257, 3, 1, 1), (258, 3, 1, bits), (259, 3, 1, 1),
               (262, 3, 1, 2 if samples == 3 else 0 if white_is_zero else 1), (273, 4, 1, 8 + 2 + 12 * count + 4),
               (277, 3, 1, samples), (278, 3, 1, 1), (279, 4, 1, len(packed))]
    if sample_format is not None:
        entries.append((339, 3, 1, sample_format))
    directory = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + struct.pack("<H" if kind == 3 else "<I", value).ljust(4, b"\0")
        for tag, kind, count, value in entries) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 8) + directory + packed


def test_a_12_bit_grey_tiff_is_scaled_from_its_own_maximum():
    """Pillow opens it as 16-bit holding 0..4095: white came out as 16 of 255."""
    image = normalize_mode(open_image(grey_tiff_of_depth(12, bytes([0xFF, 0xF0, 0x00]), 2)))
    assert np.asarray(image).tolist() == [[255, 0]]


def test_a_16_bit_white_is_zero_tiff_is_not_inverted():
    """PhotometricInterpretation 0 (white is zero) at 16 bits came out inverted."""
    image = normalize_mode(open_image(grey_tiff_of_depth(16, struct.pack("<2H", 0, 65535), 2, white_is_zero=True)))
    assert np.asarray(image).tolist() == [[255, 0]]


def test_a_signed_8_bit_grey_tiff_reads_minus_128_as_black():
    """Pillow gives the stored bytes: -100 came out as 156 (dark as bright)."""
    image = open_image(grey_tiff_of_depth(8, bytes([0x80, 0x9C, 0x00, 0x7F]), 4, sample_format=2))
    assert np.asarray(normalize_mode(image)).tolist() == [[0, 28, 128, 255]]
    unsigned = open_image(grey_tiff_of_depth(8, bytes([0x80, 0x9C, 0x00, 0x7F]), 4, sample_format=1))
    assert np.asarray(normalize_mode(unsigned)).tolist() == [[128, 156, 0, 127]]


def test_a_signed_16_bit_grey_tiff_reads_its_lowest_level_as_black():
    """Pillow gives the signed values: every negative level came out black and the top level as 127."""
    image = open_image(grey_tiff_of_depth(16, struct.pack("<4h", -32768, -100, 0, 32767), 4, sample_format=2))
    assert np.asarray(normalize_mode(image)).tolist() == [[0, 127, 128, 255]]


def test_a_tiff_of_floating_point_colour_or_a_corrupt_tiff_says_pillow_cannot_read_it():
    data = grey_tiff_of_depth(32, struct.pack("<3f", 0.1, 0.5, 0.9), 1, sample_format=3, samples=3)
    for tiff in (data, b"II*\0" + b"\xff" * 20):
        with pytest.raises(UserError, match="a TIFF Pillow cannot read: corrupt, or in a sample format"):
            open_image(tiff, name="float.tif")
