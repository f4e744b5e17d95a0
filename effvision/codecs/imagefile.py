"""PIL image <-> ``.evc`` container through an :class:`~effvision.codecs.base.ImageCodec`, tile by tile.

Codecs see RGB only. Grayscale images are replicated to RGB and converted back after decoding; an
alpha channel is stored losslessly (zlib) in its own section; other PIL modes are converted to the
nearest of RGB, L, RGBA, LA first (:func:`effvision.image_io.normalize_mode`, the one set of mode
rules). The image is edge-padded to the codec's alignment and the padding
is recorded, so the decoder crops back to the original size.

Tiling: the padded image is cut into ``tile_size`` x ``tile_size`` tiles (the last row and column cut to
the image) and every tile is coded on its own, so encoding and decoding need the memory of one tile, not
of the image. An image no larger than one tile is coded exactly as an untiled codec would code it. In a
larger image each tile is an independent image for the codec: its bitstream is the one the codec writes
for that crop alone, no context crosses a tile border, so seams can show at low rates and the rate is a
little higher than untiled coding (each tile pays for its own hyperprior and stream headers).

Decoding checks everything a file declares before any work: size against ``max_pixels``, tile size
against the codec's limit, every tile's sections against what the codec can have written
(:meth:`ImageCodec.check_sections`), and the estimated memory of one tile against what the machine has.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
from PIL import Image

from effvision.codecs.base import ImageCodec
from effvision.codecs.container import (
    MAX_DIMENSION,
    MAX_PADDING,
    MAX_SECTIONS,
    Container,
    ContainerError,
    Mode,
    Section,
    SectionKind,
    Tile,
    tile_grid,
)
from effvision.codecs.progress import tiles_bar
from effvision.errors import UserError
from effvision.image_io import MAX_PIXELS, check_pixels, normalize_mode

__all__ = [
    "MAX_PIXELS",
    "ResourceError",
    "codec_threads",
    "decode_image",
    "encode_image",
    "plan_decode",
    "set_codec_threads",
]

_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "not enough memory", "failed to allocate")


class ResourceError(UserError):
    """The work needs more memory than this process can have (not a corrupt file)."""


def available_memory_bytes() -> int | None:
    """Memory the machine can still give (``MemAvailable`` of /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: below this many pixels per tile, intra-op threads cost more than they give: the codecs' tensors are
#: tiny and an idle worker thread spins (measured: a 32 x 32 MambaIC decode takes 0.15 s of CPU on one
#: thread and 7.5 s on two threads of a loaded 2-core machine).
SINGLE_THREAD_PIXELS = 512 * 512


def codec_threads(tile_pixels: int, requested: int, default: int) -> int:
    """Torch threads for coding tiles of ``tile_pixels``: ``requested`` if positive, else 1 for small tiles
    and ``default`` (torch's own choice, read before any change) otherwise."""
    if requested > 0:
        return requested
    return 1 if tile_pixels < SINGLE_THREAD_PIXELS else default


@functools.cache
def _torch_default_threads() -> int:
    return torch.get_num_threads()  # read once, before any set_codec_threads call changes it


def set_codec_threads(tile_pixels: int, requested: int = 0) -> None:
    """Set torch's thread count for coding tiles of ``tile_pixels`` (:func:`codec_threads`); the CLI calls
    this per file, so a small file after a large one (or the reverse) gets its own setting."""
    torch.set_num_threads(codec_threads(tile_pixels, requested, _torch_default_threads()))


def _gigabytes(count: int) -> str:
    return f"{count / 2**30:.1f} GB"


def _is_allocation_failure(error: BaseException) -> bool:
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _ALLOCATION_FAILURES)


def _check_tile_size(codec: ImageCodec, tile_height: int, tile_width: int, padded_h: int, padded_w: int) -> None:
    if tile_height % codec.alignment or tile_width % codec.alignment:
        raise ContainerError(f"tile size {tile_width}x{tile_height} is not a multiple of {codec.alignment}")
    smallest = codec.min_tile_side
    if tile_height < min(smallest, padded_h) or tile_width < min(smallest, padded_w):
        raise ContainerError(
            f"tile size {tile_width}x{tile_height}: {codec.name} pads every tile to a multiple of {smallest} px, so "
            f"a tile side must be at least {smallest} (or the whole image)"
        )
    if tile_height * tile_width > codec.max_tile_pixels:
        raise ContainerError(
            f"tile size {tile_width}x{tile_height} exceeds {codec.name}'s limit of {codec.max_tile_pixels} pixels"
        )


def encode_image(
    codec: ImageCodec, image: Image.Image, tile_size: int | None = None, progress: bool = False
) -> Container:
    """Encode a PIL image of any mode into a (version 2, tiled) container.

    Args:
        codec: the codec.
        image: any PIL image.
        tile_size: side of the square tiles (default ``codec.tile_size``; a multiple of its alignment).
        progress: show a progress bar over the tiles on stderr (for images of several tiles).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"encode_image takes a PIL image (effvision.image_io.open_image reads one), not "
                        f"{type(image).__name__}")
    if tile_size is not None and (not isinstance(tile_size, int) or isinstance(tile_size, bool)):
        raise TypeError(f"tile_size must be an int, got {tile_size!r}")
    image = normalize_mode(image)
    width, height = image.size
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise UserError(f"image of {width}x{height} pixels: a .evc file holds at most {MAX_DIMENSION} pixels a side")
    if codec.alignment > MAX_PADDING + 1:
        raise ValueError(f"codec alignment {codec.alignment} exceeds {MAX_PADDING + 1}")
    tile = codec.tile_size if tile_size is None else tile_size
    if tile < 1:
        raise UserError(f"tile size must be positive, got {tile}")
    pad_right, pad_bottom = -width % codec.alignment, -height % codec.alignment
    padded_h, padded_w = height + pad_bottom, width + pad_right
    check_pixels(padded_h, padded_w)
    # A tile larger than the image is declared as the image's size: the same tiles, within the limit.
    tile_height, tile_width = min(tile, padded_h), min(tile, padded_w)
    _check_tile_size(codec, tile_height, tile_width, padded_h, padded_w)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pad_right or pad_bottom:
        rgb = np.pad(rgb, ((0, pad_bottom), (0, pad_right), (0, 0)), mode="edge")
    sections: list[Section] = []
    places = tile_grid(padded_h, padded_w, tile_height, tile_width)
    extra = 1 if image.mode in ("RGBA", "LA") else 0  # the alpha section
    _check_section_count(len(places), 1, extra, tile_height, tile_width)
    with tiles_bar(len(places), "encode", progress) as bar:
        for top, left, crop_height, crop_width in places:
            crop = torch.from_numpy(rgb[top : top + crop_height, left : left + crop_width].copy())
            try:
                streams = codec.encode(crop.permute(2, 0, 1).float().div_(255))
            except Exception as error:
                if _is_allocation_failure(error):
                    raise ResourceError(
                        f"encoding a {crop_width}x{crop_height} tile needs about "
                        f"{_gigabytes(codec.decode_memory_bytes(crop_height, crop_width))} and the allocation "
                        "failed; use a smaller --tile-size"
                    ) from error
                raise
            if not streams:
                raise ValueError(f"codec {codec.name!r} wrote no section for a tile")
            if not sections:  # the first tile tells how many sections each takes: fail now, not after the last
                _check_section_count(len(places), len(streams), extra, tile_height, tile_width)
            sections.extend(Section(data, tile_start=index == 0) for index, data in enumerate(streams))
            bar.update()
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
        sections.append(Section(zlib.compress(alpha.tobytes(), 9), SectionKind.ALPHA))
    return Container(
        codec=codec.name,
        config_id=codec.config_id,
        fingerprint=codec.fingerprint(),
        width=width,
        height=height,
        mode=Mode[image.mode],
        sections=tuple(sections),
        pad_right=pad_right,
        pad_bottom=pad_bottom,
        tile_width=tile_width,
        tile_height=tile_height,
    )


def _check_section_count(tiles: int, per_tile: int, extra: int, tile_height: int, tile_width: int) -> None:
    """Refuse, before encoding, ``tiles`` tiles of ``per_tile`` sections each (plus ``extra``) that a .evc file
    cannot hold."""
    if tiles * per_tile + extra > MAX_SECTIONS:
        raise UserError(
            f"{tiles} tiles of {tile_width}x{tile_height} with {per_tile} section(s) each: a .evc file holds at most "
            f"{MAX_SECTIONS} sections; use a larger --tile-size"
        )


def _decode_alpha(data: bytes, height: int, width: int) -> Image.Image:
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output, so a zlib bomb cannot allocate more than one plane.
        plane = inflater.decompress(data, height * width + 1)
    except zlib.error as error:
        raise ContainerError(f"corrupt alpha section ({error})") from error
    if len(plane) != height * width or inflater.unconsumed_tail or not inflater.eof:
        raise ContainerError("corrupt alpha section: wrong size")
    if inflater.unused_data:
        raise ContainerError(f"corrupt alpha section: {len(inflater.unused_data)} bytes after the zlib stream")
    return Image.frombytes("L", (width, height), plane)


def plan_decode(container: Container, codec: ImageCodec, max_pixels: int = MAX_PIXELS) -> list[Tile]:
    """Every check that can be made before decoding; returns the tiles to decode.

    Raises :class:`UserError` (a :class:`ResourceError` when one tile would not fit in memory).
    """
    if (codec.name, codec.config_id) != (container.codec, container.config_id):
        raise UserError(
            f"file needs codec {container.codec}/{container.config_id}, got {codec.name}/{codec.config_id}"
        )
    if codec.fingerprint() != container.fingerprint:
        raise UserError(
            f"file was written by different {container.codec}/{container.config_id} weights "
            "(fingerprint mismatch); decode it with the weights it was encoded with: --checkpoint FILE for a "
            "file written with --checkpoint, no --checkpoint for shipped or --pretrained weights"
        )
    padded_h, padded_w = container.padded_size
    if padded_h % codec.alignment or padded_w % codec.alignment:
        raise ContainerError(f"padded size {padded_w}x{padded_h} is not a multiple of {codec.alignment}")
    try:
        check_pixels(padded_h, padded_w, max_pixels)
    except UserError as error:
        raise UserError(f"{error} (--max-pixels)") from error
    if container.version == 1:  # one tile: the whole image, under the same tile limit
        _check_tile_size(codec, padded_h, padded_w, padded_h, padded_w)
        tile = container.tiles[0]
        sections = codec.strip_version1_sections(list(tile.sections), padded_h, padded_w)
        tiles = [Tile(0, 0, padded_h, padded_w, tuple(sections))]
    else:
        _check_tile_size(codec, container.tile_height, container.tile_width, padded_h, padded_w)
        tiles = container.tiles
    for tile in tiles:
        try:
            codec.check_sections(list(tile.sections), tile.height, tile.width)
        except UserError as error:
            where = f"tile at ({tile.left}, {tile.top})" if len(tiles) > 1 else "payload"
            raise UserError(f"corrupt {where}: {str(error).removeprefix('corrupt payload: ')}") from error
    largest = max(tiles, key=lambda t: t.height * t.width)
    needed = codec.decode_memory_bytes(largest.height, largest.width) + padded_h * padded_w * 4
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ResourceError(
            f"decoding needs about {_gigabytes(needed)} ({largest.width}x{largest.height} pixels at once); "
            f"this machine has {_gigabytes(available)} available"
        )
    return tiles


def decode_image(
    container: Container, codec: ImageCodec, max_pixels: int = MAX_PIXELS, progress: bool = False
) -> Image.Image:
    """Decode a container with the codec that wrote it, back to the original size and mode.

    Args:
        container: a parsed file.
        codec: the codec named by the file (same weights: the fingerprint is checked).
        max_pixels: refuse files whose padded image has more pixels, before any work.
        progress: show a progress bar over the tiles on stderr.
    """
    tiles = plan_decode(container, codec, max_pixels)
    alpha = None
    if container.mode in (Mode.RGBA, Mode.LA):
        if container.alpha is None:
            raise ContainerError(f"mode {container.mode.name} but no alpha section")
        alpha = _decode_alpha(container.alpha, container.height, container.width)
    pixels = np.empty((container.height, container.width, 3), dtype=np.uint8)
    with tiles_bar(len(tiles), "decode", progress) as bar:
        for tile in tiles:
            try:
                tensor = codec.decode(list(tile.sections), tile.height, tile.width)
            except Exception as error:
                if _is_allocation_failure(error):
                    raise ResourceError(
                        f"decoding a {tile.width}x{tile.height} tile needs about "
                        f"{_gigabytes(codec.decode_memory_bytes(tile.height, tile.width))} and the allocation "
                        "failed (memory limit of this process or machine)"
                    ) from error
                raise
            if tuple(tensor.shape) != (3, tile.height, tile.width):
                raise UserError(f"codec returned shape {tuple(tensor.shape)}, expected {(3, tile.height, tile.width)}")
            if not bool(torch.isfinite(tensor).all()):  # clamp keeps NaN and uint8 made it 0: a black image, rc 0
                raise UserError(
                    f"the {codec.name} decoder gave NaN or infinite pixels (tile at ({tile.left}, {tile.top})): its "
                    "weights are broken (finite but extreme weights overflow float32)"
                )
            bottom = min(tile.top + tile.height, container.height)
            right = min(tile.left + tile.width, container.width)
            if bottom > tile.top and right > tile.left:
                crop = tensor[:, : bottom - tile.top, : right - tile.left]
                pixels[tile.top : bottom, tile.left : right] = (
                    crop.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                )
            bar.update()
    image = Image.fromarray(pixels, "RGB")
    if container.mode in (Mode.L, Mode.LA):
        image = image.convert("L")
    if alpha is not None:
        image.putalpha(alpha)
    return image
