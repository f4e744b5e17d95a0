"""Mutated image files through :func:`effvision.image_io.open_image`: each ends in an image or a UserError.

Every image a user passes may be crafted. Valid files of every format read (PNG, JPEG, TIFF, WebP, GIF, BMP,
PPM, AVIF; several modes and compressions) get random byte edits, overwrites, deletions and insertions. A
mutant that Pillow or its C libraries fail on in another way (libavif's RuntimeError was one) would reach the
user as a traceback. Run under an address-space cap (4 GiB above the test process's), so a mutant that asks
for gigabytes fails here too.
"""

import io
import resource

import numpy as np
import pytest
from PIL import Image

from effvision.errors import UserError
from effvision.image_io import open_image, to_rgb_array

SEEDS = [("PNG", {}, "RGB"), ("PNG", {}, "P"), ("PNG", {}, "LA"), ("JPEG", {"quality": 80}, "RGB"),
         ("JPEG", {"progressive": True}, "RGB"), ("TIFF", {}, "RGB"), ("TIFF", {"compression": "tiff_lzw"}, "RGB"),
         ("TIFF", {"compression": "tiff_deflate"}, "L"), ("WEBP", {}, "RGB"), ("WEBP", {"lossless": True}, "RGBA"),
         ("GIF", {}, "P"), ("BMP", {}, "RGB"), ("PPM", {}, "RGB"), ("AVIF", {}, "RGB")]
MUTANTS_PER_SEED = 300


def seed_file(fmt: str, options: dict, mode: str) -> bytes:
    pixels = (np.mgrid[0:48, 0:64][0][..., None] * [3, 5, 7] % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **options)
    return buffer.getvalue()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 8))):
        kind, at = int(rng.integers(0, 4)), int(rng.integers(0, max(1, len(data))))
        if kind == 0:
            data[at:at + 1] = bytes([int(rng.integers(0, 256))])
        elif kind == 1:  # a 32-bit field: sizes, counts, offsets
            data[at:at + 4] = int(rng.integers(0, 2**32)).to_bytes(4, "big")
        elif kind == 2:
            del data[at:at + int(rng.integers(1, 64))]
        else:
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(data)


def address_space_in_use() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


@pytest.fixture
def capped_memory():
    """At most 4 GiB more address space than this test process already has, while a test runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = address_space_in_use() + (4 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(("fmt", "options", "mode"), SEEDS, ids=[f"{f}-{m}-{len(o)}" for f, o, m in SEEDS])
def test_every_mutant_is_an_image_or_a_user_error(fmt, options, mode, capped_memory):
    original = seed_file(fmt, options, mode)
    rng = np.random.default_rng(SEEDS.index((fmt, options, mode)))
    decoded = 0
    for _ in range(MUTANTS_PER_SEED):
        try:
            to_rgb_array(open_image(mutate(original, rng)))
            decoded += 1
        except UserError:
            pass
    assert decoded < MUTANTS_PER_SEED  # the mutations do break files
