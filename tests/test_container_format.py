"""The .evc byte layout and the strict parser (docs/format.md)."""

import random
import struct
import zlib

import pytest

from effvision.codecs.container import (
    MAGIC,
    MAX_DIMENSION,
    Container,
    ContainerError,
    Mode,
    Section,
    SectionKind,
    parse,
)
from effvision.errors import UserError

FIXED_HEADER = 28  # version 2: the 24 bytes of version 1 plus the tile width and height
WHOLE_IMAGE = MAX_DIMENSION  # a tile side no image exceeds: one tile


def make_container(rng: random.Random, sections: int = 3, version: int = 2) -> Container:
    tiled = version >= 2
    return Container(
        codec="testcodec",
        config_id=f"q{rng.randint(1, 8)}",
        fingerprint=rng.randbytes(32),
        width=rng.randint(1, 4000),
        height=rng.randint(1, 4000),
        mode=Mode.RGB,
        sections=tuple(
            Section(rng.randbytes(rng.randint(0, 200)), tile_start=tiled and i == 0) for i in range(sections)
        ),
        pad_right=rng.randint(0, 63),
        pad_bottom=rng.randint(0, 63),
        tile_width=WHOLE_IMAGE if tiled else 0,
        tile_height=WHOLE_IMAGE if tiled else 0,
        version=version,
    )


def rewrite_header_crc(data: bytearray, header_end: int) -> bytearray:
    """Recompute the header CRC so a structural mutation reaches the validators behind it."""
    data[header_end - 4 : header_end] = struct.pack("<I", zlib.crc32(data[: header_end - 4]))
    return data


def header_end(container: Container) -> int:
    return (
        FIXED_HEADER
        + len(container.codec)
        + len(container.config_id)
        + len(container.fingerprint)
        + 6 * len(container.sections)
        + 4
    )


def test_round_trip_preserves_every_field():
    rng = random.Random(0)
    container = make_container(rng)
    assert parse(container.to_bytes()) == container


def test_file_size_is_header_plus_payload_plus_two_checksums():
    container = make_container(random.Random(1))
    payload = sum(len(s.data) for s in container.sections)
    assert len(container.to_bytes()) == header_end(container) + payload + 4


def test_file_starts_with_magic_and_version():
    data = make_container(random.Random(2)).to_bytes()
    assert data[:8] == MAGIC and data[8] == 2


def test_version_1_files_still_parse_as_one_whole_image_tile():
    container = make_container(random.Random(12), version=1)
    data = container.to_bytes()
    assert data[8] == 1 and len(data) == header_end(container) - 4 + sum(len(s.data) for s in container.sections) + 4
    parsed = parse(data)
    assert parsed == container
    (tile,) = parsed.tiles
    assert (tile.top, tile.left, (tile.height, tile.width)) == (0, 0, parsed.padded_size)
    assert list(tile.sections) == parsed.codec_sections


def test_tiles_group_sections_by_tile_start_in_raster_order():
    sections = (
        Section(b"a0", tile_start=True), Section(b"a1"),
        Section(b"b0", tile_start=True),
        Section(lost=True, tile_start=True), Section(b"c1"),
        Section(b"d0", tile_start=True),
    )
    container = Container(
        codec="c", config_id="", fingerprint=b"", width=100, height=70, mode=Mode.RGB, sections=sections,
        tile_width=64, tile_height=64,
    )
    tiles = parse(container.to_bytes()).tiles
    assert [(t.top, t.left, t.height, t.width) for t in tiles] == [
        (0, 0, 64, 64), (0, 64, 64, 36), (64, 0, 6, 64), (64, 64, 6, 36)
    ]
    assert [t.sections for t in tiles] == [(b"a0", b"a1"), (b"b0",), (None, b"c1"), (b"d0",)]


@pytest.mark.parametrize("starts", [(False, True, True), (True, True, True), (True, False, False)])
def test_tile_count_must_match_the_image_and_tile_size(starts):
    # a 100x50 image in 64x64 tiles has two tiles; the first codec section must start one
    with pytest.raises(ContainerError, match="tile"):
        Container(
            codec="c", config_id="", fingerprint=b"", width=100, height=50, mode=Mode.RGB,
            sections=tuple(Section(b"x", tile_start=start) for start in starts), tile_width=64, tile_height=64,
        )


def test_version_1_files_cannot_have_tiles():
    with pytest.raises(ContainerError, match="version-1"):
        Container(
            codec="c", config_id="", fingerprint=b"", width=8, height=8, mode=Mode.RGB,
            sections=(Section(b"x", tile_start=True),), tile_width=8, tile_height=8, version=1,
        )


def test_zero_tile_size_is_refused():
    container = make_container(random.Random(13))
    data = bytearray(container.to_bytes())
    data[24:26] = b"\x00\x00"  # tile width
    with pytest.raises(ContainerError, match="tile width 0"):
        parse(bytes(rewrite_header_crc(data, header_end(container))))


def test_lost_and_alpha_sections_round_trip():
    container = Container(
        codec="c",
        config_id="",
        fingerprint=b"",
        width=5,
        height=7,
        mode=Mode.RGBA,
        sections=(Section(b"abc", tile_start=True), Section(lost=True), Section(b"zz", SectionKind.ALPHA)),
        tile_width=8,
        tile_height=8,
    )
    parsed = parse(container.to_bytes())
    assert parsed.codec_sections == [b"abc", None] and parsed.alpha == b"zz"


def test_bad_magic_is_refused():
    with pytest.raises(ContainerError, match="magic"):
        parse(b"PNG\x00" + bytes(60))


def test_unknown_version_is_refused_by_number():
    container = make_container(random.Random(3))
    data = rewrite_header_crc(bytearray(container.to_bytes()), header_end(container))
    data[8] = 7
    with pytest.raises(ContainerError, match="version 7"):
        parse(bytes(data))


def test_every_truncation_is_a_container_error():
    data = make_container(random.Random(4)).to_bytes()
    for length in range(len(data)):
        with pytest.raises(ContainerError):
            parse(data[:length])


def test_trailing_bytes_are_refused():
    data = make_container(random.Random(5)).to_bytes()
    with pytest.raises(ContainerError, match="trailing"):
        parse(data + b"\x00")


def test_header_checksum_mismatch_is_reported():
    container = make_container(random.Random(6))
    data = bytearray(container.to_bytes())
    data[14] ^= 0x01  # width
    with pytest.raises(ContainerError, match="header: checksum"):
        parse(bytes(data))


def test_payload_checksum_mismatch_is_reported():
    container = make_container(random.Random(7))
    data = bytearray(container.to_bytes())
    data[header_end(container)] ^= 0x80
    with pytest.raises(ContainerError, match="payload: checksum"):
        parse(bytes(data))


def test_huge_section_length_is_refused_without_allocating():
    container = make_container(random.Random(8), sections=1)
    data = bytearray(container.to_bytes())
    table = header_end(container) - 4 - 6
    data[table : table + 4] = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(ContainerError, match="truncated"):
        parse(bytes(rewrite_header_crc(data, header_end(container))))


def test_thirty_byte_file_is_a_clean_error():
    data = struct.pack("<8sBBBBBBHHHHHHH", MAGIC, 2, 0, 0, 1, 0, 0, MAX_DIMENSION, MAX_DIMENSION, 0, 0, 1024, 1, 1)
    with pytest.raises(ContainerError):
        parse(data + b"x" + bytes(5))


def test_zero_width_is_refused():
    container = make_container(random.Random(9))
    data = bytearray(container.to_bytes())
    data[14:16] = b"\x00\x00"
    with pytest.raises(ContainerError, match="width 0"):
        parse(bytes(rewrite_header_crc(data, header_end(container))))


def test_lost_section_carrying_bytes_is_refused():
    container = make_container(random.Random(10), sections=1)
    data = bytearray(container.to_bytes())
    data[header_end(container) - 4 - 1] = 0x03  # flags of the only section: tile start + lost
    with pytest.raises(ContainerError, match="lost"):
        parse(bytes(rewrite_header_crc(data, header_end(container))))


def test_container_error_is_a_user_error():
    assert issubclass(ContainerError, UserError)


def test_constructing_an_invalid_container_raises():
    with pytest.raises(ContainerError):
        Container(
            codec="", config_id="", fingerprint=b"", width=1, height=1, mode=Mode.RGB, sections=(Section(),)
        )
