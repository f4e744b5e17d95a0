"""Encoder-side index refinement (VQGAN ``--effort``): never worse than the encoder, same decoder and format."""

import pytest
import torch

from effvision.codecs.metrics import ms_ssim_loss
from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.model import VQGANCodec
from effvision.codecs.vqgan.refine import L1_WEIGHT, MSSSIM_WEIGHT, frozen
from effvision.errors import UserError

TINY = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=64, name="tiny")


@pytest.fixture(scope="module")
def codec() -> VQGANCodec:
    torch.manual_seed(0)
    return VQGANCodec(TINY, reference_maps=torch.randint(0, 64, (6, 4, 4))).eval()


def image_loss(codec: VQGANCodec, x: torch.Tensor, indices: torch.Tensor) -> float:
    decoded = codec.decode_indices(indices, x.shape[-2:])
    return float(L1_WEIGHT * (decoded - x).abs().mean() + MSSSIM_WEIGHT * ms_ssim_loss(x, decoded))


def photo_like(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(96, 128), mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.rand(1, 3, 96, 128, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_refined_indices_lower_the_loss_and_never_raise_it(codec, seed):
    x = photo_like(seed)
    encoder = codec.encode_indices(x)
    refined = codec.refine_indices(x, steps=8)
    assert refined.shape == encoder.shape and refined.dtype == encoder.dtype
    assert int(refined.max()) < codec.codebook_size
    assert image_loss(codec, x, refined) <= image_loss(codec, x, encoder) + 1e-6
    assert not torch.equal(refined, encoder)  # eight steps on random weights always find a better map


def test_zero_steps_are_the_encoders_indices(codec):
    x = photo_like(2)
    assert torch.equal(codec.refine_indices(x, steps=0), codec.encode_indices(x))


def test_effort_keeps_the_weights_and_their_gradient_flags(codec):
    before = {name: p.detach().clone() for name, p in codec.named_parameters()}
    codec.vq.decoder.conv_out.weight.requires_grad_(False)
    try:
        out = codec.compress(photo_like(3), effort=3, colour=True)
        assert not codec.vq.decoder.conv_out.weight.requires_grad
        assert codec.vq.encoder.conv_in.weight.requires_grad
    finally:
        codec.vq.decoder.conv_out.weight.requires_grad_(True)
    assert all(torch.equal(before[name], p) for name, p in codec.named_parameters())
    assert all(p.grad is None for p in codec.parameters())
    x_hat = codec.decompress(out["strings"], out["shape"])["x_hat"]
    assert x_hat.shape == (1, 3, 96, 128)


def test_a_refined_file_decodes_to_the_refined_indices(codec):
    x = photo_like(4)
    out = codec.compress(x, effort=4)
    assert torch.equal(codec.decompress_indices(out["strings"], out["shape"]), codec.refine_indices(x, steps=4))


@pytest.mark.parametrize("effort", [-1, 1.5])
def test_a_bad_effort_is_a_clear_error(codec, effort):
    with pytest.raises(UserError, match="effort"):
        codec.compress(photo_like(5), effort=effort)


def test_frozen_restores_flags_after_an_error():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError), frozen(layer):
        assert not layer.weight.requires_grad
        raise RuntimeError("boom")
    assert layer.weight.requires_grad and layer.bias.requires_grad


def test_the_image_codec_offers_effort_for_vqgan():
    from effvision.codecs.adapters import CompressAIImageCodec

    torch.manual_seed(1)
    model = VQGANCodec(TINY, reference_maps=torch.randint(0, 64, (6, 4, 4))).eval()
    image_codec = CompressAIImageCodec(model, "vqgan", "t", compress_kwargs={"colour": True}, tile_size=256)
    refined = image_codec.with_effort(2)
    assert refined.compress_kwargs == {"colour": True, "effort": 2}
    sections = refined.encode(photo_like(6)[0])
    assert refined.decode(sections, 96, 128).shape == (3, 96, 128)


def test_refinement_shows_a_step_bar_only_when_asked(codec, capsys):
    from effvision.codecs.progress import show_refinement_progress

    x = photo_like(5)
    codec.refine_indices(x, steps=3)
    assert capsys.readouterr().err == ""  # library calls stay silent
    with show_refinement_progress():
        refined = codec.refine_indices(x, steps=3)
    bar = capsys.readouterr().err
    assert "refine indices" in bar and "/3 [" in bar  # a bar over the 3 steps (its refresh is timed)
    with show_refinement_progress(False):
        assert torch.equal(codec.refine_indices(x, steps=3), refined)  # the bar changes nothing else
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 2)])
def test_a_tile_thinner_than_ms_ssim_allows_is_refined_on_l1(codec, size):
    """The last tile of a 1025 px wide photo is 1 px wide: refinement failed ("MS-SSIM needs at least 3x3
    pixels"), and so did ``encode --codec vqgan --effort 1`` of a 1x1 image."""
    x = photo_like(5)[..., :size[0], :size[1]].contiguous()
    out = codec.compress(x, effort=2)
    assert codec.decompress(out["strings"], out["shape"])["x_hat"].shape[-2:] == size


def test_bars_update_sparsely_when_stderr_is_no_terminal():
    """Piped or logged, each tile/step update was another carriage-return line mixed into the results."""
    from effvision.codecs.progress import refinement_steps, show_refinement_progress, tiles_bar

    bar = tiles_bar(4, "decode", show=True)  # pytest's stderr is no terminal
    assert not bar.disable and bar.mininterval == 30.0
    bar.close()
    with show_refinement_progress():
        steps = refinement_steps(3, "refine")
        assert not steps.disable and steps.mininterval == 30.0
        steps.close()
