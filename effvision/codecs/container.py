"""The ``.evc`` file container: one format for every codec, parsed strictly.

Layout (little-endian; the normative spec with every limit is ``docs/format.md``)::

    fixed header (28 bytes; 24 in version 1): magic, version, flags, mode, name/config/fingerprint
                             lengths, width, height, pad right, pad bottom, section count,
                             tile width, tile height (version 2 only)
    codec name | config id | fingerprint | section table (6 bytes per section) | CRC32 of the header
    payload (the sections' bytes, concatenated) | CRC32 of the payload

Version 2 codes the (padded) image as a grid of independently coded tiles, each tile's codec sections
in raster order, the first of each flagged ``TILE_START``. Version 1 (still read, no longer written)
has one tile, the whole image, whose first codec section is the compressai latent shape.

The parser checks every length and limit against the bytes actually present before it slices anything,
so a tiny or hostile file costs at most its own size in memory, and every defect raises
:class:`ContainerError` (a :class:`effvision.errors.UserError`) naming what is wrong.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

from effvision.errors import UserError

MAGIC = b"\x89EVC\r\n\x1a\n"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_DIMENSION = 65535
MAX_PADDING = 1023
MAX_SECTIONS = 65535
MAX_NAME_LENGTH = 32
MAX_CONFIG_ID_LENGTH = 64
MAX_FINGERPRINT_LENGTH = 64
MAX_FILE_BYTES = 1 << 30

_FIXED_V1 = struct.Struct("<8sBBBBBBHHHHH")
_TILE = struct.Struct("<HH")
_SECTION = struct.Struct("<IBB")
_CRC = struct.Struct("<I")
SECTION_LOST = 0x01
SECTION_TILE_START = 0x02


class ContainerError(UserError):
    """A file that is not a valid ``.evc`` container (truncated, corrupt, unsupported)."""


class Mode(enum.IntEnum):
    """The image mode the decoder gives back (PIL names); codecs always see RGB."""

    RGB = 0
    L = 1
    RGBA = 2
    LA = 3


class SectionKind(enum.IntEnum):
    """What a section holds."""

    CODEC = 0  # bytes for the codec's decode(), in order
    ALPHA = 1  # zlib-compressed uint8 alpha plane, height x width (unpadded), row-major


@dataclass(frozen=True)
class Section:
    """One payload section. A lost section (e.g. a dropped packet) has no bytes and ``lost=True``;
    ``tile_start`` marks the first codec section of a tile (version 2)."""

    data: bytes = b""
    kind: SectionKind = SectionKind.CODEC
    lost: bool = False
    tile_start: bool = False

    def __post_init__(self) -> None:
        if self.lost and self.data:
            raise ValueError("a lost section carries no bytes")

    @property
    def flags(self) -> int:
        return (SECTION_LOST if self.lost else 0) | (SECTION_TILE_START if self.tile_start else 0)


@dataclass(frozen=True)
class Tile:
    """One tile of the padded image: its place and size in pixels, and its codec sections (``None``
    where a section is lost)."""

    top: int
    left: int
    height: int
    width: int
    sections: tuple[bytes | None, ...]


def tile_grid(height: int, width: int, tile_height: int, tile_width: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every tile covering a height x width image, in raster order;
    the last row and column of tiles are cut to the image."""
    return [
        (top, left, min(tile_height, height - top), min(tile_width, width - left))
        for top in range(0, height, tile_height)
        for left in range(0, width, tile_width)
    ]


@dataclass(frozen=True)
class Container:
    """A parsed (or to-be-written) ``.evc`` file.

    ``width``/``height`` are the original image size; the codec saw ``width + pad_right`` by
    ``height + pad_bottom`` pixels (edge-replicated), cut into ``tile_width`` x ``tile_height`` tiles
    (version 2; 0 in a version-1 file, whose one tile is the whole padded image).
    """

    codec: str
    config_id: str
    fingerprint: bytes
    width: int
    height: int
    mode: Mode
    sections: tuple[Section, ...]
    pad_right: int = 0
    pad_bottom: int = 0
    tile_width: int = 0
    tile_height: int = 0
    version: int = field(default=VERSION)

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def padded_size(self) -> tuple[int, int]:
        """(height, width) the codec saw."""
        return self.height + self.pad_bottom, self.width + self.pad_right

    @property
    def codec_sections(self) -> list[bytes | None]:
        """The codec's sections in order; ``None`` where a section is lost."""
        return [None if s.lost else s.data for s in self.sections if s.kind == SectionKind.CODEC]

    @property
    def tiles(self) -> list[Tile]:
        """The tiles in raster order with their codec sections (one tile in a version-1 file)."""
        height, width = self.padded_size
        if self.version == 1:
            return [Tile(0, 0, height, width, tuple(self.codec_sections))]
        groups: list[list[bytes | None]] = []
        for section in self.sections:
            if section.kind != SectionKind.CODEC:
                continue
            if section.tile_start:
                groups.append([])
            groups[-1].append(None if section.lost else section.data)
        grid = tile_grid(height, width, self.tile_height, self.tile_width)
        return [Tile(*place, tuple(group)) for place, group in zip(grid, groups, strict=True)]

    @property
    def alpha(self) -> bytes | None:
        """The raw (compressed) alpha section, if the image has one."""
        for section in self.sections:
            if section.kind == SectionKind.ALPHA and not section.lost:
                return section.data
        return None

    def to_bytes(self) -> bytes:
        """Serialize to the ``.evc`` byte layout."""
        name = self.codec.encode("ascii")
        config = self.config_id.encode("ascii")
        header = bytearray(
            _FIXED_V1.pack(
                MAGIC,
                self.version,
                0,
                int(self.mode),
                len(name),
                len(config),
                len(self.fingerprint),
                self.width,
                self.height,
                self.pad_right,
                self.pad_bottom,
                len(self.sections),
            )
        )
        if self.version >= 2:
            header += _TILE.pack(self.tile_width, self.tile_height)
        header += name + config + self.fingerprint
        for section in self.sections:
            header += _SECTION.pack(len(section.data), int(section.kind), section.flags)
        header += _CRC.pack(zlib.crc32(header))
        payload = b"".join(section.data for section in self.sections)
        return bytes(header) + payload + _CRC.pack(zlib.crc32(payload))

    @classmethod
    def from_bytes(cls, data: bytes) -> Container:
        """Parse and validate ``data``; raises :class:`ContainerError` for any defect."""
        return parse(data)


def _check_fields(container: Container) -> None:
    if container.version not in READABLE_VERSIONS:
        raise ContainerError(f"unsupported .evc version {container.version} (supported: {READABLE_VERSIONS})")
    if not container.codec.isascii() or not 0 < len(container.codec) <= MAX_NAME_LENGTH:
        raise ContainerError(f"codec name must be 1-{MAX_NAME_LENGTH} ASCII characters")
    if not container.config_id.isascii() or len(container.config_id) > MAX_CONFIG_ID_LENGTH:
        raise ContainerError(f"config id must be at most {MAX_CONFIG_ID_LENGTH} ASCII characters")
    if len(container.fingerprint) > MAX_FINGERPRINT_LENGTH:
        raise ContainerError(f"fingerprint longer than {MAX_FINGERPRINT_LENGTH} bytes")
    for label, value in (("width", container.width), ("height", container.height)):
        if not 1 <= value <= MAX_DIMENSION:
            raise ContainerError(f"image {label} {value} outside 1..{MAX_DIMENSION}")
    for label, value in (("right", container.pad_right), ("bottom", container.pad_bottom)):
        if not 0 <= value <= MAX_PADDING:
            raise ContainerError(f"{label} padding {value} outside 0..{MAX_PADDING}")
    if not 1 <= len(container.sections) <= MAX_SECTIONS:
        raise ContainerError(f"section count {len(container.sections)} outside 1..{MAX_SECTIONS}")
    alpha_sections = sum(s.kind == SectionKind.ALPHA for s in container.sections)
    if alpha_sections > (container.mode in (Mode.RGBA, Mode.LA)):
        raise ContainerError(f"mode {container.mode.name} allows no alpha section here")
    if any(s.tile_start and s.kind != SectionKind.CODEC for s in container.sections):
        raise ContainerError("only codec sections can start a tile")
    if container.version == 1:
        if container.tile_width or container.tile_height or any(s.tile_start for s in container.sections):
            raise ContainerError("version-1 files have no tiles")
        return
    _check_tiles(container)


def _check_tiles(container: Container) -> None:
    height, width = container.padded_size
    for label, value in (("width", container.tile_width), ("height", container.tile_height)):
        if not 1 <= value <= MAX_DIMENSION:
            raise ContainerError(f"tile {label} {value} outside 1..{MAX_DIMENSION}")
    tiles = -(-height // container.tile_height) * -(-width // container.tile_width)
    codec = [s for s in container.sections if s.kind == SectionKind.CODEC]
    if not codec or not codec[0].tile_start:
        raise ContainerError("the first codec section must start a tile")
    starts = sum(s.tile_start for s in codec)
    if starts != tiles:
        raise ContainerError(
            f"{starts} tiles in the payload, but a {width}x{height} image in "
            f"{container.tile_width}x{container.tile_height} tiles has {tiles}"
        )


def _take(data: bytes, offset: int, size: int, what: str) -> tuple[bytes, int]:
    if offset + size > len(data):
        raise ContainerError(
            f"truncated file: {what} needs {size} bytes at offset {offset}, file has {len(data)}"
        )
    return data[offset : offset + size], offset + size


def parse(data: bytes) -> Container:
    """Parse a complete ``.evc`` file held in memory (bytes, bytearray or memoryview). Raises
    :class:`ContainerError` on any defect."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise TypeError(f"parse takes the file's bytes, not {type(data).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise ContainerError(f"file larger than {MAX_FILE_BYTES} bytes")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise ContainerError("not an .evc file (bad magic)")
    fixed, offset = _take(data, 0, _FIXED_V1.size, "header")
    (_, version, flags, mode, name_len, config_len, fp_len, width, height, pad_right, pad_bottom, count) = (
        _FIXED_V1.unpack(fixed)
    )
    if version not in READABLE_VERSIONS:
        raise ContainerError(f"unsupported .evc version {version} (this effvision reads versions 1 and 2)")
    tile_width = tile_height = 0
    if version >= 2:
        tile, offset = _take(data, offset, _TILE.size, "tile size")
        tile_width, tile_height = _TILE.unpack(tile)
    if flags != 0:
        raise ContainerError(f"unknown header flags 0x{flags:02x}")
    if mode not in Mode._value2member_map_:
        raise ContainerError(f"unknown image mode code {mode}")
    lengths_ok = 0 < name_len <= MAX_NAME_LENGTH and config_len <= MAX_CONFIG_ID_LENGTH
    if not lengths_ok or fp_len > MAX_FINGERPRINT_LENGTH:
        raise ContainerError("corrupt header: codec name, config id or fingerprint length out of range")
    if not 1 <= count <= MAX_SECTIONS:
        raise ContainerError(f"corrupt header: section count {count} outside 1..{MAX_SECTIONS}")
    name, offset = _take(data, offset, name_len, "codec name")
    config, offset = _take(data, offset, config_len, "config id")
    fingerprint, offset = _take(data, offset, fp_len, "fingerprint")
    table, offset = _take(data, offset, count * _SECTION.size, "section table")
    stored_header_crc, offset = _take(data, offset, _CRC.size, "header checksum")
    if zlib.crc32(data[: offset - _CRC.size]) != _CRC.unpack(stored_header_crc)[0]:
        raise ContainerError("corrupt header: checksum mismatch")
    if not (name.isascii() and name.decode("ascii").isprintable()):
        raise ContainerError("corrupt header: codec name is not printable ASCII")
    if not (config.isascii() and config.decode("ascii").isprintable()):
        raise ContainerError("corrupt header: config id is not printable ASCII")

    entries = [_SECTION.unpack_from(table, i * _SECTION.size) for i in range(count)]
    payload_size = sum(length for length, _, _ in entries)
    expected = offset + payload_size + _CRC.size
    if len(data) != expected:
        kind = "truncated file" if len(data) < expected else "trailing bytes after the payload"
        raise ContainerError(f"{kind}: header describes {expected} bytes, file has {len(data)}")
    payload_end = offset + payload_size
    if zlib.crc32(data[offset:payload_end]) != _CRC.unpack_from(data, payload_end)[0]:
        raise ContainerError("corrupt payload: checksum mismatch")

    known_flags = SECTION_LOST | (SECTION_TILE_START if version >= 2 else 0)
    sections = []
    for index, (length, kind, section_flags) in enumerate(entries):
        if kind not in SectionKind._value2member_map_:
            raise ContainerError(f"section {index}: unknown kind {kind}")
        if section_flags & ~known_flags:
            raise ContainerError(f"section {index}: unknown flags 0x{section_flags:02x}")
        lost = bool(section_flags & SECTION_LOST)
        if lost and length:
            raise ContainerError(f"section {index}: marked lost but carries {length} bytes")
        tile_start = bool(section_flags & SECTION_TILE_START)
        sections.append(Section(data[offset : offset + length], SectionKind(kind), lost, tile_start))
        offset += length
    return Container(
        codec=name.decode("ascii"),
        config_id=config.decode("ascii"),
        fingerprint=fingerprint,
        width=width,
        height=height,
        mode=Mode(mode),
        sections=tuple(sections),
        pad_right=pad_right,
        pad_bottom=pad_bottom,
        tile_width=tile_width,
        tile_height=tile_height,
        version=version,
    )
