"""MambaIC model: real bitstreams decode to exactly the latents forward() quantises, any image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from effvision.codecs.mambaic import MambaIC, bits_per_pixel
from effvision.codecs.mambaic.model import ALIGNMENT
from tests.codec_factory import tiny_mambaic_config

torch.set_num_threads(1)

# Same structure as "lite" (every stage present, 5 slices), narrower so the tests stay fast.
TINY = tiny_mambaic_config()
ASSETS = Path(__file__).resolve().parents[1] / "effvision" / "assets"


@pytest.fixture(scope="module")
def tiny_model() -> MambaIC:
    torch.manual_seed(0)
    model = MambaIC(TINY).eval()
    model.update()
    return model


@pytest.mark.parametrize("size", [(97, 131), (128, 128), (300, 451)])
def test_decompress_reproduces_forward_latents_exactly(tiny_model: MambaIC, size: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_model(x)
    coded = tiny_model.compress(x)
    decoded = tiny_model.decompress(coded["strings"], coded["shape"])
    assert torch.equal(decoded["y_hat"], expected["y_hat"])
    assert decoded["x_hat"].shape == x.shape
    assert torch.equal(decoded["x_hat"], expected["x_hat"].clamp(0, 1))


def test_bitstreams_are_identical_across_runs(tiny_model: MambaIC) -> None:
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    first = tiny_model.compress(x)
    second = tiny_model.compress(x)
    assert first["strings"] == second["strings"]


def test_compress_layout_is_anchor_nonanchor_per_slice_then_z(tiny_model: MambaIC) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    coded = tiny_model.compress(x)
    assert len(coded["strings"]) == 2 * TINY.num_slices + 1
    assert all(len(part) == 2 for part in coded["strings"])
    assert coded["shape"] == (64, 64)


def test_small_sides_below_window_size_work(tiny_model: MambaIC) -> None:
    x = torch.rand(1, 3, 5, 17, generator=torch.Generator().manual_seed(4))
    coded = tiny_model.compress(x)
    decoded = tiny_model.decompress(coded["strings"], coded["shape"])
    assert decoded["x_hat"].shape == (1, 3, 5, 17)


def test_pad_reaches_alignment_with_edge_values() -> None:
    x = torch.rand(1, 3, 65, 3)
    padded = MambaIC.pad(x)
    assert padded.shape[-2:] == (2 * ALIGNMENT, ALIGNMENT)
    assert torch.equal(padded[..., 64, :3], x[..., 64, :])
    assert torch.equal(padded[..., :65, 40], x[..., :, 2])


def test_bits_per_pixel_counts_every_string_per_image() -> None:
    strings = [[b"ab", b"c"], [b"defg", b"h"]]  # two streams, two images
    assert bits_per_pixel(strings, 2, 4) == 8 * 8 / (2 * 8)
    assert bits_per_pixel([[b"ab"], [b"defg"]], 2, 4) == bits_per_pixel([[b"ab"] * 2, [b"defg"] * 2], 2, 4)


def test_paper_config_has_the_released_parameter_count() -> None:
    with torch.device("meta"):
        model = MambaIC("paper")
    count = sum(p.numel() for p in model.parameters())
    # The release also holds slice 0's unused channel transforms (1.95M): ~124M in total.
    assert 121_000_000 < count < 123_000_000


@pytest.mark.skipif(not (ASSETS / "mambaic-lite-q1.safetensors").exists(), reason="demo weights not built")
def test_real_bpp_is_within_5_percent_of_the_estimate_on_the_shipped_checkpoint() -> None:
    import numpy as np
    import skimage.data

    from effvision.codecs.mambaic.checkpoint import load_checkpoint

    model = load_checkpoint(ASSETS / "mambaic-lite-q1.safetensors", expected_config="lite")
    image = torch.from_numpy(np.asarray(skimage.data.chelsea(), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(image)
    pixels = image.shape[-2] * image.shape[-1]
    estimate = sum(float(-torch.log2(lik).sum()) for lik in out["likelihoods"].values()) / pixels
    coded = model.compress(image)
    real = bits_per_pixel(coded["strings"], *image.shape[-2:])
    assert abs(real - estimate) / estimate < 0.05


def _relaxed_rd_loss(model: MambaIC, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, lmbda: float) -> float:
    """The refinement objective, written out: lambda * 255^2 * MSE + bits per pixel (noise relaxation)."""
    torch.manual_seed(3)  # the same noise draw for both latents compared
    with torch.no_grad():
        out = model._forward_from_latents(y, z, x.shape[-2:], relaxed=True)
    bits = sum(float(-torch.log2(p.clamp_min(1e-9)).sum()) for p in out["likelihoods"].values())
    return lmbda * 255**2 * float(((out["x_hat"] - x) ** 2).mean()) + bits / (x.shape[-2] * x.shape[-1])


def test_effort_zero_is_plain_compression(tiny_model: MambaIC) -> None:
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(4))
    assert tiny_model.compress(x, effort=0)["strings"] == tiny_model.compress(x)["strings"]


def _latents(model: MambaIC, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's unrefined (y, z) for ``x``."""
    with torch.no_grad():
        y = model.g_a(model.pad(x))
        return y, model.h_a(y)


def test_refined_latents_lower_the_rd_objective_and_decode_with_the_same_decoder(tiny_model: MambaIC) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    y, z = _latents(tiny_model, x)
    refined_y, refined_z = tiny_model.refine_latents(x, y, z, lmbda=0.01, steps=8)
    assert not torch.equal(refined_y, y)
    assert _relaxed_rd_loss(tiny_model, x, refined_y, refined_z, 0.01) < _relaxed_rd_loss(tiny_model, x, y, z, 0.01)
    out = tiny_model.compress(x, effort=4, lmbda=0.01)
    assert out["strings"] != tiny_model.compress(x)["strings"]
    assert tiny_model.decompress(out["strings"], out["shape"])["x_hat"].shape == x.shape


def test_a_refined_image_codes_the_same_alone_or_in_a_batch(tiny_model: MambaIC) -> None:
    """One loss over the batch kept the batch's best step for every image: an image's file depended on the
    other images coded with it."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    batch = tiny_model.compress(x, effort=2, lmbda=0.01)["strings"]
    for index in range(2):
        alone = tiny_model.compress(x[index:index + 1], effort=2, lmbda=0.01)["strings"]
        assert [stream[index] for stream in batch] == [stream[0] for stream in alone]


def test_an_empty_batch_compresses_to_empty_string_lists(tiny_model: MambaIC) -> None:
    """It failed inside the VSS block ("cannot reshape tensor of 0 elements"); compressai's models return
    empty lists."""
    out = tiny_model.compress(torch.rand(0, 3, 64, 64))
    assert out["strings"] == [[] for _ in range(2 * len(tiny_model.slices) + 1)] and out["shape"] == (64, 64)


def test_effort_needs_the_training_lambda(tiny_model: MambaIC) -> None:
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="lambda"):
        tiny_model.compress(x, effort=2)


def test_the_shipped_weights_know_their_lambda_and_effort_needs_a_codec_that_refines() -> None:
    from effvision.codecs.adapters import CompressAIImageCodec
    from effvision.codecs.base import load_codec
    from effvision.errors import UserError

    codec = load_codec("mambaic")
    assert codec.model.rd_lambda == pytest.approx(0.013)
    assert codec.with_effort(3).compress_kwargs == {"effort": 3} and codec.compress_kwargs == {}
    assert load_codec("vqgan").with_effort(3).compress_kwargs["effort"] == 3  # VQGAN refines its indices

    class NoRefinement(torch.nn.Module):
        def compress(self, x):
            return {"strings": [[b""]], "shape": tuple(x.shape[-2:])}

        def decompress(self, strings, shape):
            return {"x_hat": torch.zeros(1, 3, *shape)}

    with pytest.raises(UserError, match="no encoder-side refinement"):
        CompressAIImageCodec(NoRefinement(), "plain", "t").with_effort(3)



BAD_IMAGES = [
    (lambda: np.zeros((1, 3, 64, 64), np.float32), TypeError, "torch.Tensor"),
    (lambda: torch.rand(3, 64, 64), ValueError, r"\(B, 3, H, W\)"),
    (lambda: torch.rand(1, 4, 64, 64), ValueError, r"\(B, 3, H, W\)"),
    (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point"),
    (lambda: torch.full((1, 3, 64, 64), float("nan")), ValueError, "NaN"),
    (lambda: torch.rand(1, 3, 64, 64) * 255, ValueError, "divide 8-bit images by 255"),
]


@pytest.mark.parametrize(("images", "error", "message"), BAD_IMAGES)
def test_compress_refuses_what_is_not_a_batch_of_images_in_unit_range(tiny_model, images, error, message):
    """Before: a NaN image was blamed on the weights ("the weights are corrupt"), a 3-D or integer tensor failed
    deep inside the transforms, and 0..255 input was coded, as another, saturated image."""
    with pytest.raises(error, match=message):
        tiny_model.compress(images())


def test_compress_takes_another_float_dtype_as_the_models(tiny_model):
    x = torch.rand(1, 3, 64, 64)
    assert tiny_model.compress(x.double())["strings"] == tiny_model.compress(x)["strings"]


def test_coding_a_model_left_in_training_mode_is_deterministic() -> None:
    """compressai users call compress straight after a training loop: with stochastic depth on, encoder and
    decoder computed different means and a valid stream decoded as "corrupt data"."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = MambaIC(replace(TINY, drop_path_rate=0.5))
    model.update()
    model.train()
    model.g_a.eval()  # a sub-module's own flag is given back too
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    first, second = model.compress(x), model.compress(x)
    assert first["strings"] == second["strings"]
    decoded = model.decompress(first["strings"], first["shape"])["x_hat"]
    assert torch.equal(decoded, model.eval().decompress(first["strings"], first["shape"])["x_hat"])
    model.train()
    model.g_a.eval()
    model.compress(x)
    assert model.training and model.g_s.training and not model.g_a.training


def test_refinement_under_inference_mode_and_the_lambda_a_saved_file_keeps(tiny_model, tmp_path) -> None:
    """compress(effort=N) under torch.inference_mode() failed ("element 0 of tensors does not require grad");
    save_checkpoint dropped the training lambda, so the loaded model could not refine at all."""
    from effvision.codecs.mambaic.checkpoint import load_checkpoint, save_checkpoint

    tiny_model.rd_lambda = 0.0067
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = tiny_model.compress(x, effort=2)["strings"]
    with torch.inference_mode():
        assert tiny_model.compress(x, effort=2)["strings"] == expected
    save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(tmp_path / "tiny.safetensors", TINY)
    assert loaded.rd_lambda == 0.0067 and loaded.compress(x, effort=2)["strings"] == expected


def test_refinement_gives_the_same_file_every_time_and_leaves_the_global_generator_alone(tiny_model) -> None:
    """The relaxed rate's noise came from torch's global generator: the same image and effort gave another file
    on every call (and moved the caller's random stream)."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    files = set()
    for seed in range(4):
        torch.manual_seed(seed)
        files.add(b"".join(s for part in tiny_model.compress(x, effort=12, lmbda=0.05)["strings"] for s in part))
    assert len(files) == 1
    torch.manual_seed(1)
    untouched = torch.rand(3)
    torch.manual_seed(1)
    tiny_model.compress(x, effort=2, lmbda=0.05)
    assert torch.equal(torch.rand(3), untouched)


def test_one_refinement_step_is_one_candidate(tiny_model: MambaIC) -> None:
    """The loss was scored before each step only, so the last step's latents were never candidates:
    effort 1 coded exactly what effort 0 did, after spending the refinement time."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    y, z = _latents(tiny_model, x)
    refined_y, _ = tiny_model.refine_latents(x, y, z, lmbda=0.01, steps=1)
    assert not torch.equal(refined_y, y)
