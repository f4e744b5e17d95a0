"""MambaIC checkpoints: safetensors round trip, official layout mapping, clear errors on mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effvision.codecs.mambaic import MambaIC, MambaICConfig
from effvision.codecs.mambaic.checkpoint import (
    from_official_state_dict,
    load_checkpoint,
    load_official_checkpoint,
    save_checkpoint,
    to_official_state_dict,
)
from effvision.errors import UserError
from tests.codec_factory import tiny_mambaic_config

torch.set_num_threads(1)

TINY = tiny_mambaic_config()


def _model(seed: int) -> MambaIC:
    torch.manual_seed(seed)
    model = MambaIC(TINY).eval()
    model.update()
    return model


def test_official_layout_round_trip_gives_identical_outputs() -> None:
    source, target = _model(0), _model(1)
    target.load_state_dict(from_official_state_dict(to_official_state_dict(source)))
    x = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source(x)["x_hat"], target(x)["x_hat"])


def test_official_layout_uses_the_release_key_names() -> None:
    with torch.device("meta"):
        official = to_official_state_dict(MambaIC("paper"))
    for key in (
        "g_a.0.weight",
        "g_a.16.weight",
        "g_a.1.op.x_proj_weight",
        "h_mean_s.1.op.A_logs",
        "atten_mean.4.0.non_local_block.block_2.msa.relative_position_params",
        "atten_scale.0.0.conv_b.3.weight",
        "anchor_atten_mean.1.0.in_conv.weight",
        "cc_mean_transforms.0.0.weight",
        "lrp_transforms.4.4.bias",
        "context_vss.2.1.op.out_norm.weight",
        "context_vss_3.1.op.out_norm.weight",
        "context_prediction.0.mask",
        "entropy_bottleneck.quantiles",
    ):
        assert key in official, key
    # official slice-0 channel transform reads the M = 320 hyper-mean channels only
    assert tuple(official["cc_mean_transforms.0.0.weight"].shape) == (224, 320, 3, 3)
    assert tuple(official["context_vss_1.0.norm.weight"].shape) == (2 * 320 + 2 * 64,)


def test_load_official_checkpoint_file(tmp_path: Path) -> None:
    source = _model(2)
    path = tmp_path / "official.pth.tar"
    torch.save({"epoch": 1, "state_dict": to_official_state_dict(source)}, path)
    loaded = load_official_checkpoint(path, TINY).state_dict()
    for key, tensor in source.state_dict().items():
        if key.endswith("checkerboard_conv.weight"):  # the release stores these pre-masked
            tensor = tensor * source.get_submodule(key.removesuffix(".weight")).mask
        assert torch.equal(loaded[key], tensor), key


def test_official_checkpoint_of_another_config_names_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": to_official_state_dict(_model(3))}, path)
    with pytest.raises(UserError, match="g_a.0.weight has shape"):
        load_official_checkpoint(path, MambaICConfig(**{**TINY.to_dict(), "transform_channels": 24}))


def test_safetensors_round_trip_keeps_bitstreams(tmp_path: Path) -> None:
    model = _model(4)
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert loaded.config == TINY
    assert loaded.compress(x)["strings"] == model.compress(x)["strings"]


def test_half_parameter_checkpoint_is_smaller_and_round_trips_its_own_bitstreams(tmp_path: Path) -> None:
    """Parameters stored in float16 come back as float32 equal to the rounded weights; a file encoded with the
    loaded model decodes with another load of it, to the same image."""
    from safetensors import safe_open

    model = _model(6)
    save_checkpoint(model, tmp_path / "full.safetensors")
    save_checkpoint(model, tmp_path / "half.safetensors", half_parameters=True)
    saved = (tmp_path / "full.safetensors").stat().st_size - (tmp_path / "half.safetensors").stat().st_size
    assert saved > 0.99 * 2 * sum(p.numel() for p in model.parameters())  # 2 bytes per parameter
    with safe_open(str(tmp_path / "half.safetensors"), framework="pt") as handle:
        dtypes = {key: handle.get_tensor(key).dtype for key in handle.keys()}
    parameters = dict(model.named_parameters())
    assert all(dtypes[key] == torch.float16 for key in parameters)
    assert any(dtype == torch.int32 for dtype in dtypes.values())  # CDF tables untouched
    first, second = load_checkpoint(tmp_path / "half.safetensors"), load_checkpoint(tmp_path / "half.safetensors")
    for name, parameter in first.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, parameters[name].detach().half().float())
    rounded = _model(6)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    rounded.update(force=True)  # the file's CDF tables are those of the rounded weights
    for name, buffer in rounded.named_buffers():
        assert torch.equal(dict(first.named_buffers())[name], buffer), name
    assert torch.equal(next(model.parameters()), next(_model(6).parameters()))  # the saved model is unchanged
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        coded = first.compress(x)
        assert torch.equal(second.decompress(coded["strings"], coded["shape"])["x_hat"],
                           first.decompress(coded["strings"], coded["shape"])["x_hat"])


def test_checkpoint_of_wrong_config_is_a_user_error_naming_fields(tmp_path: Path) -> None:
    save_checkpoint(_model(5), tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=r"not 'lite'.*transform_channels: 16 != 48"):
        load_checkpoint(tmp_path / "m.safetensors", expected_config="lite")


def test_non_checkpoint_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"definitely not safetensors")
    with pytest.raises(UserError, match="not a safetensors (checkpoint|file)"):
        load_checkpoint(path)


def test_load_checkpoint_reads_an_official_release_file_by_its_suffix(tmp_path: Path) -> None:
    source = _model(6)
    path = tmp_path / "checkpoint0.025.pth.tar"
    torch.save({"epoch": 1, "state_dict": to_official_state_dict(source)}, path)
    loaded = load_checkpoint(path, expected_config=TINY)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert not loaded.training and loaded.compress(x)["strings"] == source.compress(x)["strings"]
