"""Model configs and weights read from untrusted checkpoint files, bounded before anything is allocated.

A codec checkpoint names the model to build (a JSON config in its metadata) and its tensors fill that model; a
fine-tuning run folder does the same with its ``config.json`` (:func:`effvision.finetune.loop.read_run_config`).
Both come from files the user passes, which may be crafted: a config asking for 10^6 channels or blocks would
allocate, or loop, for as long as it says before any shape check could object. So a codec loader:

1. reads the config with :func:`read_config_fields`: a JSON object of bounded size whose known fields are
   integers, numbers or short integer lists within the limits the model declares (:class:`Limit`);
2. builds the model on the ``meta`` device (no memory; :func:`meta_state_shapes`) and compares its parameter and
   buffer shapes with the file's (:func:`shape_mismatches`), so the real model is built only when it is exactly
   as large as the tensors the file really holds;
3. refuses weights that are not finite (:func:`check_finite`): NaN weights make NaN latents, which no entropy
   coder should be given.

A timm model named with options from such a file (a fine-tuning run, a tune config) is checked by
:func:`check_timm_model` before it is built: the options that size a ViT within :data:`TIMM_OPTION_LIMITS`, the
others plain values, then the model built on the meta device and refused if its weights alone exceed this machine's
memory, its input exceeds :data:`effvision.image_io.MAX_PIXELS` or it cuts an image into more than
:data:`MAX_TOKENS` patches. A tensor an option asks for (a timed batch, a calibration set, a training batch) is
held to a quarter of this machine's memory by :func:`check_float32_fits`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from effvision.errors import UserError, short_repr

if TYPE_CHECKING:  # torch is imported where a model is built, so that config modules stay light
    from torch import Tensor, nn

#: a config's JSON text: real ones are a few hundred bytes
MAX_CONFIG_JSON_BYTES = 16 * 1024


def check_switches(values: dict[str, object]) -> None:
    """A ``ValueError`` naming the first of ``values`` (option -> value) that is not ``True`` or ``False``: a
    string such as ``"false"`` is true, so a switch given as text was silently on."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {short_repr(value, 40)} ({type(value).__name__})")


@dataclass(frozen=True)
class Limit:
    """Bounds of one config field: ``kind`` "int" or "float" (``low <= value <= high``), "ints" (a list of
    ``min_items``-``max_items`` integers, each within the bounds) or "str" (``low``-``high`` characters)."""

    low: float
    high: float
    kind: str = "int"
    min_items: int = 0
    max_items: int = 0

    def check(self, name: str, value: object) -> object:
        """``value`` as the config wants it (tuple for "ints"); a :class:`ValueError` naming ``name``."""
        if self.kind == "str":
            if not isinstance(value, str) or not self.low <= len(value) <= self.high:
                raise ValueError(
                    f"{name} must be a string of {self.low:g}-{self.high:g} characters, got {short_repr(value)}"
                )
            return value
        if self.kind == "ints":
            if not isinstance(value, list) or not self.min_items <= len(value) <= self.max_items:
                raise ValueError(
                    f"{name} must be a list of {self.min_items}-{self.max_items} integers, got {short_repr(value)}"
                )
            return tuple(self._number(f"{name}[{i}]", item, integer=True) for i, item in enumerate(value))
        return self._number(name, value, integer=self.kind == "int")

    def _number(self, name: str, value: object, integer: bool) -> int | float:
        numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not numeric or not math.isfinite(value) or not self.low <= value <= self.high:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{name} must be {kind} in [{self.low:g}, {self.high:g}], got {short_repr(value)}")
        return value


def read_json_object(text: str, source: str, what: str, max_bytes: int = MAX_CONFIG_JSON_BYTES) -> dict:
    """The JSON object ``text`` of at most ``max_bytes`` characters (a :class:`UserError` naming ``source`` and
    ``what`` otherwise)."""
    if len(text) > max_bytes:
        raise UserError(f"{source}: its {what} is {len(text)} bytes of JSON; at most {max_bytes} are read")
    try:
        values = json.loads(text)
    except ValueError as error:
        raise UserError(f"{source}: its {what} is not valid JSON ({error})") from error
    except RecursionError as error:  # "[[[[...]]]]" a few thousand deep: json's decoder recurses per level
        raise UserError(f"{source}: its {what} nests JSON too deeply") from error
    if not isinstance(values, dict):
        raise UserError(f"{source}: its {what} must be a JSON object, got {type(values).__name__}")
    return values


def checked_fields(values: Mapping[str, object], limits: Mapping[str, Limit], source: str, what: str) -> dict:
    """The fields of ``values`` named in ``limits``, each checked; a field the model does not know is ignored
    (newer files), a missing one keeps the model's default (a :class:`UserError` naming the field otherwise)."""
    fields: dict[str, object] = {}
    try:
        for key, limit in limits.items():
            if key in values:
                fields[key] = limit.check(key, values[key])
    except ValueError as error:
        raise UserError(f"{source}: bad {what}: {error}") from error
    return fields


def read_config_fields(text: str, limits: Mapping[str, Limit], source: str, what: str) -> dict[str, object]:
    """:func:`checked_fields` of the JSON object ``text`` (:func:`read_json_object`).

    Raises:
        UserError: naming ``source`` and ``what`` (e.g. "MambaIC config") on anything else.
    """
    return checked_fields(read_json_object(text, source, what), limits, source, what)


def meta_state_shapes(build: Callable[[], nn.Module], source: str, what: str) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and buffer of ``build()``, built on the meta device (allocates nothing).
    An inconsistent config (fields that do not fit together) is a :class:`UserError`."""
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception as error:  # noqa: BLE001 - any constructor error means the file's config does not fit together
        raise UserError(f"{source}: its {what} does not describe a model ({type(error).__name__}: {error})") from error
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def shape_mismatches(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], resizable: tuple[str, ...] = ()
) -> str | None:
    """What differs between a model's ``expected`` state shapes and a file's ``found`` ones, or ``None``;
    keys ending in ``resizable`` may differ in shape (entropy-coder tables rebuilt after loading)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:  # names cut to 80 characters: a crafted file's 20 MB name made a 20 MB message
        return (f"{len(missing)} missing keys (e.g. {[f'{key:.80}' for key in missing[:3]]}), "
                f"{len(unexpected)} unexpected (e.g. {[f'{key:.80}' for key in unexpected[:3]]})")
    for key, shape in found.items():
        if tuple(shape) != tuple(expected[key]) and not key.endswith(resizable):
            return f"{key:.80} has shape {tuple(shape)}, the model expects {tuple(expected[key])}"
    return None


def check_floating_where_expected(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str) -> None:
    """A :class:`UserError` naming the first tensor of ``tensors`` that is integer or bool where ``expected`` (a
    model's state dict) has a floating-point one: ``load_state_dict`` casts it without a word (an int64 checkpoint
    exported an ONNX file of truncated weights, and its check against the same model passed)."""
    for key, tensor in tensors.items():
        if key in expected and expected[key].is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"{source}: weight {short_repr(key)} is {tensor.dtype}; the model's is "
                            f"{expected[key].dtype} (model weights are floating-point)")


def check_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """A :class:`UserError` naming the first tensor of ``tensors`` that is complex, or floating-point holding NaN
    or infinity as float32, the dtype the models load it in (a float64 1e300 is finite until then, and a complex
    NaN is not floating-point: both decoded to black images)."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_complex():
            raise UserError(f"{source}: weight {short_repr(key)} is complex ({tensor.dtype}); model weights are real")
        if tensor.is_floating_point():
            values = tensor if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else tensor.float()
            if not bool(torch.isfinite(values).all()):
                raise UserError(f"{source}: weight {short_repr(key)} holds NaN or infinite values (as float32)")


#: timm options that size a ViT, bounded before timm builds anything (a depth of 10^6 would spend minutes building
#: blocks even on the meta device); other options reach timm, which refuses those a model does not know
TIMM_OPTION_LIMITS: dict[str, Limit] = {
    "depth": Limit(1, 256),
    "embed_dim": Limit(1, 16384),
    "num_heads": Limit(1, 1024),
    "patch_size": Limit(1, 8192),
    "img_size": Limit(1, 8192),
    "mlp_ratio": Limit(0, 64, "float"),
}
#: model options: at most this many, each a scalar, a list of at most MAX_OPTION_ITEMS scalars, or a dict of at most
#: that many such values under string keys
MAX_TIMM_OPTIONS = 64
MAX_OPTION_ITEMS = 64


def _is_option_value(value: object, nested: bool = True) -> bool:
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 4096):
        return True
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_OPTION_ITEMS and all(_is_option_value(item, nested=False) for item in value)
    if isinstance(value, dict) and nested:
        return len(value) <= MAX_OPTION_ITEMS and all(
            isinstance(key, str) and _is_option_value(item, nested=False) for key, item in value.items()
        )
    return False


def check_timm_options(options: Mapping[str, object]) -> None:
    """``options`` within :data:`TIMM_OPTION_LIMITS`, :data:`MAX_TIMM_OPTIONS` and :data:`MAX_OPTION_ITEMS`
    (a :class:`UserError` naming the option)."""
    if len(options) > MAX_TIMM_OPTIONS:
        raise UserError(f"{len(options)} model options; at most {MAX_TIMM_OPTIONS}")
    for key, value in options.items():
        if not isinstance(key, str) or not _is_option_value(value):
            raise UserError(
                f"model option {key}={short_repr(value)}: expected a number, a string, or a list or dict of at most "
                f"{MAX_OPTION_ITEMS} of them"
            )
        limit = TIMM_OPTION_LIMITS.get(key)
        if limit is not None:
            try:
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    limit.check(key, item)
            except ValueError as error:
                raise UserError(f"model option {error}") from None
    overlay = options.get("pretrained_cfg_overlay")
    files = [options.get("checkpoint_path"), overlay.get("file") if isinstance(overlay, Mapping) else None]
    for path in files:  # weights timm would read: checked as effvision reads a checkpoint
        if path is not None:
            from effvision.torch_checkpoint import check_weights_file

            check_weights_file(str(path))


def physical_memory_bytes() -> int:
    """This machine's memory (bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_float32_fits(shape: Sequence[int], what: str) -> None:
    """A :class:`UserError` when a float32 tensor of ``shape`` (``what``, e.g. "a batch of 16 crops of 256 px")
    would take more than a quarter of this machine's memory (:func:`check_memory_fits`)."""
    check_memory_fits(4 * math.prod(int(n) for n in shape), what)


def check_memory_fits(needed: int, what: str, share: int = 4) -> None:
    """A :class:`UserError` when ``needed`` bytes (``what`` needs them) exceed ``1/share`` of this machine's memory:
    an option or a folder asks for them before any allocation (a larger request would be killed by the OS, or
    swap for hours, instead of a clear error)."""
    budget = physical_memory_bytes() // share
    if needed > budget:
        portion = {2: "half", 4: "a quarter"}.get(share, f"1/{share}")
        raise UserError(
            f"{what} would take {needed / 2**30:.1f} GiB; at most {portion} of this machine's memory "
            f"({budget / 2**30:.1f} GiB) is allowed"
        )


#: patches per image a model built from options may have (2048 x 2048 px at patch 16): a ViT's attention
#: grows with the square, so 8192 px at patch 16 (262144 tokens) would take hours per image on a CPU.
MAX_TOKENS = 16384


def check_timm_model(name: str, options: Mapping[str, object]) -> None:
    """:func:`check_timm_options`, then ``timm.create_model(name, **options)`` on the meta device (no memory),
    refused when its weights alone would not fit in this machine's memory or its input is larger than
    :data:`effvision.image_io.MAX_PIXELS` or cut into more than :data:`MAX_TOKENS` patches (a :class:`UserError`)."""
    import timm
    import torch

    from effvision.image_io import MAX_PIXELS

    check_timm_options(options)
    described = f"{name} with {dict(options)}"
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **options)
    except (TypeError, ValueError, AssertionError) as error:  # options the model refuses (a real build would too)
        raise UserError(f"cannot build {described}: {error}") from error
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: its options are bounded
        return
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    memory = physical_memory_bytes()
    if size > memory:
        raise UserError(
            f"{described} has {size / 2**30:.1f} GiB of weights; this machine has {memory / 2**30:.1f} GiB of memory"
        )
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if height * width > MAX_PIXELS:
            raise UserError(f"{described} takes {width}x{height} images; at most {MAX_PIXELS} pixels are allowed")
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if isinstance(tokens, int) and tokens > MAX_TOKENS:
        raise UserError(
            f"{described} has {tokens} tokens per image; at most {MAX_TOKENS} are allowed "
            "(attention costs grow with their square)"
        )
