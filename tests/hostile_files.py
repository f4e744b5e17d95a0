"""Hostile ``.evc`` files with valid checksums, made from fresh encodes (shared by the hostile-file tests).

Every file here parses (both CRCs are recomputed by ``Container.to_bytes``); what is hostile is what the
fields and streams declare: sizes far larger than the payload, version-1 shape sections of other ranks,
streams with flipped bits, cut short or with bytes appended, lost sections at large sizes.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib

from effvision.codecs.container import Container, Mode, Section, SectionKind


def version1(container: Container, shape: tuple[int, ...] | None = None, **changes) -> Container:
    """The same streams as a version-1 file: one untiled image, a leading latent-shape section."""
    fields = {"width": container.width, "height": container.height, **changes}
    shape = shape if shape is not None else (fields["height"], fields["width"])
    shape_section = Section(struct.pack(f"<B{len(shape)}H", len(shape), *shape))
    codec = [dataclasses.replace(s, tile_start=False) for s in container.sections if s.kind == SectionKind.CODEC]
    others = [s for s in container.sections if s.kind != SectionKind.CODEC]
    return dataclasses.replace(
        container, sections=(shape_section, *codec, *others), tile_width=0, tile_height=0, version=1, **changes
    )


def retiled(container: Container, width: int, height: int, tile: int) -> Container:
    """Declare a ``width`` x ``height`` image in ``tile``-sized tiles, every tile given the streams of
    the (one-tile) original: a tiny payload posing as a large image."""
    tiles = -(-width // tile) * -(-height // tile)
    codec = [s for s in container.sections if s.kind == SectionKind.CODEC]
    others = [s for s in container.sections if s.kind != SectionKind.CODEC]
    return dataclasses.replace(
        container, width=width, height=height, tile_width=tile, tile_height=tile, sections=(*codec * tiles, *others)
    )


def with_codec_section(container: Container, index: int, section: Section) -> Container:
    """Replace the ``index``-th codec section (keeping its tile-start flag)."""
    sections = list(container.sections)
    positions = [i for i, s in enumerate(sections) if s.kind == SectionKind.CODEC]
    old = sections[positions[index]]
    sections[positions[index]] = dataclasses.replace(section, tile_start=old.tile_start)
    return dataclasses.replace(container, sections=tuple(sections))


def flip_bits(data: bytes, rng: random.Random, count: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(count):
        mutable[rng.randrange(len(mutable))] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def hostile_variants(mambaic: Container, vqgan_chunked: Container, rgba: Container, seed: int = 0) -> dict:
    """name -> Container: the hostile files of tests/test_decode_hostile.py.

    Args:
        mambaic: a fresh one-tile MambaIC encode of a small RGB image.
        vqgan_chunked: a fresh one-tile VQGAN encode with two row bands (sections).
        rgba: a fresh encode of a small RGBA image (any codec).
    """
    rng = random.Random(seed)
    files: dict[str, Container] = {}
    files["v2-2048x2048-from-64x64-streams"] = retiled(mambaic, 2048, 2048, 1024)
    files["v2-8192x8192-one-huge-tile"] = dataclasses.replace(
        mambaic, width=8192, height=8192, tile_width=8192, tile_height=8192
    )
    files["v2-4096x2048-header-only"] = retiled(mambaic, 4096, 2048, 4096)
    # 5929 one-pixel tiles, each a whole 64x64 decode inside the codec (about 15 minutes before it was refused)
    files["v2-77x77-one-pixel-tiles"] = retiled(mambaic, 77, 77, 1)
    files["vqgan-v2-64x64-one-pixel-tiles"] = retiled(vqgan_chunked, 64, 64, 1)
    files["v1-valid"] = version1(mambaic)
    files["v1-4096x2048"] = version1(mambaic, width=4096, height=2048)
    files["v1-8192x8192"] = version1(mambaic, width=8192, height=8192)
    files["v1-shape-rank3"] = version1(mambaic, shape=(65535, mambaic.height, mambaic.width))
    files["v1-shape-rank4"] = version1(mambaic, shape=(1, 3, mambaic.height, mambaic.width))
    files["v1-shape-disagrees"] = version1(mambaic, shape=(mambaic.height * 2, mambaic.width))
    codec_count = sum(s.kind == SectionKind.CODEC for s in mambaic.sections)
    for index in range(codec_count):
        stream = mambaic.codec_sections[index]
        for flips in (1, 3):
            files[f"stream{index}-flip{flips}"] = with_codec_section(
                mambaic, index, Section(flip_bits(stream, rng, flips))
            )
        files[f"stream{index}-cut4"] = with_codec_section(mambaic, index, Section(stream[:-4]))
        files[f"stream{index}-cut-half"] = with_codec_section(mambaic, index, Section(stream[: len(stream) // 2]))
        files[f"stream{index}-plus-word"] = with_codec_section(mambaic, index, Section(stream + bytes(4)))
        files[f"stream{index}-plus-byte"] = with_codec_section(mambaic, index, Section(stream + b"\x01"))
    lost = with_codec_section(vqgan_chunked, 1, Section(lost=True))
    files["vqgan-lost-band"] = lost
    files["vqgan-lost-v2-2048x2048"] = retiled(lost, 2048, 2048, 1024)
    files["vqgan-lost-v1-2048x2048"] = version1(lost, width=2048, height=2048)
    files["vqgan-lost-v1-8192x8192"] = version1(lost, width=8192, height=8192)
    files["vqgan-all-lost"] = with_codec_section(lost, 0, Section(lost=True))
    if len(vqgan_chunked.codec_sections) == 3:  # two index bands, then the colour band
        band = vqgan_chunked.codec_sections[2]
        files["vqgan-colour-lost"] = with_codec_section(vqgan_chunked, 2, Section(lost=True))
        files["vqgan-colour-flip3"] = with_codec_section(vqgan_chunked, 2, Section(flip_bits(band, rng, 3)))
        files["vqgan-colour-cut4"] = with_codec_section(vqgan_chunked, 2, Section(band[:-4]))
        files["vqgan-colour-header-only"] = with_codec_section(vqgan_chunked, 2, Section(band[:6]))
        files["vqgan-colour-v2-2048x2048"] = retiled(vqgan_chunked, 2048, 2048, 1024)
        unflagged = vqgan_chunked.codec_sections[1]
        files["vqgan-colour-flags-disagree"] = with_codec_section(
            vqgan_chunked, 1, Section(bytes([unflagged[0] & 0x7F]) + unflagged[1:])
        )
    alpha = next(s for s in rgba.sections if s.kind == SectionKind.ALPHA)
    others = tuple(s for s in rgba.sections if s.kind != SectionKind.ALPHA)
    files["alpha-trailing-bytes"] = dataclasses.replace(
        rgba, sections=(*others, Section(alpha.data + b"\x00junk", SectionKind.ALPHA))
    )
    files["alpha-bomb"] = dataclasses.replace(
        rgba, sections=(*others, Section(zlib.compress(bytes(1 << 24), 9), SectionKind.ALPHA))
    )
    files["mode-rgba-without-alpha"] = dataclasses.replace(mambaic, mode=Mode.RGBA)
    return files
