"""MambaIC checkpoints: safetensors files with their config, and the official release layout.

* :func:`save_checkpoint` / :func:`load_checkpoint`: our format, a safetensors file whose metadata holds
  the :class:`MambaICConfig` as JSON. Loading with an expected config that differs raises a
  :class:`UserError` naming every mismatching field.
* :func:`to_official_state_dict` / :func:`from_official_state_dict`: key mapping to and from the
  state dict of the official MambaIC repository (``models/MambaIC.py``), whose context modules are
  flat per-kind lists (``atten_mean.{i}.0``, ``cc_mean_transforms.{i}``, ``context_vss_{i+1}`` ...)
  while ours group them per slice (``slices.{i}.mean_support_attention`` ...).
  :func:`load_official_checkpoint` reads a ``.pth``/``.pth.tar`` release without running code from it
  (:func:`effvision.torch_checkpoint.load_torch_checkpoint`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from effvision.bounded_config import check_finite, meta_state_shapes, read_config_fields, shape_mismatches
from effvision.codecs.mambaic.model import CONFIG_LIMITS, CONFIGS, MAX_CODED_MAGNITUDE, MambaIC, MambaICConfig
from effvision.codecs.rans import cdf_table_problem
from effvision.errors import UserError, short_repr
from effvision.io_utils import atomic_path, check_safetensors_file

FORMAT = "effvision-mambaic"
#: entropy-coder tables whose size a file may choose (update() rebuilds them after loading)
RESIZABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")

# Per-slice module of ours -> (official list name, whether the official wraps it in nn.Sequential).
_SLICE_MODULES = {
    "mean_support_attention": ("atten_mean", True),
    "scale_support_attention": ("atten_scale", True),
    "anchor_mean_attention": ("anchor_atten_mean", True),
    "anchor_scale_attention": ("anchor_atten_scale", True),
    "mean_transform": ("cc_mean_transforms", False),
    "scale_transform": ("cc_scale_transforms", False),
    "lrp_transform": ("lrp_transforms", False),
    "context_vss": ("context_vss", False),
    "checkerboard_conv": ("context_prediction", False),
}
# Inside a window attention gate: ours -> official (prefix renames, applied in order).
_GATE_RENAMES = [
    ("project_in.", "in_conv."),
    ("project_out.", "out_conv."),
    ("trunk.", "conv_a."),
    ("gate.", "conv_b."),
    ("regular_window.", "non_local_block.block_1."),
    ("shifted_window.", "non_local_block.block_2."),
]
_BLOCK_RENAMES = [
    ("norm1.", "ln1."),
    ("norm2.", "ln2."),
    ("attn.qkv.", "msa.embedding_layer."),
    ("attn.relative_position_bias", "msa.relative_position_params"),
    ("attn.proj.", "msa.linear."),
]


def _rename(key: str, renames: list[tuple[str, str]], reverse: bool = False) -> str:
    for ours, official in renames:
        old, new = (official, ours) if reverse else (ours, official)
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _gate_to_official(rest: str) -> str:
    rest = _rename(rest, _GATE_RENAMES)
    match = re.match(r"(non_local_block\.block_[12]\.)(.*)", rest)
    return match.group(1) + _rename(match.group(2), _BLOCK_RENAMES) if match else rest


def _gate_from_official(rest: str) -> str:
    match = re.match(r"(non_local_block\.block_[12]\.)(.*)", rest)
    if match:
        rest = match.group(1) + _rename(match.group(2), _BLOCK_RENAMES, reverse=True)
    return _rename(rest, _GATE_RENAMES, reverse=True)


def to_official_state_dict(model: MambaIC) -> dict[str, Tensor]:
    """Our state dict in the official repository's key layout (for export and for tests).

    The official model also registers each context VSS stage as ``context_vss_{i+1}`` and builds
    slice-0 channel transforms it never uses: both are emitted (the unused ones as zeros).
    """
    official: dict[str, Tensor] = {}
    slice_channels = model.config.latent_channels // model.config.num_slices
    for key, tensor in model.state_dict().items():
        match = re.match(r"slices\.(\d+)\.([a-z_]+)\.(.*)", key)
        if not match:
            official[key] = tensor
            continue
        index, module, rest = int(match.group(1)), match.group(2), match.group(3)
        name, wrapped = _SLICE_MODULES[module]
        if wrapped:
            rest = _gate_to_official(rest)
        official[f"{name}.{index}.{'0.' if wrapped else ''}{rest}"] = tensor
        if module == "context_vss":
            official[f"context_vss_{index + 1}.{rest}"] = tensor
    for i, context in enumerate(model.slices):
        mask = context.checkerboard_conv.mask
        official[f"context_prediction.{i}.mask"] = mask.clone()
        official[f"context_prediction.{i}.weight"] = official[f"context_prediction.{i}.weight"] * mask
    # Slice 0's unused channel transforms, shaped like the official ones (slice 1's minus its support).
    for kind in ("cc_mean_transforms", "cc_scale_transforms"):
        for key in [k for k in official if k.startswith(f"{kind}.1.")]:
            shape = list(official[key].shape)
            if key.endswith(".0.weight"):
                shape[1] -= slice_channels * min(1, model.config.max_support_slices)
            official[f"{kind}.0.{key[len(kind) + 3:]}"] = torch.zeros(shape, dtype=official[key].dtype)
    return official


def from_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official-layout state dict to our keys (drops the duplicates and unused tensors)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    official_to_ours = {name: (ours, wrapped) for ours, (name, wrapped) in _SLICE_MODULES.items()}
    ours: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if re.match(r"context_vss_\d+\.", key) or re.match(r"context_prediction\.\d+\.mask$", key):
            continue
        if re.match(r"cc_(mean|scale)_transforms\.0\.", key):
            continue
        match = re.match(r"([a-z_]+)\.(\d+)\.(.*)", key)
        if not match or match.group(1) not in official_to_ours:
            ours[key] = tensor
            continue
        module, wrapped = official_to_ours[match.group(1)]
        rest = match.group(3)
        if wrapped:
            if not rest.startswith("0."):
                raise UserError(f"unexpected key {key!r} in the official MambaIC checkpoint")
            rest = _gate_from_official(rest[2:])
        ours[f"slices.{match.group(2)}.{module}.{rest}"] = tensor
    return ours


def load_official_checkpoint(path: str | Path, config: MambaICConfig | str = "paper") -> MambaIC:
    """Load an official MambaIC release (``torch.save`` of a dict with ``state_dict``) into our model."""
    from effvision.torch_checkpoint import load_torch_checkpoint, tensor_state_dict

    state_dict = tensor_state_dict(load_torch_checkpoint(path), str(path))
    model = MambaIC(config)
    _load_into(model, from_official_state_dict(state_dict), str(path))
    return model


def _load_into(model: MambaIC, state_dict: dict[str, Tensor], source: str) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problem = shape_mismatches(expected, {key: tuple(value.shape) for key, value in state_dict.items()},
                               RESIZABLE_BUFFERS)
    if problem:
        raise UserError(f"{source} does not match MambaIC config {model.config.name!r}: {problem}")
    check_finite(state_dict, source)
    own = model.state_dict()
    for key, value in state_dict.items():  # load_state_dict casts: integer weights gave a poor codec without a word
        if key in own and own[key].is_floating_point() != value.is_floating_point():
            raise UserError(f"{source}: weight {key:.80} is {value.dtype}, the model's is {own[key].dtype}")
    model.load_state_dict(state_dict)
    _check_entropy_tables(model, source)


def _check_entropy_tables(model: MambaIC, source: str) -> None:
    """The CDF tables a file brings (compressai keeps them, so that decoding never depends on floating point)
    are checked before compressai's C++ encoder trusts them (:func:`~effvision.codecs.rans.cdf_table_problem`)."""
    scale_table = model.gaussian_conditional.scale_table
    if scale_table.numel() and not (bool((scale_table > 0).all()) and scale_table.numel() <= 4096):
        raise UserError(f"{source}: its Gaussian scale table must hold at most 4096 positive scales")
    _check_bottleneck_quantiles(model.entropy_bottleneck.quantiles.detach(), source)
    for name, module, rows in (
        ("entropy_bottleneck", model.entropy_bottleneck, model.entropy_bottleneck.quantiles.shape[0]),
        ("gaussian_conditional", model.gaussian_conditional, scale_table.numel()),
    ):
        if module._offset.numel() == 0:  # no tables: update() builds them (the Gaussian's from our scale table,
            continue  # the bottleneck's from its quantiles, checked above)
        problem = cdf_table_problem(module._quantized_cdf, module._cdf_length, module._offset, rows)
        if problem:
            raise UserError(f"{source}: the {name} entropy tables are corrupt ({problem})")


def _check_bottleneck_quantiles(quantiles: Tensor, source: str) -> None:
    """The entropy bottleneck's (C, 1, 3) quantiles (lower tail, median, upper tail of each channel of z).

    compressai's ``update()`` sizes the bottleneck's CDF tables from ``median - lower`` and ``upper - median``
    (one table entry per integer), and coding subtracts the median from z: a file's median of 1e9 would have it
    allocate gigabytes, or hand the rANS coder symbols it never finishes coding. Real models: a few to a few
    hundred."""
    if not quantiles.numel():
        return
    lower, median, upper = quantiles[:, 0, 0], quantiles[:, 0, 1], quantiles[:, 0, 2]
    below = float((median - lower).clamp_min(0).max())
    above = float((upper - median).clamp_min(0).max())
    if below + above > 1 << 16 or float(median.abs().max()) > MAX_CODED_MAGNITUDE:
        raise UserError(
            f"{source}: its entropy bottleneck's quantiles are out of range: medians up to "
            f"{float(median.abs().max()):.3g} (at most {MAX_CODED_MAGNITUDE}), tails reaching {below:.3g} below and "
            f"{above:.3g} above them (at most {1 << 16} together; the coding tables are built that long)"
        )


def save_checkpoint(
    model: MambaIC, path: str | Path, extra: dict[str, str] | None = None, half_parameters: bool = False
) -> None:
    """Write ``model`` (weights + CDF tables + config) to a safetensors file, atomically.

    ``half_parameters`` stores the learned parameters in float16 (half their bytes; loading casts them back to
    float32). The CDF tables written with them are rebuilt from the rounded weights (on a copy; ``model`` is
    not changed), so the file describes one consistent model. On the lambda = 0.025 ladder model it changed
    a 512x384 photo's file by 4 of 8616 bytes and its PSNR by 0.001 dB.
    """
    from safetensors.torch import save_file

    parameters = set()
    if half_parameters:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
        model.update(force=True)
        parameters = {name for name, _ in model.named_parameters()}
    tensors = {
        k: (v.detach().to("cpu").half() if k in parameters else v.detach().to("cpu")).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if getattr(model, "rd_lambda", None) is not None:  # what encoder-side refinement needs (it was dropped)
        metadata["lambda"] = repr(float(model.rd_lambda))
    metadata.update(extra or {})
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata=metadata)


def read_checkpoint_config(path: str | Path) -> tuple[MambaICConfig, dict[str, str]]:
    """The config and metadata of a checkpoint written by :func:`save_checkpoint`, the config's fields checked
    against :data:`~effvision.codecs.mambaic.model.CONFIG_LIMITS` (the file may be crafted)."""
    from safetensors import safe_open

    check_safetensors_file(path, "checkpoint")  # safe_open blocks on a FIFO; a huge header costs GBs
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError as error:
        raise UserError(f"checkpoint not found: {path}") from error
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path} is not a safetensors checkpoint ({error})") from error
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise UserError(f"{path} is not a MambaIC checkpoint (no {FORMAT} metadata)")
    fields = read_config_fields(metadata["config"], CONFIG_LIMITS, str(path), "MambaIC config")
    try:
        config = MambaICConfig.from_dict(fields)
    except ValueError as error:
        raise UserError(f"{path}: bad MambaIC config: {error}") from error
    return config, metadata


def _training_lambda(metadata: dict[str, str], path: str | Path) -> float | None:
    """The λ a checkpoint records (used by encoder-side refinement), checked: a finite number in (0, 1000]."""
    if "lambda" not in metadata:
        return None
    try:
        value = float(metadata["lambda"])
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise UserError(
            f"{path}: its lambda metadata must be a number in (0, 1000], got {short_repr(metadata['lambda'], 40)}"
        )
    return value


def config_mismatch(found: MambaICConfig, expected: MambaICConfig) -> list[str]:
    """Human-readable differences ``field: found != expected`` (the name field is ignored)."""
    found_dict, expected_dict = found.to_dict(), expected.to_dict()
    return [
        f"{key}: {found_dict[key]} != {expected_dict[key]}"
        for key in expected_dict
        if key != "name" and found_dict[key] != expected_dict[key]
    ]


def load_checkpoint(
    path: str | Path, expected_config: MambaICConfig | str | None = None, device: str = "cpu"
) -> MambaIC:
    """Load a checkpoint written by :func:`save_checkpoint` (``.safetensors``) or an official release file
    (any other suffix, the ``paper`` config: :func:`load_official_checkpoint`), in eval mode with CDFs ready.

    Args:
        expected_config: when given (config or name), a checkpoint of another config is a
            :class:`UserError` naming the mismatching fields.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if Path(path).suffix.lower() != ".safetensors":
        model = load_official_checkpoint(path, expected_config or "paper")
        model.update()
        return model.to(device).eval()
    config, metadata = read_checkpoint_config(path)
    if expected_config is not None:
        expected = CONFIGS[expected_config] if isinstance(expected_config, str) else expected_config
        differences = config_mismatch(config, expected)
        if differences:
            raise UserError(
                f"{path} was trained with MambaIC config {config.name!r}, not {expected.name!r} "
                f"({'; '.join(differences)})"
            )
    rd_lambda = _training_lambda(metadata, path)
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    problem = shape_mismatches(meta_state_shapes(lambda: MambaIC(config), str(path), "MambaIC config"), shapes,
                               RESIZABLE_BUFFERS)
    if problem:  # before the model is built: its size is then that of the file's tensors
        raise UserError(f"{path} does not match its MambaIC config {config.name!r}: {problem}")
    model = MambaIC(config)
    _load_into(model, load_file(str(path)), str(path))
    if rd_lambda is not None:
        model.rd_lambda = rd_lambda  # the training λ, for encoder-side refinement
    model.update()
    return model.to(device).eval()

