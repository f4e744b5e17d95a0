"""ONNX export of codec analysis/synthesis transforms (entropy coding stays in Python)."""

import pytest
import torch
from effvision.export import check_onnx, export_onnx

from tests.codec_factory import tiny_mambaic_config

ATOL = 1e-4


@pytest.fixture(scope="module")
def vqgan():
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec

    torch.manual_seed(0)
    return VQGANCodec(SMALL_F16).eval()


@pytest.fixture(scope="module")
def mambaic():
    from effvision.codecs.mambaic import MambaIC

    torch.manual_seed(0)
    tiny = tiny_mambaic_config()
    return MambaIC(tiny).eval()


def inputs(channels: int, sizes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, height, width, generator=generator) for batch, height, width in sizes]


def test_vqgan_encoder_has_dynamic_batch_height_and_width(vqgan, tmp_path):
    path = export_onnx(vqgan.vq.encoder, tmp_path / "encoder.onnx", (1, 3, 32, 32), dynamic_hw=True)
    result = check_onnx(vqgan.vq.encoder, path, inputs(3, [(1, 32, 32), (5, 32, 32), (2, 64, 48)]))
    assert result["max_abs_diff"] <= ATOL and result["top1_agreement"] is None


def test_vqgan_decoder_has_dynamic_batch_height_and_width(vqgan, tmp_path):
    channels = vqgan.config.z_channels
    path = export_onnx(vqgan.vq.decoder, tmp_path / "decoder.onnx", (1, channels, 2, 2), dynamic_hw=True)
    result = check_onnx(vqgan.vq.decoder, path, inputs(channels, [(1, 2, 2), (5, 2, 2), (2, 4, 3)]))
    assert result["max_abs_diff"] <= ATOL


@pytest.mark.parametrize(("transform", "channels", "size"), [("g_a", 3, 64), ("g_s", 20, 4)])
def test_mambaic_transforms_match_at_batch_1_and_5_with_fixed_size(mambaic, tmp_path, transform, channels, size):
    # MambaIC's traced graph is size-specific (see the report), so height/width are fixed here.
    module = getattr(mambaic, transform)
    path = export_onnx(module, tmp_path / f"{transform}.onnx", (1, channels, size, size))
    result = check_onnx(module, path, inputs(channels, [(1, size, size), (5, size, size)]))
    assert result["max_abs_diff"] <= ATOL
