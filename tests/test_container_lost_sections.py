"""Sections marked lost in the container become lost VQGAN index rows that the restorer fills in."""

import dataclasses

import pytest
import torch

from effvision.codecs.adapters import CompressAIImageCodec
from effvision.codecs.container import Section, parse
from effvision.codecs.imagefile import decode_image, encode_image
from effvision.errors import UserError


def vqgan_codec(model, chunks: int) -> CompressAIImageCodec:
    return CompressAIImageCodec(model, "vqgan", "t", compress_kwargs={"chunks": chunks})


@pytest.fixture(scope="module")
def vqgan_model():
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec
    from effvision.codecs.vqgan.restoration import IndexRestorer

    torch.manual_seed(0)
    restorer = IndexRestorer(code_dim=SMALL_F16.embed_dim, dim=32, depth=1, heads=2)
    references = torch.randint(0, SMALL_F16.n_embed, (2, 4, 4))
    return VQGANCodec(SMALL_F16, restorer=restorer, reference_maps=references).eval()


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 48, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_chunked_file_decodes_like_the_single_stream_file(vqgan_model, image):
    single = encode_image(vqgan_codec(vqgan_model, 1), image)
    chunked_codec = vqgan_codec(vqgan_model, 4)
    chunked = parse(encode_image(chunked_codec, image).to_bytes())
    assert len(chunked.codec_sections) == 4  # 4 row bands
    assert decode_image(chunked, chunked_codec).tobytes() == decode_image(single, chunked_codec).tobytes()


def test_lost_section_restores_exactly_its_index_rows(vqgan_model, image, monkeypatch):
    codec = vqgan_codec(vqgan_model, 4)  # 64 px high -> 4 index rows -> one row per band
    container = encode_image(codec, image)
    sections = list(container.sections)
    sections[1] = Section(lost=True)  # the second band
    damaged = parse(dataclasses.replace(container, sections=tuple(sections)).to_bytes())
    seen = []
    original = type(vqgan_model).restore_indices
    monkeypatch.setattr(
        type(vqgan_model), "restore_indices", lambda self, i, lost: seen.append(lost) or original(self, i, lost)
    )
    decoded = decode_image(damaged, codec)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[1] = True
    assert decoded.size == image.size and torch.equal(seen[0][0], expected)


def test_lost_section_without_a_restorer_is_a_user_error(image):
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec

    torch.manual_seed(0)
    codec = vqgan_codec(VQGANCodec(SMALL_F16, reference_maps=torch.zeros(1, 4, 4, dtype=torch.long)).eval(), 2)
    container = encode_image(codec, image)
    sections = (*container.sections[:1], Section(lost=True), *container.sections[2:])
    with pytest.raises(UserError, match="restor"):
        decode_image(dataclasses.replace(container, sections=sections), codec)


def test_codec_without_lost_support_refuses_lost_sections(image):
    from tests.codec_factory import image_size_factorized_prior

    torch.manual_seed(0)
    codec = CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16")
    container = encode_image(codec, image)
    sections = (*container.sections[:1], Section(lost=True))
    with pytest.raises(UserError, match="cannot restore lost sections"):
        decode_image(dataclasses.replace(container, sections=sections), codec)
