"""scripts/train_mambaic_ladder.py's widened(): a trained narrow MambaIC as the start of a wider one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effvision.codecs.mambaic import CONFIGS, MambaIC
from tests.scripts_loader import load_script

ladder = load_script("train_mambaic_ladder")

torch.set_num_threads(1)
NARROW = dataclasses.replace(CONFIGS["lite"], transform_channels=16, hyper_channels=8, context_hidden=(8, 8))
WIDE = dataclasses.replace(NARROW, latent_channels=100)


def randomised(model: MambaIC) -> MambaIC:
    """Non-zero values everywhere (biases start at zero), so a dropped or misplaced copy shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def test_widened_model_reconstructs_and_hyper_codes_exactly_as_the_narrow_one() -> None:
    torch.manual_seed(1)
    narrow = randomised(MambaIC(NARROW))
    wide = ladder.widened(narrow, WIDE).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y_narrow, y_wide = narrow.g_a(x), wide.g_a(x)
        # latent channel j of slice i lands on channel j of the wide slice i
        for narrow_slice, wide_slice in zip(y_narrow.chunk(5, 1), y_wide.chunk(5, 1), strict=True):
            torch.testing.assert_close(wide_slice[:, :10], narrow_slice)
        torch.testing.assert_close(wide.g_s(y_wide), narrow.g_s(y_narrow))
        torch.testing.assert_close(wide.h_a(y_wide), narrow.h_a(y_narrow))
        means_narrow, means_wide = narrow.h_mean_s(narrow.h_a(y_narrow)), wide.h_mean_s(wide.h_a(y_wide))
        for narrow_slice, wide_slice in zip(means_narrow.chunk(5, 1), means_wide.chunk(5, 1), strict=True):
            torch.testing.assert_close(wide_slice[:, :10], narrow_slice)
    assert wide.config.latent_channels == 100 and wide.state_dict()["g_s.0.weight"].shape[0] == 100


def test_widening_refuses_fewer_latent_channels_or_other_slices() -> None:
    narrow = MambaIC(NARROW)
    with pytest.raises(ValueError, match="widen"):
        ladder.widened(narrow, dataclasses.replace(NARROW, latent_channels=25))
    with pytest.raises(ValueError, match="widen"):
        ladder.widened(narrow, dataclasses.replace(NARROW, latent_channels=100, num_slices=4))
