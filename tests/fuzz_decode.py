"""Fuzz the .evc decoder: thousands of mutants of fresh encodes, with valid checksums, in one process.

Run as ``python -m tests.fuzz_decode --seed S --count N OUT.json`` (tests/test_decode_fuzz.py runs it twice in
memory-capped child processes). Codecs: MambaIC (test width) and VQGAN (small config, with a restorer), random
weights fixed by a seed, so both processes build the very same codecs. Mutants are made at two levels:

* bytes: 1-8 bit flips anywhere in the payload, or one header/section-table field set to a boundary or random
  value; both CRCs are then recomputed, so the mutant reaches the decoder;
* structure (through :class:`Container`): a codec section cut, extended, duplicated, dropped, swapped, marked
  lost, or the declared image/tile size changed.

Each mutant's outcome is recorded as the SHA-256 of the decoded pixels or ``error:<class>``; the JSON lists them in
order, so two processes can be compared mutant by mutant. ``--memo`` remembers each tile's decode by its exact
input (codec, size, section bytes) within the process, so header-only mutants of one file cost one decode; the
second, verifying process runs without it (``--only`` re-decodes the listed mutants from scratch).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from effvision.codecs.container import ContainerError, Section, SectionKind, parse
from effvision.codecs.imagefile import decode_image, encode_image
from effvision.errors import UserError

FIXED_HEADER = 28
SECTION_ENTRY = 6
#: decoding refuses larger images: keeps the mutants that pass every check cheap to decode.
MAX_PIXELS = 1 << 18


def build_codecs() -> dict:
    from effvision.codecs.adapters import CompressAIImageCodec
    from effvision.codecs.mambaic import MambaIC
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec
    from effvision.codecs.vqgan.restoration import IndexRestorer
    from tests.codec_factory import tiny_mambaic_config

    torch.manual_seed(0)
    mambaic = CompressAIImageCodec(MambaIC(tiny_mambaic_config()), "mambaic", "fuzz", tile_size=64)
    restorer = IndexRestorer(code_dim=SMALL_F16.embed_dim, dim=32, depth=1, heads=2)
    references = torch.randint(0, SMALL_F16.n_embed, (2, 4, 4))
    model = VQGANCodec(SMALL_F16, restorer=restorer, reference_maps=references).eval()
    vqgan = CompressAIImageCodec(model, "vqgan", "fuzz", compress_kwargs={"chunks": 2, "colour": True},
                                tile_size=32)
    return {codec.name: codec for codec in (mambaic, vqgan)}


def seed_files(codecs: dict) -> list[bytes]:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-8, 9, (40, 72, 3)), axis=1)
    rgb = Image.fromarray(np.clip(smooth + 128, 0, 255).astype(np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (20, 18, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (48, 33), dtype=np.uint8))
    files = []
    for codec in codecs.values():
        for image in (rgb, rgba, gray):
            files.append(encode_image(codec, image).to_bytes())
    return files


def header_size(data: bytes) -> int:
    count = struct.unpack_from("<H", data, 22)[0]
    return FIXED_HEADER + data[11] + data[12] + data[13] + SECTION_ENTRY * count + 4


def fix_checksums(data: bytearray) -> bytes:
    size = header_size(data)
    data[size - 4 : size] = struct.pack("<I", zlib.crc32(bytes(data[: size - 4])))
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[size:-4])))
    return bytes(data)


def byte_mutant(original: bytes, rng: random.Random) -> bytes:
    data = bytearray(original)
    size = header_size(original)
    if rng.random() < 0.6 and len(data) > size + 4:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(size, len(data) - 4)] ^= 1 << rng.randrange(8)
    else:
        fields = [(10, 1), (14, 2), (16, 2), (18, 2), (20, 2), (24, 2), (26, 2)]
        table = size - 4 - SECTION_ENTRY * struct.unpack_from("<H", original, 22)[0]
        fields += [(entry + 4, 1) for entry in range(table, size - 4, SECTION_ENTRY)]
        fields += [(entry + 5, 1) for entry in range(table, size - 4, SECTION_ENTRY)]
        offset, width = rng.choice(fields)
        value = rng.choice(
            [0, 1, 2, 3, 16, 31, 32, 63, 64, 65, 255, 2 ** (8 * width) - 1, rng.randrange(2 ** (8 * width))]
        )
        data[offset : offset + width] = value.to_bytes(width, "little")
    return fix_checksums(data)


def structure_mutant(original: bytes, rng: random.Random) -> bytes:
    container = parse(original)
    sections = list(container.sections)
    codec_positions = [i for i, s in enumerate(sections) if s.kind == SectionKind.CODEC]
    index = rng.choice(codec_positions)
    section = sections[index]
    kind = rng.randrange(8)
    changes = {}
    if kind == 0 and section.data:
        sections[index] = dataclasses.replace(section, data=section.data[: rng.randrange(len(section.data))])
    elif kind == 1:
        extra = rng.choice([bytes(rng.randint(1, 9)), rng.randbytes(rng.randint(1, 9))])
        sections[index] = dataclasses.replace(section, data=section.data + extra, lost=False)
    elif kind == 2:
        sections.insert(index, dataclasses.replace(section, tile_start=False))
    elif kind == 3 and len(codec_positions) > 1:
        del sections[index]
    elif kind == 4 and len(codec_positions) > 1:
        other = rng.choice(codec_positions)
        a, b = sections[index], sections[other]
        sections[index] = dataclasses.replace(b, tile_start=a.tile_start)
        sections[other] = dataclasses.replace(a, tile_start=b.tile_start)
    elif kind == 5:
        sections[index] = Section(lost=True, tile_start=section.tile_start)
    elif kind == 6:
        scale = rng.choice([2, 4, 16, 128])
        changes = {"width": min(65535, container.width * scale), "height": min(65535, container.height * scale)}
    else:
        side = rng.choice([1, 16, 32, 48, 64, 128, 4096])
        changes = {"tile_width": side, "tile_height": side}
    try:
        return dataclasses.replace(container, sections=tuple(sections), **changes).to_bytes()
    except (ContainerError, ValueError):
        return original


class MemoCodec:
    """Wraps a codec; ``decode`` is looked up by its exact input before running (a pure function of it)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.cache: dict = {}

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def decode(self, sections, height, width):
        key = (tuple(sections), height, width)
        if key not in self.cache:
            try:
                self.cache[key] = self.codec.decode(sections, height, width)
            except UserError as error:
                self.cache[key] = error
        result = self.cache[key]
        if isinstance(result, UserError):
            raise result
        return result


def outcome(data: bytes, codecs: dict) -> str:
    try:
        container = parse(data)
        codec = codecs.get(container.codec)
        if codec is None:
            return "error:codec"
        image = decode_image(container, codec, max_pixels=MAX_PIXELS)
    except UserError as error:
        return f"error:{type(error).__name__}"
    return hashlib.sha256(image.tobytes() + image.mode.encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--memo", action="store_true", help="decode each distinct tile input once")
    parser.add_argument("--only", help="JSON list of mutant numbers to decode (the others are generated, not decoded)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    codecs = build_codecs()
    files = seed_files(codecs)
    decoders = {name: MemoCodec(codec) for name, codec in codecs.items()} if args.memo else codecs
    only = set(json.loads(args.only)) if args.only else None
    rng = random.Random(args.seed)
    results: dict[int, str] = {}
    for number in range(args.count):
        original = rng.choice(files)
        mutant = byte_mutant(original, rng) if rng.random() < 0.5 else structure_mutant(original, rng)
        if only is None or number in only:
            results[number] = outcome(mutant, decoders)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"seed": args.seed, "outcomes": results, "originals": [outcome(f, codecs) for f in files]}, handle)


if __name__ == "__main__":
    main()
