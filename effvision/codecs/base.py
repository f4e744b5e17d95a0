"""The codec interface the CLI and the ``.evc`` container need, and the one codec registry.

A codec turns one RGB image into a list of byte *sections* and back. The container (see
``docs/format.md``) stores the sections together with the codec name, its configuration id and a
fingerprint of its configuration + weights, so a file is only ever decoded by the codec that wrote it.

Registering a codec never imports it: :func:`register_codec` takes a dotted path
(``"package.module:function"``) that :func:`load_codec` imports on first use. The loader is called as
``loader(quality=..., checkpoint=..., device=..., config_id=...)`` and returns an :class:`ImageCodec`;
``config_id`` is set when decoding a file (the loader rebuilds that configuration) and ``None`` when
encoding (the loader picks it from ``quality``/``checkpoint``).
compressai-style models (``compress(x) -> {"strings", "shape"}``, ``decompress(strings, shape) ->
{"x_hat"}``) are wrapped by :class:`effvision.codecs.adapters.CompressAIImageCodec`, so a codec
author only writes the model and a loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from effvision.errors import UserError

MAX_NAME_LENGTH = 32
MAX_CONFIG_ID_LENGTH = 64


class ImageCodec(ABC):
    """An image codec as the container sees it.

    Attributes:
        name: short id stored in every file (ASCII, at most 32 bytes), e.g. ``"mambaic"``.
        config_id: configuration id stored in every file (ASCII, at most 64 bytes), e.g. ``"lite-q4"``.
        alignment: the image height and width the codec accepts must be multiples of this; the container
            pads (edge replication) and records the padding.
        tile_size: side of the square tiles an image is cut into for encoding (a multiple of
            ``alignment``); each tile is coded on its own, so memory is bounded by the tile, not the image.
        max_tile_pixels: largest tile a file may declare; decoding refuses bigger ones before any work.
        min_tile_side: smallest tile side a file may declare, unless that side spans the whole (padded) image:
            a codec that pads every tile to a multiple of this inside spends as much on a smaller tile, so
            a file of many tiny tiles would cost thousands of times the decoding work of its pixels.
    """

    name: str
    config_id: str
    alignment: int = 1
    tile_size: int = 1024
    max_tile_pixels: int = 2048 * 2048
    min_tile_side: int = 1

    @abstractmethod
    def fingerprint(self) -> bytes:
        """A digest of the configuration and weights (at most 64 bytes): decoding refuses a mismatch."""

    @abstractmethod
    def encode(self, image: torch.Tensor) -> list[bytes]:
        """Encode one image.

        Args:
            image: (3, H, W) float tensor in [0, 1]; H and W are multiples of ``alignment``.

        Returns:
            The payload sections, in order.
        """

    @abstractmethod
    def decode(self, sections: list[bytes | None], height: int, width: int) -> torch.Tensor:
        """Decode the sections written by :meth:`encode` back to a (3, height, width) float image in [0, 1].

        A section is ``None`` when the file marks it as lost; a codec that cannot restore lost data
        raises :class:`effvision.errors.UserError`. Corrupt sections must raise ``UserError`` too.
        """

    def check_sections(self, sections: list[bytes | None], height: int, width: int) -> None:  # noqa: B027
        """Refuse, before any decoding work, sections that cannot be what :meth:`encode` writes for a
        (height, width) image: wrong count, lost where the codec cannot restore, shorter than the
        information the codec's probability tables force. Raises :class:`UserError`. Default: no check."""

    def decode_memory_bytes(self, height: int, width: int) -> int:
        """Estimated peak memory (bytes) of :meth:`decode` for a (height, width) image; 0 if unknown."""
        return 0

    def strip_version1_sections(self, sections: list[bytes | None], height: int, width: int) -> list[bytes | None]:
        """The sections of a version-1 file in this release's layout (e.g. without a leading shape section)."""
        return sections


FINGERPRINT_BYTES = 16
#: how far outside [0, 1] an image given to a codec may stray (a resampling filter's overshoot) before it is
#: refused; 0..255 input, the usual mistake, codes without error but as another, saturated image
IMAGE_RANGE_SLACK = 0.05


def check_image_batch(x: object) -> None:
    """Refuse, with a ``TypeError`` or ``ValueError`` naming the problem, what a codec's ``compress`` cannot
    code as images: anything but a (B, 3, H, W) floating-point tensor of finite values in [0, 1]
    (within :data:`IMAGE_RANGE_SLACK`). Before, a NaN image was blamed on the weights, a 3-D or integer
    tensor failed deep inside the model, and a 0..255 image was coded as another."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), not {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got {x.dtype}")
    if x.numel() == 0:
        return  # each codec says what it needs (at least a pixel)
    low, high = torch.aminmax(x.detach())
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError("images hold NaN or infinite values")
    if low < -IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
        raise ValueError(f"image values must lie in [0, 1], got [{float(low):.4g}, {float(high):.4g}] "
                         "(divide 8-bit images by 255)")


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Run the block with every sub-module of ``module`` in eval mode, then give each its own flag back.

    Coding must be deterministic: a model left in training mode after a training loop (compressai users
    call ``compress`` straight after one) applied stochastic depth while coding, so the encoder and the
    decoder computed different means and a valid stream decoded as "corrupt data"."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


@contextlib.contextmanager
def gradients_available() -> Iterator[None]:
    """Leave ``torch.inference_mode`` for the block (encoder-side refinement takes gradient steps; inside it
    ``enable_grad`` cannot give them: "element 0 of tensors does not require grad"). Pass tensors made in
    inference mode through ``.clone()`` inside the block."""
    with torch.inference_mode(False):
        yield


def fingerprint_module(module: torch.nn.Module, config_id: str) -> bytes:
    """SHA-256 over the config id and every state-dict tensor (name, dtype, shape, values), in name
    order, truncated to 16 bytes (128 bits tell weights apart; every byte counts at 0.03 bpp)."""
    digest = hashlib.sha256(config_id.encode("utf-8"))
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(str(tuple(tensor.shape)).encode("ascii"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()[:FINGERPRINT_BYTES]


CodecLoader = Callable[..., ImageCodec]

# name -> "module:function" (imported on first use) or the loader itself.
_REGISTRY: dict[str, str | CodecLoader] = {
    "mambaic": "effvision.codecs.adapters:load_mambaic",
    "vqgan": "effvision.codecs.adapters:load_vqgan",
}


def register_codec(name: str, loader: str | CodecLoader, *, overwrite: bool = False) -> None:
    """Register a codec under ``name``.

    Args:
        name: the id written into files (ASCII, at most 32 bytes).
        loader: ``"package.module:function"`` (imported lazily) or a callable
            ``loader(quality=None, checkpoint=None, device="cpu", config_id=None) -> ImageCodec``.
        overwrite: replace an existing registration instead of raising ``ValueError``.
    """
    if not name.isascii() or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"codec name must be 1-{MAX_NAME_LENGTH} ASCII characters, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"codec {name!r} is already registered")
    _REGISTRY[name] = loader


def unregister_codec(name: str) -> None:
    """Remove a registration (used by tests that register temporary codecs)."""
    _REGISTRY.pop(name, None)


def available_codecs() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> CodecLoader:
    if name not in _REGISTRY:
        raise UserError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    loader = _REGISTRY[name]
    if callable(loader):
        return loader
    module_name, _, function_name = loader.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"codec {name!r} is not available in this installation ({error})") from error
    return getattr(module, function_name)


def load_codec(
    name: str,
    quality: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    config_id: str | None = None,
    pretrained: bool = False,
) -> ImageCodec:
    """Build the registered codec ``name`` on ``device``.

    For encoding pass ``quality`` or ``checkpoint`` (or ``pretrained=True``: the official release's weights,
    fetched through huggingface_hub and cached; see docs/pretrained.md); for decoding pass the file's
    ``config_id`` (and the ``checkpoint`` it was written with, when it was not a shipped one).
    """
    options = {"pretrained": True} if pretrained else {}  # loaders without official weights need not take it
    codec = _resolve(name)(quality=quality, checkpoint=checkpoint, device=device, config_id=config_id, **options)
    if codec.name != name:
        raise ValueError(f"loader for {name!r} returned a codec named {codec.name!r}")
    if config_id is not None and codec.config_id != config_id:
        raise UserError(f"codec {name!r} cannot build configuration {config_id!r} (got {codec.config_id!r})")
    return codec


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; an unavailable ``"cuda"`` is a UserError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return device
