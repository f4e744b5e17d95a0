"""Fuzzing real .evc files: every mutation is a clean UserError (or a valid file), never a crash,
hang or big allocation."""

import random
import signal
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from effvision.codecs.container import Container, ContainerError, parse
from effvision.codecs.imagefile import decode_image, encode_image
from effvision.errors import UserError

FIXED_HEADER = 28  # version 2
SECTION_ENTRY = 6


@pytest.fixture(scope="module")
def codecs() -> dict:
    """Two real codecs with random weights: a compressai factorized prior (rANS over a latent) and
    the VQGAN codec (coded index map)."""
    from effvision.codecs.adapters import CompressAIImageCodec
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec
    from tests.codec_factory import image_size_factorized_prior

    torch.manual_seed(0)
    factorized = CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16")
    references = torch.randint(0, SMALL_F16.n_embed, (2, 4, 4))
    vqgan = CompressAIImageCodec(VQGANCodec(SMALL_F16, reference_maps=references), "vqgan", "small")
    return {codec.name: codec for codec in (factorized, vqgan)}


@pytest.fixture(scope="module")
def real_files(codecs) -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (17, 16, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8))
    files = [encode_image(codecs["factorized-test"], image).to_bytes() for image in (rgb, rgba)]
    return [*files, encode_image(codecs["vqgan"], gray).to_bytes(), encode_image(codecs["vqgan"], rgba).to_bytes()]


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (instead of hanging the suite) if one test runs longer than 120 s."""

    def timeout(signum, frame):
        raise TimeoutError("fuzz test hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def header_size(data: bytes) -> int:
    name, config, fingerprint = data[11], data[12], data[13]
    count = struct.unpack_from("<H", data, 22)[0]
    return FIXED_HEADER + name + config + fingerprint + SECTION_ENTRY * count + 4


def with_header_crc(data: bytearray, size: int) -> bytes:
    data[size - 4 : size] = struct.pack("<I", zlib.crc32(bytes(data[: size - 4])))
    return bytes(data)


def header_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width in bytes) of every numeric header field, the section table included."""
    fields = [(8, 1), (9, 1), (10, 1), (11, 1), (12, 1), (13, 1), (14, 2), (16, 2), (18, 2), (20, 2), (22, 2), (24, 2)]
    fields += [(26, 2)]
    table = header_size(data) - 4 - SECTION_ENTRY * struct.unpack_from("<H", data, 22)[0]
    for entry in range(table, header_size(data) - 4, SECTION_ENTRY):
        fields += [(entry, 4), (entry + 4, 1), (entry + 5, 1)]
    return fields


def parse_with_memory_cap(data: bytes) -> Container | None:
    """Parse ``data``; None for a clean ContainerError. Asserts the parser allocated about the file size."""
    tracemalloc.start()
    try:
        return parse(data)
    except ContainerError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * len(data) + 256 * 1024, f"parser peaked at {peak} bytes for a {len(data)}-byte file"


def test_random_bit_flips_are_always_detected(real_files):
    rng = random.Random(1)
    for trial in range(3000):
        data = bytearray(real_files[trial % len(real_files)])
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if bytes(data) in real_files:
            continue
        with pytest.raises(ContainerError):
            parse(bytes(data))


def test_every_truncation_is_detected(real_files):
    for data in real_files:
        for length in range(len(data)):
            with pytest.raises(ContainerError):
                parse(data[:length])


def test_random_byte_overwrites_and_appends_are_detected(real_files):
    rng = random.Random(2)
    for trial in range(1500):
        data = bytearray(real_files[trial % len(real_files)])
        position = rng.randrange(len(data))
        if trial % 3 == 0:
            data[position : position + 4] = rng.randbytes(4)
        elif trial % 3 == 1:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        else:
            del data[position : position + rng.randint(1, 16)]
        if bytes(data) not in real_files:
            with pytest.raises(ContainerError):
                parse(bytes(data))


def test_huge_or_random_header_fields_with_valid_checksum_are_clean_errors(real_files):
    """The checksum is recomputed, so every mutation reaches the validators behind it."""
    rng = random.Random(3)
    parsed = 0
    for trial in range(3000):
        original = real_files[trial % len(real_files)]
        data = bytearray(original)
        offset, width = rng.choice(header_fields(original))
        value = rng.choice([0, 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1), rng.randrange(2 ** (8 * width))])
        data[offset : offset + width] = value.to_bytes(width, "little")
        size = header_size(original)
        if header_size(bytes(data)) == size:
            data = bytearray(with_header_crc(data, size))
        parsed += parse_with_memory_cap(bytes(data)) is not None
    assert parsed < 3000  # most mutations are invalid; some (e.g. a new width) are legal files


def test_every_section_length_set_to_4_gib_is_refused_cheaply(real_files):
    data = bytearray(real_files[0])
    size = header_size(real_files[0])
    count = struct.unpack_from("<H", data, 22)[0]
    for entry in range(size - 4 - SECTION_ENTRY * count, size - 4, SECTION_ENTRY):
        data[entry : entry + 4] = b"\xff\xff\xff\xff"
    assert parse_with_memory_cap(with_header_crc(data, size)) is None


def test_mutated_files_that_still_parse_decode_cleanly(real_files, codecs):
    """Header fields (size, padding, mode, kinds) and payload bytes changed with both checksums fixed:
    decoding gives a UserError or an image of the declared size."""
    rng = random.Random(4)
    decoded = failed = 0
    for trial in range(160):
        original = real_files[trial % len(real_files)]
        data = bytearray(original)
        size = header_size(original)
        if trial % 2:
            offset, width = rng.choice([(10, 1), (14, 2), (16, 2), (18, 2), (20, 2), *header_fields(original)[13:]])
            value = rng.choice([0, 1, 2, 15, 16, 17, 48, rng.randrange(2 ** (8 * width))])
            data[offset : offset + width] = value.to_bytes(width, "little")
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(size, len(data) - 4)] ^= 1 << rng.randrange(8)
            data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[size:-4])))
        if header_size(bytes(data)) != size:
            continue
        container = parse_with_memory_cap(with_header_crc(data, size))
        if container is None:
            continue
        try:
            image = decode_image(container, codecs[container.codec])
        except UserError:
            failed += 1
            continue
        decoded += 1
        assert image.size == (container.width, container.height)
    assert decoded > 0 and failed > 0
