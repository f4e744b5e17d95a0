"""Sections marked lost in the container become lost VQGAN indices that the restorer fills in."""

import dataclasses

import pytest
import torch

from effvision.codecs.adapters import VQGANImageCodec, chunk_sizes
from effvision.codecs.container import Section, parse
from effvision.codecs.imagefile import decode_image, encode_image
from effvision.errors import UserError


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


def test_chunk_sizes_add_up_and_differ_by_at_most_one():
    sizes = chunk_sizes(103, 4)
    assert sizes == [26, 26, 26, 25] and sum(sizes) == 103


def test_chunked_file_decodes_like_the_single_stream_file(vqgan_model, image):
    single = encode_image(VQGANImageCodec(vqgan_model, "vqgan", "t"), image)
    chunked_codec = VQGANImageCodec(vqgan_model, "vqgan", "t", chunks=4)
    chunked = parse(encode_image(chunked_codec, image).to_bytes())
    assert len(chunked.codec_sections) == 5  # latent shape + 4 index chunks
    assert decode_image(chunked, chunked_codec).tobytes() == decode_image(single, chunked_codec).tobytes()


def test_lost_chunk_marks_its_indices_lost_and_restores_them(vqgan_model, image, monkeypatch):
    from effvision.codecs.vqgan.index_coding import lost_positions

    codec = VQGANImageCodec(vqgan_model, "vqgan", "t", chunks=4)
    container = encode_image(codec, image)
    sections = list(container.sections)
    sections[2] = Section(lost=True)  # the second index chunk
    damaged = parse(dataclasses.replace(container, sections=tuple(sections)).to_bytes())
    seen = []
    original = type(vqgan_model).restore_indices
    monkeypatch.setattr(
        type(vqgan_model), "restore_indices", lambda self, i, lost: seen.append(lost) or original(self, i, lost)
    )
    decoded = decode_image(damaged, codec)
    stream_sizes = [len(section.data) for section in container.sections[1:]]
    start = stream_sizes[0]
    expected = lost_positions(4, 3, vqgan_model.codebook_size, [(start, start + stream_sizes[1])])
    assert decoded.size == image.size
    assert torch.equal(seen[0][0], expected) and expected.any()


def test_lost_chunk_without_a_restorer_is_a_user_error(image):
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec

    torch.manual_seed(0)
    codec = VQGANImageCodec(VQGANCodec(SMALL_F16).eval(), "vqgan", "t", chunks=3)
    container = encode_image(codec, image)
    sections = (*container.sections[:1], Section(lost=True), *container.sections[2:])
    with pytest.raises(UserError, match="restor"):
        decode_image(dataclasses.replace(container, sections=sections), codec)
