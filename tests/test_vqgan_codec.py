"""The VQGAN codec's compressai contract: real bitstreams, any image size, clear errors."""

import math

import pytest
import torch

from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.index_coding import HEADER, CorruptStreamError
from effvision.codecs.vqgan.model import VQGANCodec
from effvision.codecs.vqgan.restoration import IndexRestorer
from effvision.errors import UserError
from tests.test_mambaic_codec import BAD_IMAGES

TINY = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=64, name="tiny")


@pytest.fixture(scope="module")
def codec() -> VQGANCodec:
    torch.manual_seed(0)
    return VQGANCodec(TINY, restorer=IndexRestorer(8, dim=32, depth=1, heads=2),
                      reference_maps=torch.randint(0, 64, (6, 4, 4))).eval()


@pytest.mark.parametrize("size", [(16, 16), (37, 50), (64, 17)])
def test_any_image_size_round_trips_to_the_same_size(codec, size):
    x = torch.rand(2, 3, *size)
    out = codec.compress(x)
    assert out["shape"] == size and len(out["strings"][0]) == 2
    x_hat = codec.decompress(out["strings"], out["shape"])["x_hat"]
    assert x_hat.shape == x.shape and 0 <= float(x_hat.min()) and float(x_hat.max()) <= 1


def test_decoded_image_equals_decoding_the_encoder_indices(codec):
    x = torch.rand(1, 3, 40, 33)
    out = codec.compress(x)
    expected = codec.decode_indices(codec.encode_indices(x), (40, 33))
    assert torch.equal(codec.decompress(out["strings"], out["shape"])["x_hat"], expected)


def test_fixed_length_bitstream_size_is_log2_k_bits_per_index(codec):
    x = torch.rand(1, 3, 48, 64)  # 3 x 4 = 12 indices, log2(64) = 6 bits each
    stream = codec.compress(x, coder="fixed")["strings"][0][0]
    assert len(stream) == HEADER.size + math.ceil(12 * 6 / 8)


def test_forward_gives_reconstruction_and_index_likelihoods(codec):
    out = codec(torch.rand(2, 3, 32, 40))
    assert out["x_hat"].shape == (2, 3, 32, 40)
    likelihoods = out["likelihoods"]["indices"]
    assert likelihoods.shape == (2, 2, 3) and bool(((likelihoods > 0) & (likelihoods <= 1)).all())


@pytest.mark.parametrize("size", [(15, 40), (40, 8), (1, 1)])
def test_image_smaller_than_one_cell_is_padded_and_round_trips(codec, size):
    out = codec.compress(torch.rand(1, 3, *size))
    x_hat = codec.decompress(out["strings"], out["shape"])["x_hat"]
    assert x_hat.shape == (1, 3, *size) and bool(torch.isfinite(x_hat).all())


def test_empty_image_is_a_clear_error(codec):
    with pytest.raises(UserError, match="at least one pixel"):
        codec.compress(torch.rand(1, 3, 0, 16))


def test_corrupt_stream_is_a_clear_error(codec):
    out = codec.compress(torch.rand(1, 3, 64, 64))
    damaged = bytearray(out["strings"][0][0])
    damaged[-1] ^= 0xFF
    with pytest.raises(CorruptStreamError):
        codec.decompress([[bytes(damaged)]], out["shape"])


def test_lost_indices_are_restored_and_known_ones_kept(codec):
    x = torch.rand(1, 3, 64, 64)
    out = codec.compress(x, coder="fixed")
    lost = torch.zeros(4, 4, dtype=torch.bool)
    lost[1:3, 1:3] = True
    indices = codec.decompress_indices(out["strings"], out["shape"], lost=lost)
    original = codec.encode_indices(x)
    assert torch.equal(indices[0][~lost], original[0][~lost])
    assert int(indices.max()) < 64


def test_lost_mask_of_the_wrong_shape_is_a_clear_error(codec):
    out = codec.compress(torch.rand(1, 3, 64, 64))
    with pytest.raises(UserError, match="lost mask"):
        codec.decompress(out["strings"], out["shape"], lost=torch.zeros(3, 3, dtype=torch.bool))


def test_unknown_coder_is_a_clear_error(codec):
    with pytest.raises(UserError, match="unknown index coder"):
        codec.compress(torch.rand(1, 3, 16, 16), coder="huffman")


def test_save_and_load_give_identical_bitstreams_and_images(codec, tmp_path):
    codec.save(tmp_path / "codec.safetensors", dtype=torch.float32)
    loaded = VQGANCodec.load(tmp_path / "codec.safetensors")
    x = torch.rand(1, 3, 48, 48)
    out = codec.compress(x)
    assert loaded.compress(x)["strings"] == out["strings"]
    assert torch.equal(loaded.decompress(out["strings"], out["shape"])["x_hat"],
                       codec.decompress(out["strings"], out["shape"])["x_hat"])


def test_loading_a_file_that_is_not_a_codec_is_a_clear_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="(cannot read VQGAN weights|is not a safetensors file)"):
        VQGANCodec.load(tmp_path / "junk.safetensors")


def test_chunked_streams_decode_to_the_same_image(codec):
    x = torch.rand(1, 3, 80, 48)  # 5 index rows -> bands of 1, 2, 2 rows
    whole = codec.compress(x)
    chunked = codec.compress(x, chunks=3)
    assert len(chunked["strings"]) == 3
    assert torch.equal(codec.decompress(chunked["strings"], chunked["shape"])["x_hat"],
                       codec.decompress(whole["strings"], whole["shape"])["x_hat"])


def test_a_lost_chunk_is_restored_from_per_chunk_flags(codec):
    x = torch.rand(1, 3, 80, 48)
    out = codec.compress(x, chunks=3)
    strings = [out["strings"][0], [b""], out["strings"][2]]
    indices = codec.decompress_indices(strings, out["shape"], lost=[False, True, False])
    original = codec.encode_indices(x)
    assert torch.equal(indices[:, :1], original[:, :1]) and torch.equal(indices[:, 3:], original[:, 3:])
    assert indices.shape == original.shape and int(indices.max()) < codec.codebook_size


def test_a_lost_chunk_without_a_restorer_is_a_clear_error():
    plain = VQGANCodec(TINY).eval()
    out = plain.compress(torch.rand(1, 3, 32, 32), coder="fixed", chunks=2)
    with pytest.raises(UserError, match="no restoration model"):
        plain.decompress([out["strings"][0], [b""]], out["shape"], lost=[False, True])


def test_coding_tile_size_survives_save_load_and_clustering(codec, tmp_path):
    tiled = VQGANCodec(TINY, vqmodel=codec.vq, reference_maps=codec.reference_maps, tile_size=32)
    tiled.save(tmp_path / "tiled.safetensors", dtype=torch.float32)
    loaded = VQGANCodec.load(tmp_path / "tiled.safetensors")
    assert loaded.tile_size == 32
    assert loaded.cluster(16).tile_size == 32
    codec.save(tmp_path / "whole.safetensors", dtype=torch.float32)
    assert VQGANCodec.load(tmp_path / "whole.safetensors").tile_size is None


@pytest.mark.parametrize("tile_size", [0, 24, 4096, 32.0])
def test_a_tile_size_that_is_not_a_multiple_of_the_cell_is_refused(codec, tile_size):
    with pytest.raises(UserError, match="tile size must be a multiple of 16"):
        VQGANCodec(TINY, vqmodel=codec.vq, tile_size=tile_size)


def test_non_integer_tile_size_metadata_is_a_clear_error(codec, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "codec.safetensors"
    VQGANCodec(TINY, vqmodel=codec.vq, tile_size=32).save(path, dtype=torch.float32)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for bad in ("1e9", "9" * 5000, "\u0663\u0662"):  # a float, a 5000-digit number, Arabic-Indic digits
        save_file(load_file(path), path, metadata={**metadata, "tile_size": bad})
        with pytest.raises(UserError, match="tile_size metadata must be an integer"):
            VQGANCodec.load(path)


def test_the_loader_codes_in_the_weights_tile_size(codec, tmp_path):
    """A weights file trained at 32 px codes a 64x48 image as four independent 32 px tiles, and decodes it."""
    from PIL import Image

    from effvision.codecs.adapters import load_vqgan
    from effvision.codecs.container import Container
    from effvision.codecs.imagefile import decode_image, encode_image

    path = tmp_path / "tiled.safetensors"
    VQGANCodec(TINY, vqmodel=codec.vq, reference_maps=codec.reference_maps, tile_size=32).save(path)
    loaded = load_vqgan(checkpoint=path)
    assert loaded.tile_size == 32
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy())
    container = encode_image(loaded, image)
    assert (container.tile_width, container.tile_height) == (32, 32)
    assert sum(section.tile_start for section in container.sections) == 4
    assert decode_image(Container.from_bytes(container.to_bytes()), loaded).size == (64, 48)


def test_tiles_whose_index_maps_hold_one_or_two_indices_encode_and_decode(tmp_path):
    """A 60x40 photo in 24 px tiles gives 2 x 1 and 1 x 2 index maps. compressai's rANS encoder corrupted the
    heap on such short streams ("double free or corruption", the process aborted); run in a child process so
    that a regression fails this test instead of killing the test run."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    image = tmp_path / "small.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(image)
    for tile in ("16", "24", "32"):
        coded, decoded = tmp_path / f"t{tile}.evc", tmp_path / f"t{tile}.png"
        run = subprocess.run([sys.executable, "-m", "effvision", "encode", str(image), "-o", str(coded), "--codec",
                              "vqgan", "--tile-size", tile], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        run = subprocess.run([sys.executable, "-m", "effvision", "decode", str(coded), "-o", str(decoded)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert Image.open(decoded).size == (60, 40)


@pytest.mark.parametrize(("images", "error", "message"), BAD_IMAGES)
def test_compress_refuses_what_is_not_a_batch_of_images_in_unit_range(codec, images, error, message):
    """Before: NaN images coded silently into a valid file of garbage; 0..255 input coded as another image."""
    with pytest.raises(error, match=message):
        codec.compress(images())


def test_state_dict_round_trips_into_a_fresh_codec_and_refits_its_index_model(codec):
    """reference_maps has the shape of the maps it holds: a fresh codec refused another's state dict ("size
    mismatch for reference_maps"), and a load of same-shaped maps kept coding with the previous index model."""
    fresh = VQGANCodec(TINY, restorer=IndexRestorer(8, dim=32, depth=1, heads=2)).eval()
    fresh.load_state_dict(codec.state_dict())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert fresh.compress(x)["strings"] == codec.compress(x)["strings"]
    other = dict(codec.state_dict(), reference_maps=torch.zeros(6, 4, 4, dtype=torch.long))
    fresh.load_state_dict(other)  # every reference index 0: the refitted model makes index 0 cheap
    assert fresh.index_model.probabilities()[:, 0].min() > codec.index_model.probabilities()[:, 0].max()
    with pytest.raises(ValueError, match=r"codebook indices in \[0, 64\)"):
        fresh.load_state_dict(dict(other, reference_maps=torch.full((1, 2, 2), 64)))


def test_a_state_of_another_codebook_size_fails_and_leaves_the_reference_maps(codec):
    """The maps were loaded first: the model was left holding another codebook's indices, and the error was
    "reference_maps must hold codebook indices in [0, 16)"."""
    clustered = codec.cluster(16)
    before = clustered.reference_maps.clone()
    with pytest.raises(RuntimeError, match="reference_maps: they index a codebook of 64 entries, this model's has 16"):
        clustered.load_state_dict(codec.state_dict())
    assert torch.equal(clustered.reference_maps, before)


def test_a_restorer_state_into_a_codec_without_one_says_how_to_load_it(codec):
    """torch's "Unexpected key(s) restorer.mask_token ..." did not say that the restorer's config is needed."""
    with pytest.raises(RuntimeError, match=r"restorer=IndexRestorer\(\*\*source.restorer.config\)"):
        VQGANCodec(TINY).load_state_dict(codec.state_dict())
    VQGANCodec(TINY).load_state_dict(codec.state_dict(), strict=False)  # non-strict: left out, as torch does


def test_aux_loss_is_a_tensor_and_refinement_works_under_inference_mode(codec):
    """aux_loss() returned the int 0 (no .backward(), no .item()); compress(effort=N) under
    torch.inference_mode() failed as no gradient could be taken."""
    assert isinstance(codec.aux_loss(), torch.Tensor) and float(codec.aux_loss()) == 0.0
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = codec.compress(x, effort=2)["strings"]
    with torch.inference_mode():
        assert codec.compress(x, effort=2)["strings"] == expected
