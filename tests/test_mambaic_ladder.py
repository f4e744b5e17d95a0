"""The shipped MambaIC quality ladder: a compressai-zoo-like loader, one lambda per quality, rates in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effvision.codecs import mambaic
from effvision.codecs.adapters import MAMBAIC_DEFAULT_QUALITY, shipped_weights
from effvision.codecs.base import load_codec
from effvision.codecs.mambaic.checkpoint import read_checkpoint_config
from effvision.errors import UserError

torch.set_num_threads(1)


def test_at_least_four_qualities_ship_numbered_from_one_with_rising_lambda() -> None:
    qualities = mambaic.qualities()
    assert len(qualities) >= 4 and qualities == list(range(1, len(qualities) + 1))
    weights, names = shipped_weights("mambaic"), mambaic.shipped_qualities()
    lambdas = [float(read_checkpoint_config(weights[names[q]])[1]["lambda"]) for q in qualities]
    assert all(a < b for a, b in zip(lambdas, lambdas[1:], strict=False)), lambdas


def test_qualities_are_numbered_as_compressai_zoo_lambdas() -> None:
    """q1..q8 are lambda 0.0018 ... 0.18 in compressai's zoo (MSE); the default is its middle, 0.013."""
    zoo = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.013, 5: 0.025, 6: 0.0483, 7: 0.0932, 8: 0.18}
    weights = shipped_weights("mambaic")
    for quality, name in mambaic.shipped_qualities().items():
        assert float(read_checkpoint_config(weights[name])[1]["lambda"]) == zoo[quality]
    assert zoo[MAMBAIC_DEFAULT_QUALITY] == 0.013


def test_load_returns_a_ready_compression_model_and_defaults_to_the_middle_quality() -> None:
    model = mambaic.load(1)
    assert isinstance(model, mambaic.MambaIC) and not model.training
    assert model.gaussian_conditional.quantized_cdf.numel() > 0  # CDF tables are built
    assert load_codec("mambaic").config_id == f"lite-q{MAMBAIC_DEFAULT_QUALITY}"
    assert load_codec("mambaic", quality=2).config_id == "lite-q2"
    with pytest.raises(UserError, match="quality 99"):
        load_codec("mambaic", quality=99)
    with pytest.raises(ValueError, match="either"):
        mambaic.load(2, pretrained=True)


def test_higher_qualities_spend_more_bytes_for_less_distortion() -> None:
    import skimage.data

    image = np.asarray(skimage.data.coffee())[100:228, 200:392]  # a photo none of the qualities trained on
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    sizes, errors = [], []
    for quality in mambaic.qualities():
        model = mambaic.load(quality)
        with torch.no_grad():
            coded = model.compress(x)
            x_hat = model.decompress(coded["strings"], coded["shape"])["x_hat"].clamp(0, 1)
        sizes.append(sum(len(s) for strings in coded["strings"] for s in strings))
        errors.append(float(((x_hat - x) ** 2).mean()))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert errors == sorted(errors, reverse=True), errors


def test_upper_rungs_of_any_known_config_count_as_qualities(monkeypatch) -> None:
    """Weights named <config>-q<N> are quality N for every config in CONFIGS (lite for the lower rungs, wider ones
    above); other names in the assets folder are not qualities."""
    from pathlib import Path

    from effvision.codecs import adapters

    names = ["lite-q1", "lite-q2", "wide-q6", "wide160-q7", "unknownconfig-q8", "lite-demo", "paper-q9x"]
    monkeypatch.setattr(adapters, "shipped_weights", lambda codec: {n: Path(f"{n}.safetensors") for n in names})
    assert mambaic.shipped_qualities() == {1: "lite-q1", 2: "lite-q2", 6: "wide-q6", 7: "wide160-q7"}


@pytest.mark.parametrize("quality", ["2", True, 2.0, torch.tensor(2)])
def test_a_quality_that_is_not_an_int_is_refused(quality) -> None:
    """load(quality="2") loaded q2 by the text of the weights' name."""

    with pytest.raises(UserError, match="quality must be an integer"):
        mambaic.load(quality=quality)
    with pytest.raises(UserError, match="quality must be an integer"):
        load_codec("vqgan", quality=quality)
    assert mambaic.load(quality=np.int64(2)).config.name == "lite"
