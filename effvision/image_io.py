"""Image files in and out: the one place for suffixes, the pixel limit, mode rules and atomic saving.

Every image effvision reads (``encode``, training, evaluation) goes through :func:`open_image` and
:func:`normalize_mode`; every image it writes goes through :func:`save_image`. The rules:

* **Size.** At most :data:`MAX_PIXELS` pixels (64 Mi, e.g. 8192 x 8192; a 12 MP photo is about a fifth of
  it), checked from the file header before any pixel is decoded, and files of at most
  :data:`MAX_FILE_BYTES`. The decoder's ``--max-pixels`` default is the same limit. Structures Pillow parses
  piece by piece in Python are bounded before it does: JPEG scans and marker segments, PNG chunks, Netpbm
  header length, TIFF strips, tiles and tag values.
* **Orientation.** An EXIF orientation tag is applied to the pixels: ``.evc`` keeps no metadata, and the
  decoded image should look as the original is shown.
* **Modes.** Everything becomes 8 bits per channel in one of RGB, L, RGBA, LA (:data:`STORED_MODES`):
  palette images become RGB, or RGBA when they have a transparent colour; 1-bit becomes L (0 / 255);
  high-bit-depth grayscale is *scaled*, not clipped, to 8 bits: 16-bit (``I;16*``; a 9- to 15-bit TIFF from
  its own maximum, a white-is-zero TIFF turned round) and 16-bit Netpbm
  (which Pillow opens as ``I`` scaled to its maximum value) from 0..65535; other 32-bit integer and float
  (``I``, ``F``) from 0..65535 when any value exceeds 255, else from 0..255, except a float image whose
  values all lie in [0, 1], taken as unit range (negative and non-finite values become 0); CMYK, YCbCr, LAB,
  HSV become RGB; a signed 8- or 16-bit grey TIFF is shifted so that its lowest level is black. A PNG's
  transparent colour (tRNS) of a grey or RGB image becomes an alpha channel (LA, RGBA), as it does for a palette
  image (a 16-bit RGB PNG's cannot be: it is dropped, with a note). TIFFs Pillow has no mode for (signed, 32-bit
  or float colour samples) are a clear error.
* **Alpha.** Codecs code RGB and the container keeps alpha losslessly beside it; training and evaluation
  (:func:`to_rgb_array`; :func:`rgb_image` for fine-tuning's torchvision transforms) composite alpha onto white.

This module needs only Pillow and numpy (numpy and torch are imported inside the functions that use them),
so the command line can reject a bad image, or answer ``--help``, before it imports either.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from effvision.errors import UserError
from effvision.io_utils import STDIO, atomic_write_bytes, read_bytes

#: suffixes of the image files taken from a folder or glob (lower case)
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".avif",
)
#: largest image read or decoded, in pixels: 2**26 (8192 x 8192); as float32 RGB that is 768 MiB
MAX_PIXELS = 1 << 26
#: largest image file read (1 GiB)
MAX_FILE_BYTES = 1 << 30
#: the Pillow formats :func:`open_image` reads (a camera's multi-picture JPEG opens as JPEG). Pillow knows
#: about 40: some decode inside ``Image.open``, before any size check (an ICO entry holding a 12000x12000 PNG
#: took 1 GB), and EPS would run Ghostscript
READ_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF", "AVIF")
#: most scans a JPEG may have. Each scan is a pass over the whole image (about 40 ms at 64 MP here), and a
#: file can repeat one of 95 bytes: 1000 scans took 37 s, so a 10 MB file could stall any command for an hour.
#: Progressive JPEGs of common encoders have about 10.
MAX_JPEG_SCANS = 100
#: most chunks a PNG may have, plus one per 2 KiB of file: Pillow reads chunks one by one in Python (about
#: 3 us each; 2 million empty chunks, 24 MB, took 6 s and, as private chunks, 290 MB). Real encoders write
#: IDAT chunks of 8 KiB or more and a few dozen others.
MAX_PNG_CHUNKS = 4096
#: longest PBM/PGM/PPM/PFM header (comments included): Pillow parses it byte by byte (a 20 MB comment took 6 s)
MAX_PPM_HEADER_BYTES = 1 << 16
#: fewest pixels a TIFF strip or tile may hold on average, beyond one strip per row: Pillow keeps a Python entry
#: of about 340 bytes per strip or tile, built inside ``Image.open`` (an 8 MB file of 1-row strips of an 8 px
#: wide image took 680 MB, a 16 MB file of 1x1 tiles 1.4 GB and 24 s to encode)
MIN_TIFF_SEGMENT_PIXELS = 256
#: the modes :func:`normalize_mode` returns, which the ``.evc`` container stores
STORED_MODES = ("RGB", "L", "RGBA", "LA")
#: output suffix -> Pillow format that :func:`save_image` writes
OUTPUT_FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM"}
_FORMATS_WITHOUT_ALPHA = ("BMP", "PPM")
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_pixels(height: int, width: int, limit: int = MAX_PIXELS) -> None:
    """Raise :class:`UserError` when a ``width`` x ``height`` image exceeds ``limit`` pixels (or is empty)."""
    if height <= 0 or width <= 0:
        raise UserError(f"image of {width}x{height} pixels is empty")
    if height * width > limit:
        raise UserError(f"image of {width}x{height} pixels exceeds the {limit}-pixel limit")


def open_image(source: str | Path | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file, ``"-"`` (stdin) or its bytes; return it decoded and upright, in its own mode.

    The size is checked against ``max_pixels`` from the header, before the pixels are decoded. (Pillow's own
    decompression-bomb limit, a process-wide setting left as it is, still refuses images above twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP; only the first frame of an animation is read.)

    Args:
        source: a path, ``"-"`` for standard input, or the file's bytes.
        name: what error messages call the image (default: the path; ``"image"`` for bytes).
        max_pixels: refuse larger images.

    Raises:
        UserError: missing, larger than :data:`MAX_FILE_BYTES` or ``max_pixels``, not an image, corrupt.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), name or "image"
    elif isinstance(source, str | Path):
        name = name or str(source)
        data = read_bytes(source, MAX_FILE_BYTES)
    else:
        raise TypeError(f"open_image takes a path, '-' or bytes, not {type(source).__name__}")
    try:
        _check_container_structure(data)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data" and the like: it goes on
            image = Image.open(io.BytesIO(data), formats=READ_FORMATS)
            try:
                check_pixels(image.height, image.width, max_pixels)
                _check_jpeg_scans(image, data)
            except UserError as error:
                raise UserError(f"{name}: {error}") from None
            png_rawmode = image.tile[0].args if image.format == "PNG" and image.tile else None
            image.load()
            # Pillow opens a 16-bit grey + alpha PNG as RGBA: it was coded in colour and came back tinted
            if png_rawmode == "LA;16B" and image.mode == "RGBA":
                image = image.convert("LA")  # R = G = B: the grey level exactly
            _png_transparency_as_read(image, png_rawmode)
            _tiff_grey_levels_as_stored(image)
            signed_bits = _signed_grey_tiff_bits(image)
            try:
                image = upright(image)
                return _signed_as_levels(image, signed_bits) if signed_bits else image
            except (struct.error, TypeError, KeyError) as error:  # a tag whose type does not fit its value
                raise UserError(f"{name}: corrupt EXIF orientation data ({type(error).__name__}: {error})") from None
    except UnidentifiedImageError as error:
        if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # TIFF or BigTIFF magic
            raise UserError(f"{name}: a TIFF Pillow cannot read: corrupt, or in a sample format it does not support "
                            "(signed, 32-bit or floating-point colour samples, an unusual layout)") from error
        raise UserError(
            f"{name}: not an image file, or not one of the formats read ({', '.join(READ_FORMATS)})"
        ) from error
    except Image.DecompressionBombError as error:
        raise UserError(f"{name}: too large for Pillow to decode ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as error:  # RuntimeError: libavif's
        raise UserError(f"{name}: corrupt or truncated image ({error})") from error


#: Pillow scales 2- and 4-bit grey PNG pixels to 0..255 but leaves their tRNS grey level as stored
_PNG_GREY_SCALE = {"L;2": 85, "L;4": 17}
#: set in ``image.info`` when a transparent colour could not be applied (see :func:`what_is_not_kept`)
TRANSPARENCY_NOT_APPLIED = "effvision: transparency not applied"


def _png_transparency_as_read(image: Image.Image, rawmode: object) -> None:
    """Make a PNG's tRNS colour (``image.info["transparency"]``) compare with the pixels as Pillow decoded them.

    A 2- or 4-bit grey level is scaled as the pixels were (else the transparent pixels stayed opaque). A
    16-bit RGB PNG is decoded to 8 bits per channel, so the pixels that match its 16-bit colour cannot be told
    apart any more (Pillow compared 8-bit pixels with the 16-bit colour: wrong pixels became transparent): its
    transparency is dropped, and :func:`what_is_not_kept` says so."""
    transparent = image.info.get("transparency")
    if transparent is None or isinstance(transparent, bytes):
        return
    if rawmode in _PNG_GREY_SCALE and isinstance(transparent, int):
        image.info["transparency"] = transparent * _PNG_GREY_SCALE[rawmode]
    elif rawmode == "RGB;16B":
        del image.info["transparency"]
        image.info[TRANSPARENCY_NOT_APPLIED] = True


#: ``image.info`` key: (maximum grey level, white is zero) of a high-bit-depth grey TIFF (see :func:`normalize_mode`)
TIFF_GREY_LEVELS = "effvision: tiff grey levels"


def _first_tag_value(tags, tag: int) -> object:
    """A TIFF tag's value as Pillow's ``tag_v2`` gives it, or the first of its values when it holds several
    (BitsPerSample, SampleFormat: one per sample); None when absent."""
    value = tags.get(tag)
    return value[0] if isinstance(value, tuple) and value else value


def _tiff_grey_levels_as_stored(image: Image.Image) -> None:
    """Pillow opens a 9- to 15-bit grey TIFF as 16-bit (``I;16``) holding values up to 2^bits - 1, and a 16-bit
    one with white as zero (PhotometricInterpretation 0) as black-is-zero: white came out as 16 of 255, and
    the second inverted. Their maximum level and polarity are kept in ``image.info`` for the scaling."""
    if image.format != "TIFF" or not image.mode.startswith("I;16"):
        return
    tags = getattr(image, "tag_v2", {})
    bits = _first_tag_value(tags, 258)
    top = 2 ** bits - 1 if isinstance(bits, int) and 1 <= bits <= 16 else 65535
    image.info[TIFF_GREY_LEVELS] = (top, tags.get(262) == 0)


def _signed_grey_tiff_bits(image: Image.Image) -> int:
    """8 or 16 for a signed grey TIFF (SampleFormat 2) Pillow opened as ``L`` or ``I`` (0 otherwise). Pillow
    gives an 8-bit one's bytes as stored (-100 came out as 156, dark as bright) and a 16-bit one's signed values
    (every negative level came out black, the top level as 127); see :func:`_signed_as_levels`."""
    if image.format != "TIFF" or image.mode not in ("L", "I"):
        return 0
    tags = getattr(image, "tag_v2", {})
    sample_format, bits = _first_tag_value(tags, 339), _first_tag_value(tags, 258)
    if sample_format != 2 or bits not in (8, 16) or (image.mode == "L") != (bits == 8):
        return 0
    return bits


def _signed_as_levels(image: Image.Image, bits: int) -> Image.Image:
    """Signed levels -2^(bits-1) .. 2^(bits-1)-1 as 0 .. 2^bits-1 (the lowest level is black); ``info`` is kept.
    A 16-bit one is then scaled from 65535 like every 16-bit grey image."""
    if bits == 8:  # two's-complement bytes: flipping the top bit adds 128
        shifted = image.point([level ^ 0x80 for level in range(256)])
    else:
        import numpy as np

        values = np.asarray(image, dtype=np.int32) + 32768
        shifted = Image.fromarray(values)  # int32: mode I
    shifted.info = dict(image.info)
    if bits == 16:
        shifted.info[TIFF_GREY_LEVELS] = (65535, False)
    return shifted


#: EXIF orientation -> the transpose that shows the image upright (the same table as Pillow's exif_transpose)
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF (or XMP) orientation says; itself when there is nothing to turn.

    Reads the one tag, unlike ``ImageOps.exif_transpose``, which re-serialises the whole EXIF block to drop the
    tag: a 4 MB crafted block (one orientation tag and an array of half a million rationals) took 11 s there.
    The metadata is not kept (``.evc`` stores none), so the turned image carries no EXIF."""
    transpose = _ORIENTATION_TRANSPOSE.get(image.getexif().get(0x0112))
    if transpose is None:
        return image
    turned = image.transpose(transpose)
    for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp"):
        turned.info.pop(key, None)
    return turned


def _check_jpeg_scans(image: Image.Image, data: bytes) -> None:
    """Refuse, before decoding, a JPEG with more than :data:`MAX_JPEG_SCANS` scans, or a Huffman-coded one too
    short for the size it declares.

    A scan starts with an SOS marker (FF DA); inside entropy-coded data every FF byte is followed by 00, so the
    count is exact but for markers inside metadata (an EXIF thumbnail's own scans), which only add to it. A
    Huffman code is at least one bit, so a complete Huffman-coded JPEG holds at least one bit per 8x8 luma
    block (its DC difference); libjpeg fills what is missing with grey, so a 1.5 kB file declaring 8000x8000
    decoded to 64 MP of grey (arithmetic-coded JPEGs, SOF9-SOF15, are not held to this)."""
    if image.format not in ("JPEG", "MPO"):
        return
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise UserError(f"a JPEG with {scans} scans (at most {MAX_JPEG_SCANS}; each is a pass over the image)")
    frame = _first_jpeg_frame_marker(data)
    blocks = -(-image.width // 8) * -(-image.height // 8)
    if frame in (0xC0, 0xC1, 0xC2, 0xC3) and 8 * len(data) < blocks:
        raise UserError(f"truncated JPEG: it declares {image.width}x{image.height} pixels ({blocks} blocks of 8x8) "
                        f"but holds only {len(data)} bytes")


def _first_jpeg_frame_marker(data: bytes) -> int | None:
    """The second byte of the first SOF marker (C0-CF but for DHT C4, JPG C8 and DAC CC), walking the marker
    segments from the start (each length-prefixed) up to the first scan; None if there is none."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _check_container_structure(data: bytes) -> None:
    """Refuse, before Pillow parses it, a PNG, JPEG, PBM/PGM/PPM/PFM or TIFF file whose structure would cost time
    or memory out of proportion to its pixels (:data:`MAX_PNG_CHUNKS`, :data:`MAX_PPM_HEADER_BYTES`,
    :data:`MIN_TIFF_SEGMENT_PIXELS`, :data:`MAX_TIFF_TAG_NUMBERS`); other files pass."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png_chunks(data)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg_segments(data)
    elif len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456fF":
        _check_ppm_header(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff_segments(data)


def _check_jpeg_segments(data: bytes) -> None:
    """Walk the marker segments before the first scan (what Pillow parses, one Python object each: a 10 MB file
    of empty comment segments took 15 s and 225 MB to open) and bound their number like PNG chunks."""
    limit = MAX_PNG_CHUNKS + len(data) // 65536  # a segment holds at most 64 kB
    position, segments = 2, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return  # not a marker: Pillow says what is wrong
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            return
        segments += 1
        if segments > limit:
            raise UserError(f"a JPEG of {len(data)} bytes with more than {limit} marker segments before its image "
                            "data (each is parsed on its own)")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")


def _check_png_chunks(data: bytes) -> None:
    """Walk the chunk headers (length, type; then data and CRC) as far as Pillow reads them for the first frame
    (to IEND; an animated PNG's to the next frame's fcTL) and bound their number."""
    limit = MAX_PNG_CHUNKS + len(data) // 2048
    position, chunks, animated, seen_image_data = 8, 0, False, False
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > limit:
            raise UserError(f"a PNG of {len(data)} bytes with more than {limit} chunks (each is parsed on its own)")
        if kind == b"IEND" or kind == b"fcTL" and animated and seen_image_data:
            return
        if kind == b"acTL" and length >= 4 and position + 12 <= len(data):
            animated = struct.unpack_from(">I", data, position + 8)[0] > 1  # Pillow's is_animated
        seen_image_data = seen_image_data or kind == b"IDAT"
        position += 12 + length


def _check_ppm_header(data: bytes) -> None:
    """The header of a Netpbm file (magic, width, height, and but for PBM a maximum value, with ``#`` comments
    and whitespace between them) must end within :data:`MAX_PPM_HEADER_BYTES`."""
    needed = 2 if data[1:2] in b"14" else 3
    head, position, tokens = data[:MAX_PPM_HEADER_BYTES], 2, 0
    while tokens < needed:
        while position < len(head) and head[position:position + 1] in b" \t\r\n\x0b\x0c":
            position += 1
        if position >= len(head):
            break
        if head[position:position + 1] == b"#":
            end = head.find(b"\n", position)
            position = len(head) if end < 0 else end + 1
            continue
        while position < len(head) and head[position:position + 1] not in b" \t\r\n\x0b\x0c#":
            position += 1
        tokens += 1
    if tokens < needed and len(data) > len(head):
        raise UserError(f"a Netpbm header longer than {MAX_PPM_HEADER_BYTES} bytes (comments included)")


#: TIFF tags that hold one entry per strip or tile: StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_TIFF_SEGMENT_TAGS = (273, 279, 324, 325)
#: TIFF field types stored as bytes (BYTE, ASCII, UNDEFINED): Pillow keeps them as one bytes object; every
#: other type becomes one Python number per value
_TIFF_BYTE_TYPES = (1, 2, 7)
#: numbers all other tags of the first directory may hold together: a 16-bit palette (ColorMap) holds
#: 3 x 65536; a 1x1 TIFF whose XResolution held 5 million rationals took 37 s and 894 MB to open
MAX_TIFF_TAG_NUMBERS = 1 << 18


def _check_tiff_segments(data: bytes) -> None:
    """Bound the strips or tiles the first directory (IFD0) declares, from its entries' counts, to one per row
    or one per :data:`MIN_TIFF_SEGMENT_PIXELS` pixels, whichever is more, times the planes (PlanarConfiguration
    2 stores each sample in its own), and the numbers its other tags hold to :data:`MAX_TIFF_TAG_NUMBERS`.
    Classic and BigTIFF; a directory that cannot be read is left to Pillow."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, offset)
            entry_size, start, layout = 20, offset + 8, order + "HHQ8s"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, offset)
            entry_size, start, layout = 12, offset + 2, order + "HHI4s"
        if entries > 65535:
            raise UserError(f"a TIFF directory of {entries} entries")
        values: dict[int, tuple[int, int, bytes]] = {}
        numbers = 0
        for index in range(entries):
            tag, kind, count, value = struct.unpack_from(layout, data, start + index * entry_size)
            values[tag] = (kind, count, value)
            if tag not in _TIFF_SEGMENT_TAGS and kind not in _TIFF_BYTE_TYPES:
                numbers += count
    except struct.error:
        return
    if numbers > MAX_TIFF_TAG_NUMBERS:
        raise UserError(f"a TIFF directory whose tags hold {numbers} numbers (at most {MAX_TIFF_TAG_NUMBERS} besides "
                        "the strip and tile tables; each is parsed on its own)")
    width, height = _tiff_number(values.get(256), order), _tiff_number(values.get(257), order)
    if not width or not height:
        return
    planes = 1
    if _tiff_number(values.get(284), order) == 2:  # planar: each sample stored apart
        planes = max(1, min(_tiff_number(values.get(277), order) or 1, 4))
    pixels = min(width * height, MAX_PIXELS)
    limit = max(min(height, 1 << 16), pixels // MIN_TIFF_SEGMENT_PIXELS) * planes
    for tag in _TIFF_SEGMENT_TAGS:
        if tag in values and values[tag][1] > limit:
            raise UserError(f"a {width}x{height} TIFF declaring {values[tag][1]} strips or tiles (at most {limit}: "
                            f"one a row or one per {MIN_TIFF_SEGMENT_PIXELS} pixels)")


def _tiff_number(entry: tuple[int, int, bytes] | None, order: str) -> int:
    """The value of a one-number SHORT (3), LONG (4) or LONG8 (16) entry, stored in the entry itself; 0 else."""
    if entry is None or entry[1] != 1:
        return 0
    kind, _, value = entry
    formats = {3: "H", 4: "I", 16: "Q"}
    if kind not in formats or struct.calcsize(formats[kind]) > len(value):
        return 0
    return struct.unpack_from(order + formats[kind], value)[0]


def normalize_mode(image: Image.Image) -> Image.Image:
    """The image in one of :data:`STORED_MODES`, 8 bits per channel (rules in the module docstring)."""
    if image.mode in ("RGBA", "LA"):
        return image
    if image.mode in ("P", "PA"):
        transparent = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if transparent else "RGB")
    transparent = image.info.get("transparency")  # a PNG's tRNS colour: those pixels are see-through
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        grey = Image.fromarray(_grayscale_to_8_bits(image), "L")
        if isinstance(transparent, int) and not isinstance(transparent, bool):
            import numpy as np

            alpha = Image.fromarray(np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8), "L")
            return Image.merge("LA", (grey, alpha))
        return grey
    if image.mode in ("1", "L") and isinstance(transparent, int) and not isinstance(transparent, bool):
        return image.convert("L").convert("LA") if image.mode == "1" else image.convert("LA")
    if image.mode == "RGB" and isinstance(transparent, tuple):
        return image.convert("RGBA")
    if image.mode in STORED_MODES:
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("La", "LA"):
        return image.convert("LA")
    if image.mode in ("RGBa", "RGBA"):
        return image.convert("RGBA")
    return image.convert("RGB")


def _grayscale_to_8_bits(image: Image.Image):
    import numpy as np

    values = np.asarray(image)
    floating = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0, copy=False)
    top = float(values.max(initial=0.0))
    levels = image.info.get(TIFF_GREY_LEVELS)
    if levels is not None:  # a 9- to 16-bit grey TIFF: its own maximum, and white may be zero
        scale = float(levels[0])
        if levels[1]:
            values = np.clip(scale - values, 0.0, None)
    elif image.mode.startswith("I;16") or image.format == "PPM" and not floating:
        scale = 65535.0  # the bit depth is known (Pillow scales a Netpbm maximum value to 65535)
    elif floating and top <= 1.0:
        scale = 1.0
    else:
        scale = 65535.0 if top > 255 else 255.0
    values *= 255.0 / scale
    return np.clip(np.rint(values, out=values), 0, 255, out=values).astype(np.uint8)


def what_is_not_kept(image: Image.Image) -> list[str]:
    """What coding ``image`` (as :func:`open_image` returned it) leaves out, for a note to the user: later
    frames of an animation, the transparent colour of a 16-bit RGB PNG, and an ICC colour profile other than
    sRGB (the pixel values are coded as they are, and the decoded image has no profile, so a wide-gamut photo is
    shown with duller colours)."""
    notes = []
    try:  # is_animated looks for a second frame only (n_frames would walk a crafted file's every frame)
        animated = getattr(image, "is_animated", False) is True
    except Exception:  # noqa: BLE001 - a broken second frame: the first one is all that is read anyway
        animated = False
    if animated:
        notes.append("only the first frame of the animation is coded")
    if image.info.get(TRANSPARENCY_NOT_APPLIED):
        notes.append("its transparent colour is not applied: Pillow reads a 16-bit RGB PNG at 8 bits per channel, "
                     "so which pixels match that colour is lost (save it with an alpha channel instead)")
    profile = image.info.get("icc_profile")
    if profile:
        description = "an unreadable one"
        try:
            from PIL import ImageCms

            description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile))).strip()
        except Exception:  # noqa: BLE001 - a broken profile is still a profile we do not keep
            pass
        if "srgb" not in description.lower():
            notes.append(f"its colour profile ({description[:60]}) is not stored: decoded, it shows as sRGB")
    return notes


def rgb_image(image: Image.Image) -> Image.Image:
    """The image in RGB for training and evaluation, as :func:`to_rgb_array` sees it (:func:`normalize_mode`,
    grayscale replicated, alpha composited onto white), kept as an 8-bit Pillow image."""
    image = normalize_mode(image)
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb_array(image: Image.Image):
    """(H, W, 3) float32 numpy array in [0, 1] for training and evaluation: :func:`normalize_mode`, grayscale
    replicated, alpha composited onto white."""
    import numpy as np

    image = normalize_mode(image)
    if image.mode in ("RGBA", "LA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS):
    """Read ``path`` as a (3, H, W) float32 torch tensor in [0, 1] (see :func:`to_rgb_array`)."""
    import numpy as np
    import torch

    array = to_rgb_array(open_image(path, max_pixels=max_pixels))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_uint8(image):
    """(3, H, W) float torch tensor in [0, 1] -> (H, W, 3) uint8 array (rounded)."""
    import torch

    return image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def output_format(path: str | Path) -> str:
    """Pillow format for an output file name (``"-"``: PNG); :class:`UserError` for other suffixes."""
    if str(path) == STDIO:
        return "PNG"
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(f"{path}: unsupported output format (use one of {', '.join(OUTPUT_FORMATS)})")
    return OUTPUT_FORMATS[suffix]


def save_image(image: Image.Image, path: str | Path, force: bool = False) -> str:
    """Write ``image`` in the format its suffix names (:data:`OUTPUT_FORMATS`; ``"-"``: PNG on stdout),
    atomically and losslessly (WebP too); alpha is dropped for formats without it. An existing file is kept
    unless ``force``. Returns the mode written."""
    image_format = output_format(path)
    if image_format in _FORMATS_WITHOUT_ALPHA and image.mode in ("RGBA", "LA"):
        image = image.convert(image.mode[:-1])
    options = {"lossless": True, "exact": True} if image_format == "WEBP" else {}  # Pillow's default is lossy
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    atomic_write_bytes(path, buffer.getvalue(), force=force)
    return image.mode


def list_images(directory: str | Path) -> list[Path]:
    """Image files (by suffix, :data:`IMAGE_SUFFIXES`) in ``directory`` and its subfolders, sorted;
    :class:`UserError` if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files

