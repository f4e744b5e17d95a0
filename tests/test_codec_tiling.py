"""Tiled coding (container version 2): independent tiles, limits and memory checks before any work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from effvision.codecs.adapters import CompressAIImageCodec
from effvision.codecs.container import Section, SectionKind, parse
from effvision.codecs.imagefile import ResourceError, decode_image, encode_image, plan_decode
from effvision.errors import UserError
from tests.hostile_files import version1


@pytest.fixture(scope="module")
def codec() -> CompressAIImageCodec:
    from effvision.codecs.mambaic import MambaIC
    from tests.codec_factory import tiny_mambaic_config

    torch.manual_seed(0)
    return CompressAIImageCodec(MambaIC(tiny_mambaic_config()), "mambaic", "tiny", tile_size=64)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()[150:250, 160:300])  # 140 x 100: 3 x 2 tiles of 64


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def test_an_image_within_one_tile_is_coded_exactly_as_untiled(codec, photo):
    small = photo.crop((0, 0, 50, 40))
    container = encode_image(codec, small)
    assert len(container.tiles) == 1
    assert list(container.tiles[0].sections) == codec.encode(as_tensor(small))


def test_every_tile_is_the_codec_applied_to_its_crop_alone(codec, photo):
    container = parse(encode_image(codec, photo).to_bytes())
    tiles = container.tiles
    assert [(t.top, t.left, t.height, t.width) for t in tiles] == [
        (0, 0, 64, 64),
        (0, 64, 64, 64),
        (0, 128, 64, 12),
        (64, 0, 36, 64),
        (64, 64, 36, 64),
        (64, 128, 36, 12),
    ]
    decoded = np.asarray(decode_image(container, codec))
    for tile in tiles:
        crop = photo.crop((tile.left, tile.top, tile.left + tile.width, tile.top + tile.height))
        assert list(tile.sections) == codec.encode(as_tensor(crop))
        alone = np.asarray(decode_image(encode_image(codec, crop), codec))
        assert np.array_equal(decoded[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width], alone)


def test_tiled_coding_is_deterministic(codec, photo):
    first = encode_image(codec, photo).to_bytes()
    assert encode_image(codec, photo).to_bytes() == first
    container = parse(first)
    assert decode_image(container, codec).tobytes() == decode_image(container, codec).tobytes()


def test_a_version_1_file_decodes_like_the_same_streams_in_version_2(codec, photo):
    small = photo.crop((0, 0, 60, 60))
    container = encode_image(codec, small)
    legacy = parse(version1(container).to_bytes())
    assert legacy.version == 1
    assert decode_image(legacy, codec).tobytes() == decode_image(container, codec).tobytes()


def test_tiles_beyond_the_codec_limit_are_refused_at_encode_and_decode(codec, photo):
    with pytest.raises(UserError, match="limit"):
        encode_image(codec, Image.new("RGB", (2100, 2100)), tile_size=4096)  # 2100 x 2100 > 2048 x 2048
    container = encode_image(codec, photo.crop((0, 0, 30, 30)))
    huge = dataclasses.replace(container, width=4096, height=4096, tile_width=4096, tile_height=4096)
    with pytest.raises(UserError, match="limit"):
        plan_decode(parse(huge.to_bytes()), codec)


def test_a_version_1_file_larger_than_the_tile_limit_is_refused_before_decoding(codec, photo, monkeypatch):
    """A version-1 file is one tile: a crafted 50 KB one of 2560 x 2560 with valid streams decoded in 4.4 GB and
    82 s, since the tile limit was checked for version 2 only (here its streams pass by fiat)."""
    container = encode_image(codec, photo.crop((0, 0, 30, 30)))
    monkeypatch.setattr(codec, "check_sections", lambda sections, height, width: None)
    legacy = parse(version1(container, width=2112, height=2112).to_bytes())  # 2112 x 2112 > 2048 x 2048
    with pytest.raises(UserError, match="2112x2112 exceeds .* limit"):
        plan_decode(legacy, codec)
    assert len(plan_decode(parse(version1(container, width=2048, height=2048).to_bytes()), codec)) == 1


def test_a_tile_larger_than_the_image_is_declared_as_the_image(codec, photo):
    container = encode_image(codec, photo, tile_size=4096)
    assert (container.tile_width, container.tile_height) == photo.size and len(container.tiles) == 1
    assert list(container.tiles[0].sections) == codec.encode(as_tensor(photo))


class CountingCodec(CompressAIImageCodec):
    def __init__(self, inner: CompressAIImageCodec) -> None:
        self.__dict__.update(inner.__dict__)
        self.decodes = 0

    def decode(self, sections, height, width):
        self.decodes += 1
        return super().decode(sections, height, width)


def test_max_pixels_is_enforced_before_any_decoding(codec, photo):
    counting = CountingCodec(codec)
    container = encode_image(counting, photo)
    with pytest.raises(UserError, match="max-pixels"):
        decode_image(container, counting, max_pixels=140 * 100 - 1)
    assert counting.decodes == 0
    decode_image(container, counting, max_pixels=140 * 100)
    assert counting.decodes == 6


def test_a_stream_too_short_for_the_declared_size_is_refused_before_decoding(codec, photo):
    counting = CountingCodec(codec)
    container = encode_image(counting, photo.crop((0, 0, 64, 64)))
    sections = list(container.sections) * 16  # 16 tiles of 256 x 256 in a 1024 x 1024 image, each a 64 x 64 tile
    big = dataclasses.replace(
        container, width=1024, height=1024, tile_width=256, tile_height=256, sections=tuple(sections)
    )
    with pytest.raises(UserError, match="hyperprior stream"):
        decode_image(parse(big.to_bytes()), counting)
    assert counting.decodes == 0


def test_more_memory_than_the_machine_has_is_a_resource_error_up_front(codec, photo, monkeypatch):
    import effvision.codecs.imagefile as imagefile

    container = encode_image(codec, photo)
    monkeypatch.setattr(imagefile, "available_memory_bytes", lambda: 10 * 2**20)
    with pytest.raises(ResourceError, match=r"needs about .* GB"):
        plan_decode(container, codec)


def test_a_failed_allocation_is_reported_as_memory_not_as_a_corrupt_file(codec, photo, monkeypatch):
    container = encode_image(codec, photo.crop((0, 0, 30, 30)))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(codec.model, "decompress", out_of_memory)
    with pytest.raises(ResourceError, match="allocation failed") as error:
        decode_image(container, codec)
    assert "corrupt" not in str(error.value)


def test_lost_sections_are_refused_by_a_codec_that_cannot_restore_them(codec, photo):
    container = encode_image(codec, photo.crop((0, 0, 30, 30)))
    sections = list(container.sections)
    sections[3] = Section(lost=True)
    with pytest.raises(UserError, match="lost"):
        decode_image(dataclasses.replace(container, sections=tuple(sections)), codec)


def test_alpha_and_mode_survive_tiling(codec, photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(140, dtype=np.uint8), (100, 1))))
    container = parse(encode_image(codec, rgba).to_bytes())
    assert sum(s.kind == SectionKind.ALPHA for s in container.sections) == 1
    decoded = decode_image(container, codec)
    assert decoded.mode == "RGBA" and decoded.size == rgba.size
    assert np.array_equal(np.asarray(decoded)[..., 3], np.asarray(rgba)[..., 3])


def test_windowed_restoration_bounds_attention_and_keeps_known_indices():
    from effvision.codecs.vqgan.restoration import IndexRestorer

    torch.manual_seed(0)
    restorer = IndexRestorer(code_dim=8, dim=16, depth=1, heads=2).eval()
    codebook = torch.randn(32, 8)
    indices = torch.randint(0, 32, (1, 70, 45))
    lost = torch.zeros(1, 70, 45, dtype=torch.bool)
    lost[:, 10:60, 5:40] = torch.rand(50, 35) < 0.4
    largest = []
    original = restorer.forward
    restorer.forward = lambda i, m, c: largest.append(i.shape[-1] * i.shape[-2]) or original(i, m, c)
    restored = restorer.restore(indices, lost, codebook, window=32, margin=8)
    assert max(largest) <= (32 + 16) ** 2
    assert torch.equal(restored[~lost], indices[~lost])
    assert torch.equal(restorer.restore(indices, lost, codebook, window=32, margin=8), restored)
    small = indices[:, :20, :20]
    assert torch.equal(
        restorer.restore(small, lost[:, :20, :20], codebook, window=32),
        restorer._restore_window(small, lost[:, :20, :20], codebook, 4, "mmse"),
    )


def test_small_tiles_are_coded_on_one_thread_unless_asked_otherwise():
    from effvision.codecs.imagefile import SINGLE_THREAD_PIXELS, codec_threads

    assert codec_threads(32 * 32, 0, 8) == 1
    assert codec_threads(SINGLE_THREAD_PIXELS, 0, 8) == 8
    assert codec_threads(32 * 32, 3, 8) == 3


def test_set_codec_threads_goes_back_to_the_default_after_a_small_file(monkeypatch):
    import effvision.codecs.imagefile as imagefile

    before = torch.get_num_threads()
    monkeypatch.setattr(imagefile, "_torch_default_threads", lambda: 2)
    try:
        imagefile.set_codec_threads(32 * 32)
        assert torch.get_num_threads() == 1
        imagefile.set_codec_threads(2048 * 2048)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class EncodeCountingCodec(CompressAIImageCodec):
    def __init__(self, inner: CompressAIImageCodec) -> None:
        self.__dict__.update(inner.__dict__)
        self.encodes = 0

    def encode(self, x):
        self.encodes += 1
        return super().encode(x)


def test_an_image_wider_than_the_format_is_refused_before_any_tile_is_encoded(codec):
    counting = EncodeCountingCodec(codec)
    with pytest.raises(UserError, match="at most 65535 pixels a side"):
        encode_image(counting, Image.new("RGB", (70000, 1)))
    assert counting.encodes == 0  # before: every tile was encoded, then the container refused the width


def test_more_sections_than_the_format_holds_are_refused_before_the_tiles_are_encoded(codec, monkeypatch):
    import effvision.codecs.imagefile as imagefile

    counting = EncodeCountingCodec(codec)
    image = Image.new("RGB", (64 * 12, 64 * 10), (90, 120, 30))  # 120 tiles of 64
    monkeypatch.setattr(imagefile, "MAX_SECTIONS", 100)  # fewer than the tiles
    with pytest.raises(UserError, match="120 tiles of 64x64 with 1 section"):
        encode_image(counting, image)
    assert counting.encodes == 0
    monkeypatch.setattr(imagefile, "MAX_SECTIONS", 150)  # enough tiles, too few for their sections
    with pytest.raises(UserError, match=r"120 tiles of 64x64 with \d+ section"):
        encode_image(counting, image)
    assert counting.encodes == 1  # the first tile tells how many sections each takes


def test_tiles_smaller_than_the_codecs_padding_are_refused_both_ways(codec, photo):
    """MambaIC pads every tile to a multiple of 64 inside, so a 1x1 tile costs a whole 64x64 decode: a 1 MB file of
    77x77 one-pixel tiles took about 15 minutes to decode. Such tiles are refused when encoding and before any
    decoding; a tile may be smaller only where it spans the whole image (a small image is one tile)."""
    from effvision.codecs.container import ContainerError
    from tests.hostile_files import retiled

    assert codec.min_tile_side == 64
    with pytest.raises(UserError, match="at least 64"):
        encode_image(codec, photo, tile_size=32)
    small = encode_image(codec, photo.crop((0, 0, 50, 40)))  # one 50x40 tile: allowed, it is the whole image
    assert (small.tile_width, small.tile_height) == (50, 40)
    assert np.asarray(decode_image(parse(small.to_bytes()), codec)).shape == (40, 50, 3)
    one_pixel_tiles = parse(retiled(small, 77, 77, 1).to_bytes())
    with pytest.raises(ContainerError, match="at least 64"):
        plan_decode(one_pixel_tiles, codec)
    with pytest.raises(ContainerError, match="at least 64"):  # 50 px tiles are fine only as the whole image
        plan_decode(parse(retiled(small, 120, 200, 50).to_bytes()), codec)
    assert len(plan_decode(parse(retiled(small, 128, 192, 64).to_bytes()), codec)) == 6


def test_a_decoder_that_gives_nan_pixels_is_an_error_not_a_black_image(codec, photo):
    """Finite but huge synthesis weights (x 1e30) overflow to NaN; clamp kept the NaN and the uint8 cast made it 0,
    so decode wrote a black image and exited 0."""
    import copy

    container = parse(encode_image(codec, photo.crop((0, 0, 40, 30))).to_bytes())
    broken = copy.deepcopy(codec)
    with torch.no_grad():
        for name, parameter in broken.model.named_parameters():
            if name.startswith("g_s.") and parameter.dim() == 4:
                parameter.mul_(1e30)
    broken.fingerprint = codec.fingerprint  # the same file, decoded by the broken weights
    with pytest.raises(UserError, match="NaN or infinite pixels"):
        decode_image(container, broken)
