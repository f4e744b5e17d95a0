"""Wrap compressai-style models as :class:`effvision.codecs.base.ImageCodec`, and the built-in loaders.

A compressai ``CompressionModel`` returns ``{"strings": [[bytes] per entropy model], "shape": latent
shape}`` from ``compress`` and takes both back in ``decompress``. The adapter stores the latent shape in
section 0 (little-endian: one ``uint8`` rank, then one ``uint16`` per dimension) and one section per
entropy model after it, so a codec author writes only the model.
"""

from __future__ import annotations

import inspect
import struct
from pathlib import Path

import torch

from effvision.codecs.base import ImageCodec, fingerprint_module
from effvision.errors import UserError

MAX_LATENT_RANK = 4


def _encode_shape(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<B{len(shape)}H", len(shape), *shape)


def _decode_shape(section: bytes, expected: tuple[int, int]) -> tuple[int, ...]:
    if not section or section[0] == 0 or section[0] > MAX_LATENT_RANK or len(section) != 1 + 2 * section[0]:
        raise UserError("corrupt payload: bad latent shape section")
    shape = struct.unpack(f"<{section[0]}H", section[1:])
    # The latent size follows from the image size; checking it bounds what decompress() allocates.
    if tuple(shape[-2:]) != expected:
        raise UserError(f"corrupt payload: latent shape {shape} does not match the image ({expected})")
    return shape


class CompressAIImageCodec(ImageCodec):
    """An :class:`ImageCodec` around a model with compressai's ``compress``/``decompress`` contract.

    Args:
        model: the compression model; ``update()`` is called once if it has one (builds the CDF tables).
        name: codec id written into files.
        config_id: configuration id written into files (e.g. ``"lite-q3"``).
        alignment: height/width multiple the model needs (e.g. 64 for 4 stride-2 layers + a 4x hyperprior).
        latent_stride: image size / the spatial size of compress()'s ``"shape"`` (default ``alignment``;
            16 for a model whose ``shape`` is the main latent of a 16x analysis transform).
        device: where the transforms run; entropy coding runs on the CPU inside compressai.
        compress_kwargs: extra ``compress()`` options, e.g. ``{"chunks": 4}`` for VQGAN's independently
            decodable row bands (one section each; a section the container marks lost is passed to
            ``decompress(..., lost=[flag per section])`` and restored by models that accept ``lost``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        config_id: str,
        alignment: int,
        latent_stride: int | None = None,
        device: str = "cpu",
        compress_kwargs: dict | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.config_id = config_id
        self.alignment = alignment
        self.latent_stride = latent_stride or alignment
        self.device = device
        self.compress_kwargs = dict(compress_kwargs or {})
        if hasattr(model, "update"):
            model.update()
        self._accepts_lost = "lost" in inspect.signature(model.decompress).parameters
        self._fingerprint = fingerprint_module(self.model, config_id)

    def fingerprint(self) -> bytes:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> list[bytes]:
        out = self.model.compress(image.unsqueeze(0).to(self.device), **self.compress_kwargs)
        sections = [_encode_shape(tuple(int(s) for s in out["shape"]))]
        for strings in out["strings"]:
            sections.append(bytes(strings[0]))
        return sections

    @torch.no_grad()
    def decode(self, sections: list[bytes | None], height: int, width: int) -> torch.Tensor:
        if len(sections) < 2 or sections[0] is None:
            raise UserError("corrupt payload: missing latent shape or bitstream sections")
        shape = _decode_shape(sections[0], (height // self.latent_stride, width // self.latent_stride))
        lost = [section is None for section in sections[1:]]
        kwargs = {}
        if any(lost):
            if not self._accepts_lost:
                raise UserError(f"codec {self.name!r} cannot restore lost sections")
            kwargs["lost"] = lost  # one flag per entropy-coded section, e.g. VQGAN's row bands
        strings = [[section if section is not None else b""] for section in sections[1:]]
        try:
            x_hat = self.model.decompress(strings, shape, **kwargs)["x_hat"]
        except (RuntimeError, ValueError, IndexError, KeyError, struct.error) as error:
            raise UserError(f"corrupt payload: {self.name} decoder failed ({error})") from error
        if x_hat.shape[-2:] != (height, width):
            raise UserError(f"corrupt payload: decoded {tuple(x_hat.shape[-2:])} pixels, header says {(height, width)}")
        return x_hat[0].clamp(0, 1).to("cpu")


ASSETS = Path(__file__).resolve().parents[1] / "assets"


def shipped_weights(codec: str) -> dict[str, Path]:
    """Weights shipped in ``effvision/assets`` as ``<codec>-<config id>.safetensors``: config id -> path."""
    prefix = f"{codec}-"
    return {p.stem[len(prefix) :]: p for p in sorted(ASSETS.glob(f"{prefix}*.safetensors"))}


def select_weights(
    codec: str, quality: int | None, checkpoint: str | Path | None, config_id: str | None
) -> tuple[Path, str]:
    """The weights file and config id for a loader.

    ``checkpoint`` wins (its config id is the file's own when decoding, ``file-<stem>`` when encoding;
    the fingerprint then proves it is the right file). Otherwise the shipped weights named by
    ``config_id`` (decoding), by ``quality`` (``...-q<quality>``), or the only/first shipped one.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        return path, config_id if config_id is not None else f"file-{path.stem}"[:64]
    shipped = shipped_weights(codec)
    if config_id is not None:
        if config_id not in shipped:
            raise UserError(
                f"the file was written with {codec} weights {config_id!r}, which are not shipped; "
                "pass the checkpoint it was encoded with (--checkpoint)"
            )
        return shipped[config_id], config_id
    if not shipped:
        raise UserError(f"no {codec} weights are shipped with this installation; pass --checkpoint")
    if quality is None:
        config_id = next(iter(shipped))
        return shipped[config_id], config_id
    matches = [name for name in shipped if name.endswith(f"q{quality}")]
    if not matches:
        raise UserError(f"no shipped {codec} weights for quality {quality}; shipped: {', '.join(shipped)}")
    return shipped[matches[0]], matches[0]


def load_mambaic(
    quality: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    config_id: str | None = None,
) -> CompressAIImageCodec:
    """Loader registered as ``"mambaic"``: MambaIC pads internally and its ``shape`` is the image size."""
    from effvision.codecs.mambaic.checkpoint import load_checkpoint

    path, config_id = select_weights("mambaic", quality, checkpoint, config_id)
    model = load_checkpoint(path, device=device)
    return CompressAIImageCodec(model, "mambaic", config_id, alignment=1, latent_stride=1, device=device)


def load_vqgan(
    quality: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    config_id: str | None = None,
) -> CompressAIImageCodec:
    """Loader registered as ``"vqgan"``: VQGAN pads internally and its ``shape`` is the image size."""
    from effvision.codecs.vqgan.model import VQGANCodec

    path, config_id = select_weights("vqgan", quality, checkpoint, config_id)
    return CompressAIImageCodec(VQGANCodec.load(path), "vqgan", config_id, alignment=1, latent_stride=1, device=device)
