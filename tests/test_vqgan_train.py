"""VQGAN autoencoder training: the optional MS-SSIM term really enters the loss; decoder-only training keeps
what the encoder sends."""

import copy

import numpy as np
import pytest
import torch

from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.taming import VQModel
from effvision.codecs.vqgan.train import RandomCrops, TrainSettings, train_autoencoder

TINY = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=32, name="tiny")


def _trained(model: VQModel, msssim_weight: float, **options) -> dict[str, torch.Tensor]:
    photo = np.random.default_rng(0).integers(0, 256, (192, 192, 3), dtype=np.uint8)
    model = copy.deepcopy(model)
    settings = TrainSettings(steps=2, batch_size=1, lr=1e-3, msssim_weight=msssim_weight,
                             **{"restart_dead_every": 0, **options})
    stats = train_autoencoder(model, RandomCrops([photo], crop=176, seed=0), settings)
    assert stats["step"] == 2 and np.isfinite(stats["l1"])
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_msssim_weight_changes_the_update_and_zero_weight_is_plain_l1():
    torch.manual_seed(0)
    model = VQModel(TINY)
    plain, again = _trained(model, 0.0), _trained(model, 0.0)
    weighted = _trained(model, 1.0)
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert any(not torch.allclose(plain[k], weighted[k]) for k in plain if plain[k].is_floating_point())


def test_decoder_mode_trains_only_the_decoder_side_and_the_colour_band_loss_changes_it():
    torch.manual_seed(0)
    model = VQModel(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # reseeding asked for, but a frozen codebook must stay as it is
    decoder = _trained(model, 1.0, mode="decoder", restart_dead_every=1)
    banded = _trained(model, 1.0, mode="decoder", colour_band_loss=True)
    for key, value in decoder.items():
        sent = key.startswith(("encoder.", "quant_conv.", "quantize."))
        assert torch.equal(value, before[key]) == sent or not value.is_floating_point(), key
    assert any(not torch.allclose(decoder[k], banded[k]) for k in decoder if k.startswith("decoder."))


def test_decoder_training_on_other_codebooks_uses_them_and_needs_decoder_mode():
    torch.manual_seed(0)
    model = VQModel(TINY)
    photo = np.random.default_rng(0).integers(0, 256, (192, 192, 3), dtype=np.uint8)
    small = type(model.quantize)(4, TINY.embed_dim)  # a 4-entry codebook, as VQGANCodec.cluster makes
    crops = RandomCrops([photo], crop=176, seed=0)
    with pytest.raises(ValueError, match="mode='decoder'"):
        train_autoencoder(copy.deepcopy(model), crops, TrainSettings(steps=1, batch_size=1), quantizers=[small])
    settings = TrainSettings(steps=2, batch_size=1, lr=1e-3, mode="decoder", restart_dead_every=0)
    own = copy.deepcopy(model)
    stats = train_autoencoder(own, RandomCrops([photo], crop=176, seed=0), settings, quantizers=[small])
    assert stats["codes_used"] <= 4  # every index came from the 4-entry codebook
    plain = copy.deepcopy(model)
    train_autoencoder(plain, RandomCrops([photo], crop=176, seed=0), settings)
    assert not torch.allclose(own.decoder.conv_out.weight, plain.decoder.conv_out.weight)
    assert torch.equal(own.quantize.embedding.weight, model.quantize.embedding.weight)
