"""Crafted codec checkpoints (``--checkpoint F``): configs in the metadata are bounded, checked against the
file's tensors before any model is built, and weights must be finite. Each case is a clear UserError, at once;
before, these allocated terabytes, looped, or hung compressai's rANS encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from effvision.codecs.mambaic import MambaIC
from effvision.codecs.mambaic import checkpoint as mambaic_checkpoint
from effvision.codecs.mambaic.checkpoint import load_checkpoint, save_checkpoint
from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.model import VQGANCodec
from effvision.codecs.vqgan.restoration import IndexRestorer
from effvision.errors import UserError
from tests.codec_factory import tiny_mambaic_config

torch.set_num_threads(1)

TINY_VQGAN = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                         z_channels=32, embed_dim=8, n_embed=64, name="tiny")


@pytest.fixture(scope="module")
def mambaic_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mambaic") / "tiny.safetensors"
    model = MambaIC(tiny_mambaic_config()).eval()
    model.update()
    save_checkpoint(model, path, extra={"lambda": "0.013"})
    return path


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan") / "tiny.safetensors"
    codec = VQGANCodec(TINY_VQGAN, restorer=IndexRestorer(8, dim=32, depth=1, heads=2),
                       reference_maps=torch.randint(0, 64, (6, 4, 4)))
    codec.save(path)
    return path


def rewritten(source: Path, target: Path, change) -> Path:
    """``source`` with ``change(metadata, tensors)`` applied, written to ``target`` (a valid safetensors file)."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(metadata, tensors)
    save_file(tensors, str(target), metadata=metadata)
    return target


def set_field(key: str, value, field: str):
    def change(metadata, tensors):
        config = json.loads(metadata[field])
        config[key] = value
        metadata[field] = json.dumps(config)
    return change


def set_metadata(key: str, text: str):
    return lambda metadata, tensors: metadata.__setitem__(key, text)


def nan_weights(metadata, tensors):
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 1)
    tensors[key] = torch.full_like(tensors[key], float("nan"))


def complex_nan_weights(metadata, tensors):
    """A complex NaN is not floating-point: it passed the NaN check and was cast to float32 NaN on loading."""
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 1)
    tensors[key] = torch.full(tensors[key].shape, complex(float("nan"), 0), dtype=torch.complex64)


def float64_overflow_weights(metadata, tensors):
    """1e300 is finite in float64 and infinite in the float32 the model loads it as."""
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 1)
    tensors[key] = torch.full(tensors[key].shape, 1e300, dtype=torch.float64)


def extra_tensor_with_a_long_name(metadata, tensors):
    tensors["x" * 100_000] = torch.zeros(1)


def keep_two_gaussian_tables(metadata, tensors):
    for key in ("_quantized_cdf", "_cdf_length", "_offset"):
        tensors[f"gaussian_conditional.{key}"] = tensors[f"gaussian_conditional.{key}"][:2].clone()


def drop_bottleneck_tables_and_widen(metadata, tensors):
    """Tables left out (update() builds them from the quantiles) and quantiles 10^9 apart: 10^9-long tables."""
    for key in ("_quantized_cdf", "_cdf_length", "_offset"):
        tensors[f"entropy_bottleneck.{key}"] = tensors[f"entropy_bottleneck.{key}"][:0].clone()
    tensors["entropy_bottleneck.quantiles"][:, 0, 2] = 1e9


def drop_bottleneck_tables_and_move_median(metadata, tensors):
    """Tails at 0 (a span of 0 passes a check of upper - lower), median at 10^9: compressai sizes the tables from
    median - lower, so update() asked for 8 GB."""
    for key in ("_quantized_cdf", "_cdf_length", "_offset"):
        tensors[f"entropy_bottleneck.{key}"] = tensors[f"entropy_bottleneck.{key}"][:0].clone()
    quantiles = tensors["entropy_bottleneck.quantiles"]
    quantiles[:, 0, 0], quantiles[:, 0, 1], quantiles[:, 0, 2] = 0.0, 1e9, 0.0


MAMBAIC_CASES = {
    "not JSON": (set_metadata("config", "{not json"), "not valid JSON"),
    "a list": (set_metadata("config", "[1, 2]"), "must be a JSON object"),
    "a megabyte of JSON": (set_metadata("config", json.dumps({"pad": "x" * 2**20})), "at most"),
    "10^6 channels": (set_field("transform_channels", 10**6, "config"), "transform_channels must be an integer"),
    "10^5 blocks": (set_field("depths", [0, 1, 1, 10**5], "config"), r"depths\[3\] must be"),
    "3 depths": (set_field("depths", [1, 1, 1], "config"), "depths must be a list of 4-4"),
    "no slices": (set_field("num_slices", 0, "config"), "num_slices must be"),
    "a string": (set_field("latent_channels", "20", "config"), "latent_channels must be an integer"),
    "a boolean": (set_field("latent_channels", True, "config"), "latent_channels must be an integer"),
    "a fraction": (set_field("window", 2.5, "config"), "window must be an integer"),
    "an infinite ratio": (set_metadata("config", '{"ssm_ratio": Infinity}'), "ssm_ratio must be a number"),
    "slices not dividing": (set_field("num_slices", 3, "config"), "not divisible"),
    # within the limits, but not the model the tensors were trained for: refused before it is built
    "1024 channels": (set_field("transform_channels", 1024, "config"), "does not match its MambaIC config"),
    "lambda not a number": (set_metadata("lambda", "abc"), "lambda metadata must be"),
    "lambda NaN": (set_metadata("lambda", "nan"), "lambda metadata must be"),
    "NaN weights": (nan_weights, "holds NaN or infinite values"),
    "complex NaN weights": (complex_nan_weights, "is complex"),
    # load_state_dict casts: a codec of integer weights coded poorly without a word
    "integer weights": (lambda m, t: t.update({k: v.round().to(torch.int32) for k, v in t.items()
                                               if k.startswith("g_s.") and v.dim() == 4}), "is torch.int32, the model"),
    "float64 beyond float32": (float64_overflow_weights, r"holds NaN or infinite values \(as float32\)"),
    "a 100 kB tensor name": (extra_tensor_with_a_long_name, r"1 unexpected \(e.g. \['x{80}'\]\)"),
    # compressai's C++ encoder trusted these: it read past a row, divided by zero (SIGFPE), or segfaulted
    "CDF lengths past their rows": (
        lambda m, t: t["entropy_bottleneck._cdf_length"].fill_(10**5), "entropy tables are corrupt"),
    "flat CDF rows": (lambda m, t: t["gaussian_conditional._quantized_cdf"][:, 1:].zero_(), "do not rise strictly"),
    "fewer CDF rows than scales": (keep_two_gaussian_tables, "2 CDF rows where the model indexes 64"),
    "negative scales": (lambda m, t: t["gaussian_conditional.scale_table"].neg_(), "positive scales"),
    "no tables, 10^9 wide quantiles": (drop_bottleneck_tables_and_widen, "quantiles are out of range"),
    "no tables, a median of 10^9": (drop_bottleneck_tables_and_move_median, "medians up to 1e"),
    # with tables kept, z minus that median would reach the rANS coder as a symbol near -10^9
    "a median of 10^9": (lambda m, t: t["entropy_bottleneck.quantiles"][:, 0, 1].fill_(1e9), "medians up to 1e"),
}
#: cases whose shapes fit the config: the model is built, then its values are refused
BUILT = {"NaN weights", "complex NaN weights", "integer weights", "float64 beyond float32",
         "CDF lengths past their rows", "flat CDF rows", "fewer CDF rows than scales", "negative scales",
         "no tables, 10^9 wide quantiles", "no tables, a median of 10^9", "a median of 10^9"}


@pytest.mark.parametrize("case", MAMBAIC_CASES)
def test_crafted_mambaic_checkpoint_is_a_clear_error_and_no_model_is_built(case, mambaic_file, tmp_path, monkeypatch):
    change, message = MAMBAIC_CASES[case]
    path = rewritten(mambaic_file, tmp_path / "crafted.safetensors", change)
    built_on = []

    def spy(config):
        built_on.append(torch.empty(0).device.type)  # "meta" inside the shape check
        return MambaIC(config)

    monkeypatch.setattr(mambaic_checkpoint, "MambaIC", spy)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)
    if case not in BUILT:
        assert "cpu" not in built_on


def test_an_untouched_mambaic_checkpoint_still_loads(mambaic_file):
    model = load_checkpoint(mambaic_file)
    assert model.config == tiny_mambaic_config() and model.rd_lambda == pytest.approx(0.013)


VQGAN_CASES = {
    "not JSON": (set_metadata("vqgan_config", "{"), "not valid JSON"),
    "10^5 channels": (set_field("ch", 10**5, "vqgan_config"), "ch must be an integer"),
    "10^9 codes": (set_field("n_embed", 10**9, "vqgan_config"), "n_embed must be an integer"),
    "5000 levels": (set_field("ch_mult", [1] * 5000, "vqgan_config"), "ch_mult must be a list of 1-8"),
    "grey": (set_field("in_channels", 1, "vqgan_config"), "in_channels must be an integer in \\[3, 3\\]"),
    "within limits, other tensors": (set_field("ch", 1024, "vqgan_config"), "does not match its VQGAN config"),
    "restorer: unknown fields only": (set_metadata("restorer_config", '{"evil": 1}'), "restorer config does not"),
    "restorer: 10^6 wide": (set_field("dim", 10**6, "restorer_config"), "dim must be an integer"),
    "restorer: heads not dividing": (set_field("heads", 3, "restorer_config"), "restorer config does not"),
    "index maps beyond the codebook": (
        lambda m, t: t.__setitem__("reference_maps", torch.full_like(t["reference_maps"], 30000)),
        "codebook indices in \\[0, 64\\)"),
    "negative index maps": (
        lambda m, t: t.__setitem__("reference_maps", torch.full_like(t["reference_maps"], -1)), "codebook indices"),
    "float index maps": (
        lambda m, t: t.__setitem__("reference_maps", t["reference_maps"].float()), "codebook indices"),
    "2-D index maps": (
        lambda m, t: t.__setitem__("reference_maps", t["reference_maps"][0]), r"must be \(N, h, w\)"),
    "NaN weights": (nan_weights, "holds NaN or infinite values"),
    "complex NaN weights": (complex_nan_weights, "is complex"),
    "float64 beyond float32": (float64_overflow_weights, r"holds NaN or infinite values \(as float32\)"),
}


@pytest.mark.parametrize("case", VQGAN_CASES)
def test_crafted_vqgan_file_is_a_clear_error(case, vqgan_file, tmp_path):
    change, message = VQGAN_CASES[case]
    path = rewritten(vqgan_file, tmp_path / "crafted.safetensors", change)
    with pytest.raises(UserError, match=message):
        VQGANCodec.load(path)


def test_an_untouched_vqgan_file_still_loads(vqgan_file):
    codec = VQGANCodec.load(vqgan_file)
    assert codec.config == TINY_VQGAN and codec.restorer is not None and codec.reference_maps.shape == (6, 4, 4)


def test_weights_that_blow_up_the_latents_are_refused_before_the_entropy_coder(mambaic_file, tmp_path):
    """Finite but huge analysis weights give latents near 2^31, on which compressai's rANS encoder never
    returned. The encode must stop with a clear error instead (run in a child process, so that a regression
    fails by timeout instead of hanging the test run)."""

    def scale_analysis(metadata, tensors):
        for key in tensors:
            if key.startswith("g_a.") and tensors[key].dim() == 4:
                tensors[key] = tensors[key].float() * 1e4

    path = rewritten(mambaic_file, tmp_path / "huge.safetensors", scale_analysis)
    script = ("import torch\nfrom effvision.codecs.mambaic.checkpoint import load_checkpoint\n"
              f"model = load_checkpoint({str(path)!r})\n"
              "try:\n    model.compress(torch.rand(1, 3, 64, 64))\nexcept Exception as error:\n"
              "    print(type(error).__name__, error)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "UserError" in run.stdout and "cannot be coded" in run.stdout


def _self_containing() -> dict:
    payload: dict = {}
    payload["state_dict"] = payload
    return payload


OFFICIAL_LAYOUT_CASES = {
    # before: AttributeError ('int' object has no attribute 'removeprefix' / 'startswith')
    "name that is not a string": ({"state_dict": {1: torch.zeros(1)}}, "maps 1 to a Tensor"),
    # before: AttributeError ('str' object has no attribute 'shape'), or a list's missing .items()
    "value that is not a tensor": ({"state_dict": {"g_a.0.weight": "x"}}, "maps 'g_a.0.weight' to a str"),
    "state dict that is a list": ({"state_dict": [1, 2]}, "maps 'state_dict' to a list"),
    # before: AttributeError ('dict' object has no attribute 'shape')
    "state dict that contains itself": (_self_containing(), "changes a value after sharing it"),  # the pickle scan
    "no dict at all": ([1, 2], "holds no state dict"),
    # one stored number viewed with stride 0 as 2^31 of them: loading it into a resizable buffer, or checking its
    # values, allocated 8 GB for a file of a few hundred bytes
    "a stride-0 view": ({"state_dict": {"g_a.0.weight": torch.zeros(1).expand(32768, 65536)}}, "file stores only 4"),
}


@pytest.mark.parametrize("loader", ["official mambaic", "taming vqgan"])
@pytest.mark.parametrize("case", OFFICIAL_LAYOUT_CASES)
def test_crafted_official_layout_checkpoints_are_clear_errors(case, loader, tmp_path):
    payload, message = OFFICIAL_LAYOUT_CASES[case]
    path = tmp_path / "crafted.pth"
    torch.save(payload, path)
    with pytest.raises(UserError, match=message):
        if loader == "official mambaic":
            mambaic_checkpoint.load_official_checkpoint(path, tiny_mambaic_config())
        else:
            VQGANCodec(TINY_VQGAN).load_taming_checkpoint(path)
