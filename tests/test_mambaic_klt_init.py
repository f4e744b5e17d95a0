"""scripts/init_mambaic_klt.py: MambaIC transforms set to a two-stage KLT, checked against an independent
block-by-block computation of the same projection."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from effvision.codecs.mambaic import CONFIGS, MambaIC
from tests.scripts_loader import load_script

klt = load_script("init_mambaic_klt")

torch.set_num_threads(1)
SMALL = dataclasses.replace(CONFIGS["lite"], hyper_channels=8, context_hidden=(8, 8), attention_dim=8)


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    """(count, 3, size, size) in [0, 1] with photo-like correlations (upsampled noise plus a little fine noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (image + 0.05 * torch.rand(count, 3, size, size, generator=generator)).clamp(0, 1)


def blocks(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3 * size * size): the non-overlapping size x size blocks of (B, 3, H, W), any fixed order."""
    return F.unfold(images, kernel_size=size, stride=size).transpose(1, 2).reshape(-1, 3 * size * size)


def top_projector(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """Orthogonal projector on the span of the top ``count`` eigenvectors of the second moment of ``vectors``."""
    moment = vectors.T.double() @ vectors.double()
    _, eigenvectors = torch.linalg.eigh(moment)
    basis = eigenvectors[:, -count:]
    return basis @ basis.T


@pytest.fixture(scope="module")
def fitted() -> tuple[MambaIC, torch.Tensor, float]:
    torch.manual_seed(0)
    model = MambaIC(SMALL).eval()
    crops = smooth_images(12, 64, seed=1)
    step = klt.quantisation_step(0.0483)
    klt.set_klt_transforms(model, crops, step)
    return model, crops, step


def test_step_follows_lambda() -> None:
    assert klt.quantisation_step(0.0483) == pytest.approx(0.0909, abs=5e-4)
    # four times lambda: half the step (the slope condition is step^2 * lambda = constant)
    assert klt.quantisation_step(4 * 0.013) == pytest.approx(klt.quantisation_step(0.013) / 2)


def test_reconstruction_is_the_two_stage_projection(fitted) -> None:
    """g_s(g_a(x)) is what the KLT computed block by block gives: project each 8x8 block (mean colour removed) on
    its top 48 components, then each 16x16 block's four 48-vectors on their top M components."""
    model, crops, _ = fitted
    mean = crops.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    test = smooth_images(2, 64, seed=2)
    with torch.no_grad():
        got = model.g_s(model.g_a(test))

    # the reference works in 8x8-block coordinates of its own (unfold order), fitted on the same crops
    def coefficients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eight = F.unfold(images - mean, kernel_size=8, stride=8)  # (B, 192, L)
        return eight, basis8.T.float() @ eight  # (B, 48, L)

    _, basis8 = torch.linalg.eigh(blocks(crops - mean, 8).T.double() @ blocks(crops - mean, 8).double())
    basis8 = basis8[:, -48:]
    _, first = coefficients(crops)
    grid = crops.shape[-1] // 8
    # group the 48-vectors of each 2x2 of 8x8 blocks into one 192-vector
    grouped = F.unfold(first.reshape(len(crops), 48, grid, grid), kernel_size=2, stride=2)
    projector16 = top_projector(grouped.transpose(1, 2).reshape(-1, 192), SMALL.latent_channels).float()

    _, first_test = coefficients(test)
    grid_test = test.shape[-1] // 8
    grouped_test = F.unfold(first_test.reshape(len(test), 48, grid_test, grid_test), kernel_size=2, stride=2)
    kept = projector16 @ grouped_test  # (B, 192, L16)
    first_back = F.fold(kept, output_size=(grid_test, grid_test), kernel_size=2, stride=2).reshape(len(test), 48, -1)
    eight_back = basis8.float() @ first_back
    expected = F.fold(eight_back, output_size=test.shape[-2:], kernel_size=8, stride=8) + mean

    assert got.shape == test.shape
    assert torch.allclose(got, expected, atol=2e-4), float((got - expected).abs().max())
    # and it is a useful transform: far better than the mean colour alone
    error = float(F.mse_loss(got, test))
    assert -10 * math.log10(error) > -10 * math.log10(float(F.mse_loss(mean.expand_as(test), test))) + 10


def test_latents_are_orthonormal_coefficients_over_step(fitted) -> None:
    """Rounding y is uniform quantisation with ``step``: g_a's last layer has orthonormal rows / step."""
    model, _, step = fitted
    last = [m for m in model.g_a if isinstance(m, torch.nn.Conv2d)][-1].weight
    rows = last.reshape(last.shape[0], -1).double()
    assert torch.allclose(rows @ rows.T * step**2, torch.eye(len(rows), dtype=torch.float64), atol=1e-5)


def test_vss_branches_and_latent_residual_start_at_zero(fitted) -> None:
    model, _, _ = fitted
    for module in (*model.g_a, *model.g_s):
        if hasattr(module, "op"):
            assert not module.op.out_proj.weight.any()
    for context in model.slices:
        assert not context.lrp_transform[-1].weight.any() and not context.lrp_transform[-1].bias.any()


def test_entropy_training_leaves_the_transforms_alone(fitted) -> None:
    model, crops, _ = fitted
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("g_a.", "g_s."))}
    lrp_before = {k: v.clone() for k, v in model.state_dict().items() if ".lrp_transform." in k}
    hyper_before = model.h_a[0].weight.detach().clone()
    with torch.no_grad():
        latents = model.g_a(crops)
    history = klt.train_entropy_model(model, latents, steps=3, batch_size=2, crop=4, lr=1e-3, final_lr=1e-4, seed=0)
    model.eval()
    assert len(history) == 3 and all(math.isfinite(b) and b > 0 for b in history)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert all(torch.equal(state[k], v) for k, v in lrp_before.items())
    assert not torch.equal(model.h_a[0].weight, hyper_before)
    assert isinstance(model.g_s, torch.nn.Sequential)  # the synthesis is put back
    assert all(p.requires_grad for p in model.parameters())
    # a time cap ends the run after the step in progress
    capped = klt.train_entropy_model(model, latents, steps=50, batch_size=2, crop=4, lr=1e-3, final_lr=1e-4, seed=1,
                                     max_seconds=0.0)
    assert len(capped) == 1


def test_refuses_configs_it_cannot_hold() -> None:
    narrow = MambaIC(dataclasses.replace(SMALL, transform_channels=16))
    with pytest.raises(ValueError, match="transform_channels"):
        klt.set_klt_transforms(narrow, smooth_images(2, 32, seed=0), 0.1)


def test_best_gaussian_scale_recovers_a_known_scale() -> None:
    generator = torch.Generator().manual_seed(3)
    sigmas = torch.tensor([0.5, 2.0, 7.0])
    latents = torch.randn(40, 3, 16, 16, generator=generator) * sigmas[None, :, None, None]
    scales = klt.best_gaussian_scales(latents)
    # the grid is 96 log steps over at most 0.11..~60 (under 7% apart); the model integrates each unit bin, so
    # the rounding needs no correction
    assert torch.allclose(scales, sigmas, rtol=0.08)
    # not the RMS of the rounded values, which rounding inflates at small scales (0.5 -> about 0.57)
    rounded_rms = latents[:, 0].round().pow(2).mean().sqrt()
    assert abs(scales[0] - 0.5) < 0.5 * abs(rounded_rms - 0.5)


def test_factorized_start_codes_every_position_with_its_channel_scale(fitted) -> None:
    """Whatever the hyperprior and the spatial context say, every slice starts at mean 0 and its channels' fitted
    scales, for anchors and non-anchors alike; the rate of the whole model is then the factorized Gaussian's."""
    model, crops, _ = fitted
    model = copy.deepcopy(model)
    with torch.no_grad():
        latents = model.g_a(crops)
        klt.set_factorized_entropy_start(model, latents)
        scales = klt.best_gaussian_scales(latents)
        out = model._forward_from_latents(latents, model.h_a(latents), crops.shape[-2:], relaxed=False)
    normal = torch.distributions.Normal(0.0, scales.clamp_min(0.11)[None, :, None, None])
    y_hat = latents.round()
    expected = normal.cdf(y_hat + 0.5) - normal.cdf(y_hat - 0.5)
    assert torch.allclose(out["likelihoods"]["y"], expected.clamp_min(1e-9), atol=1e-5)
    assert torch.equal(out["y_hat"], y_hat)  # means 0 and no latent residual: y_hat is round(y)
