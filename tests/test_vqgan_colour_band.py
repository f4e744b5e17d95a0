"""The VQGAN's colour band: exact levels through rANS, a real correction, hostile streams refused cleanly."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from effvision.codecs.rans import CorruptStreamError
from effvision.codecs.vqgan import colour_band
from effvision.codecs.vqgan.colour_band import HEADER, decode_colour_band, encode_colour_band, grid_shape
from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.model import COLOUR_FLAG, VQGANCodec
from effvision.codecs.vqgan.restoration import IndexRestorer

TINY = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=64, name="tiny")


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def expected_correction(x, x_hat, factor, step_code):
    """What the decoder must return: the encoder's quantised block means, upsampled, in RGB (test oracle)."""
    step = step_code / 1024
    difference = colour_band._to_ycbcr(x) - colour_band._to_ycbcr(x_hat)
    rows, columns = -(-x.shape[-2] // factor), -(-x.shape[-1] // factor)
    padded = F.pad(difference[None], (0, columns * factor - x.shape[-1], 0, rows * factor - x.shape[-2]),
                   mode="replicate")[0]
    means = padded.reshape(3, rows, factor, columns, factor).mean(dim=(2, 4))
    levels = torch.round(means / step).clamp(-1024, 1024)
    upsampled = F.interpolate(levels[None] * step, size=(rows * factor, columns * factor), mode="bicubic",
                              align_corners=False)[0, :, : x.shape[-2], : x.shape[-1]]
    return torch.einsum("ij,jhw->ihw", colour_band._YCBCR_TO_RGB, upsampled)


@pytest.mark.parametrize(("size", "factor", "step_code"), [((64, 96), 32, 32), ((50, 37), 8, 1), ((300, 200), 64, 255)])
def test_decoder_returns_exactly_the_encoders_quantised_correction(size, factor, step_code):
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    x_hat = (x * 0.3 + smooth_image(*size)).clamp(0, 1)  # step 1/1024 makes levels of hundreds: escape codes
    stream = encode_colour_band(x, x_hat, factor=factor, step_code=step_code)
    correction = decode_colour_band(stream, *size)
    assert correction.shape == (3, *size)
    torch.testing.assert_close(correction, expected_correction(x, x_hat, factor, step_code), atol=1e-5, rtol=0)


def test_a_colour_cast_is_removed_for_a_few_bytes():
    x = torch.rand(3, 256, 384, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    cast = torch.tensor([0.12, -0.05, -0.1])[:, None, None] * smooth_image(256, 384, seed=3)
    x_hat = (x + cast).clamp(0, 1)
    stream = encode_colour_band(x, x_hat)
    corrected = (x_hat + decode_colour_band(stream, 256, 384)).clamp(0, 1)
    error_before = (x_hat - x).pow(2).mean().sqrt()
    error_after = (corrected - x).pow(2).mean().sqrt()
    assert error_after < 0.5 * error_before  # left: the 1/32 quantisation and the block-mean approximation
    assert len(stream) < 120  # 3 x 8 x 12 levels of a smooth field


def test_bad_parameters_are_refused_at_encode():
    x = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="factor"):
        encode_colour_band(x, x, factor=24)
    with pytest.raises(ValueError, match="step"):
        encode_colour_band(x, x, step_code=0)


def valid_stream() -> bytes:
    x = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(4))
    return encode_colour_band(x, x.flip(-1))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:3], "header"),
        (lambda s: bytes([1]) + s[1:], "id"),
        (lambda s: s[:1] + bytes([7]) + s[2:], "block size"),
        (lambda s: s[:1] + bytes([2]) + s[2:], "block size"),
        (lambda s: s[:2] + bytes([0]) + s[3:], "zero"),
        (lambda s: s[:3] + bytes([len(colour_band.SCALES)]) + s[4:], "scale index"),
        (lambda s: s[:-4], None),
        (lambda s: s + bytes(4), None),
        (lambda s: s + b"\x01", "4-byte words"),
        (lambda s: s[: HEADER.size], None),
    ],
)
def test_malformed_streams_are_corrupt_stream_errors(mutate, message):
    with pytest.raises(CorruptStreamError, match=message):
        decode_colour_band(mutate(valid_stream()), 96, 128)


def test_the_stream_cannot_claim_a_larger_image_than_it_codes():
    with pytest.raises(CorruptStreamError):
        decode_colour_band(valid_stream(), 2048, 2048)


def test_random_payloads_decode_or_fail_cleanly_and_stay_in_range():
    stream = valid_stream()
    rng = random.Random(0)
    outcomes = set()
    for _ in range(200):
        mutant = bytearray(stream)
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(HEADER.size, len(mutant))
            mutant[position] = rng.randrange(256)
        try:
            correction = decode_colour_band(bytes(mutant), 96, 128)
        except CorruptStreamError:
            outcomes.add("error")
            continue
        outcomes.add("decoded")
        assert correction.shape == (3, 96, 128) and correction.abs().max() < 4  # levels stay within +-1024 steps
    assert "error" in outcomes


def test_a_huge_escaped_residual_is_refused():
    from compressai.ans import RansEncoder

    rows, columns = grid_shape(32, 32, 32)
    cdfs = [colour_band._cdfs()[0]] * 3
    payload = RansEncoder().encode_with_indexes([5000, 0, 0], [0, 1, 2], cdfs, [len(c) for c in cdfs],
                                                [-colour_band.TAIL] * 3)
    assert rows * columns == 1
    with pytest.raises(CorruptStreamError, match="outside the range"):
        decode_colour_band(HEADER.pack(2, 5, 32, 0, 0, 0) + payload, 32, 32)


# ----------------------------------------------------------------------------------------- in the VQGAN codec
@pytest.fixture(scope="module")
def codec() -> VQGANCodec:
    torch.manual_seed(0)
    return VQGANCodec(TINY, restorer=IndexRestorer(8, dim=32, depth=1, heads=2),
                      reference_maps=torch.randint(0, 64, (6, 4, 4))).eval()


def test_colour_band_is_one_more_string_and_flags_every_index_band(codec):
    x = torch.rand(2, 3, 80, 48)
    plain = codec.compress(x, chunks=2)
    coloured = codec.compress(x, chunks=2, colour=True)
    assert len(coloured["strings"]) == 3
    for plain_chunk, chunk in zip(plain["strings"], coloured["strings"][:2], strict=True):
        for plain_stream, stream in zip(plain_chunk, chunk, strict=True):
            assert stream[0] == plain_stream[0] | COLOUR_FLAG and stream[1:] == plain_stream[1:]
    assert all(stream[0] == colour_band.COLOUR_BAND for stream in coloured["strings"][2])


def test_colour_band_brings_the_decode_closer_and_a_lost_one_gives_the_plain_decode(codec):
    x = smooth_image(96, 128, seed=5)[None].repeat(2, 1, 1, 1)
    plain = codec.compress(x, chunks=2)
    coloured = codec.compress(x, chunks=2, colour=True)
    plain_hat = codec.decompress(plain["strings"], plain["shape"])["x_hat"]
    coloured_hat = codec.decompress(coloured["strings"], coloured["shape"])["x_hat"]
    assert (coloured_hat - x).pow(2).mean() < 0.5 * (plain_hat - x).pow(2).mean()  # random weights: a big cast
    strings = coloured["strings"][:2] + [[b"", b""]]
    lost = codec.decompress(strings, coloured["shape"], lost=[False, False, True])["x_hat"]
    assert torch.equal(lost, plain_hat)


def test_a_lost_index_band_is_still_restored_beside_a_colour_band(codec):
    x = torch.rand(1, 3, 80, 48)
    out = codec.compress(x, chunks=3, colour=True)
    strings = [out["strings"][0], [b""], out["strings"][2], out["strings"][3]]
    x_hat = codec.decompress(strings, out["shape"], lost=[False, True, False, False])["x_hat"]
    assert x_hat.shape == x.shape


def test_flag_without_a_colour_band_or_disagreeing_flags_are_errors(codec):
    x = torch.rand(1, 3, 64, 64)
    out = codec.compress(x, chunks=2, colour=True)
    only_band = [[out["strings"][0][0]]]
    with pytest.raises(CorruptStreamError, match="no other section"):
        codec.check_strings([only_band[0][0]], out["shape"])
    unflagged = bytes([out["strings"][1][0][0] & ~COLOUR_FLAG]) + out["strings"][1][0][1:]
    with pytest.raises(CorruptStreamError, match="disagree"):
        codec.check_strings([out["strings"][0][0], unflagged, out["strings"][2][0]], out["shape"])
    with pytest.raises(CorruptStreamError):  # the colour band's header checked before any decoding
        codec.check_strings([out["strings"][0][0], out["strings"][1][0], b"\x02\x09"], out["shape"])


def test_shipped_codec_files_carry_a_colour_band_and_old_files_still_decode():
    from effvision.codecs.adapters import load_vqgan
    from effvision.codecs.metrics import psnr
    from effvision.codecs.vqgan.demo_data import load_photo

    codec = load_vqgan(quality=2)
    x = torch.from_numpy(load_photo("coffee")[:192, :256].copy()).permute(2, 0, 1).float().div(255)
    sections = codec.encode(x)
    assert len(sections) == 2 and sections[1][0] == colour_band.COLOUR_BAND
    coloured = codec.decode(sections, 192, 256)
    old = codec.model.compress(x[None], coder="learned")["strings"]  # a file written before colour bands
    plain = codec.decode([chunk[0] for chunk in old], 192, 256)
    assert psnr(x, coloured) > psnr(x, plain) + 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_colour_band_round_trips_with_the_codec_on_a_gpu(codec):
    gpu = VQGANCodec(TINY, vqmodel=copy.deepcopy(codec.vq), reference_maps=codec.reference_maps).cuda().eval()
    x = smooth_image(64, 96, seed=6)[None].cuda()
    out = gpu.compress(x, colour=True)
    x_hat = gpu.decompress(out["strings"], out["shape"])["x_hat"]
    cpu_out = codec.compress(x.cpu(), colour=True)
    assert x_hat.device.type == "cuda"
    torch.testing.assert_close(x_hat.cpu(), codec.decompress(cpu_out["strings"], cpu_out["shape"])["x_hat"],
                               atol=2e-2, rtol=0)


def test_index_decoding_skips_the_colour_band_and_a_mixed_batch_is_refused(codec):
    x = torch.rand(2, 3, 64, 80)
    out = codec.compress(x, chunks=2, colour=True)
    assert torch.equal(codec.decompress_indices(out["strings"], out["shape"]), codec.encode_indices(x))
    plain = codec.compress(x[:1], chunks=2)["strings"]
    mixed = [[plain[0][0], out["strings"][0][1]], [plain[1][0], out["strings"][1][1]], [b"", out["strings"][2][1]]]
    with pytest.raises(CorruptStreamError, match="disagree"):
        codec.decompress(mixed, out["shape"])
