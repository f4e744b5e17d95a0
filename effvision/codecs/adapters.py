"""Wrap compressai-style models as :class:`effvision.codecs.base.ImageCodec`, and the built-in loaders.

A compressai ``CompressionModel`` returns ``{"strings": [[bytes] per entropy model], "shape": latent
shape}`` from ``compress`` and takes both back in ``decompress``. The adapter stores the latent shape in
section 0 (little-endian: one ``uint8`` rank, then one ``uint16`` per dimension) and one section per
entropy model after it, so a codec author writes only the model.
"""

from __future__ import annotations

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
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        config_id: str,
        alignment: int,
        latent_stride: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.config_id = config_id
        self.alignment = alignment
        self.latent_stride = latent_stride or alignment
        self.device = device
        if hasattr(model, "update"):
            model.update()
        self._fingerprint = fingerprint_module(self.model, config_id)

    def fingerprint(self) -> bytes:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> list[bytes]:
        out = self.model.compress(image.unsqueeze(0).to(self.device))
        sections = [_encode_shape(tuple(int(s) for s in out["shape"]))]
        for strings in out["strings"]:
            sections.append(bytes(strings[0]))
        return sections

    @torch.no_grad()
    def decode(self, sections: list[bytes | None], height: int, width: int) -> torch.Tensor:
        if len(sections) < 2 or sections[0] is None:
            raise UserError("corrupt payload: missing latent shape or bitstream sections")
        shape = _decode_shape(sections[0], (height // self.latent_stride, width // self.latent_stride))
        if any(section is None for section in sections):
            raise UserError(f"codec {self.name!r} cannot restore lost sections")
        strings = [[section] for section in sections[1:]]
        try:
            x_hat = self.model.decompress(strings, shape)["x_hat"]
        except (RuntimeError, ValueError, IndexError, KeyError, struct.error) as error:
            raise UserError(f"corrupt payload: {self.name} decoder failed ({error})") from error
        if x_hat.shape[-2:] != (height, width):
            raise UserError(f"corrupt payload: decoded {tuple(x_hat.shape[-2:])} pixels, header says {(height, width)}")
        return x_hat[0].clamp(0, 1).to("cpu")


def chunk_sizes(total: int, chunks: int) -> list[int]:
    """Split ``total`` bytes into ``chunks`` near-equal sizes (the first ``total % chunks`` one larger)."""
    return [total // chunks + (i < total % chunks) for i in range(chunks)]


class VQGANImageCodec(CompressAIImageCodec):
    """The VQGAN codec with optional loss resilience.

    ``chunks=1``: one rANS-coded index stream (smallest files). ``chunks>1``: the fixed-length index
    stream split into that many sections; a section the container marks lost becomes a range of lost
    indices that the codec's restorer fills in (Mao et al., DCC 2024, lost-index restoration).
    """

    def __init__(self, model: torch.nn.Module, name: str, config_id: str, chunks: int = 1, device: str = "cpu"):
        super().__init__(model, name, config_id, alignment=1, latent_stride=1, device=device)
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> list[bytes]:
        if self.chunks == 1:
            return super().encode(image)
        out = self.model.compress(image.unsqueeze(0).to(self.device), coder="fixed")
        stream = out["strings"][0][0]
        sections, offset = [_encode_shape(tuple(out["shape"]))], 0
        for size in chunk_sizes(len(stream), self.chunks):
            sections.append(stream[offset : offset + size])
            offset += size
        return sections

    @torch.no_grad()
    def decode(self, sections: list[bytes | None], height: int, width: int) -> torch.Tensor:
        if len(sections) <= 2 or not any(section is None for section in sections[1:]):
            if len(sections) > 2 and sections[0] is not None:
                sections = [sections[0], b"".join(sections[1:])]
            return super().decode(sections, height, width)
        from effvision.codecs.vqgan.index_coding import FIXED_LENGTH, HEADER, bits_per_index, lost_positions

        if sections[0] is None:
            raise UserError("corrupt payload: the latent shape section is lost")
        shape = _decode_shape(sections[0], (height, width))
        h, w = self.model.index_grid(shape)
        k = self.model.codebook_size
        total = HEADER.size + -(-h * w * bits_per_index(k) // 8)
        sizes = chunk_sizes(total, len(sections) - 1)
        stream, missing, offset = bytearray(), [], 0
        for section, size in zip(sections[1:], sizes, strict=True):
            if section is None:
                missing.append((offset, offset + size))
                section = bytes(size)
            elif len(section) != size:
                raise UserError(f"corrupt payload: index chunk of {len(section)} bytes, expected {size}")
            stream += section
            offset += size
        stream[: HEADER.size] = HEADER.pack(FIXED_LENGTH, 0)  # checksum unused for a damaged stream
        lost = lost_positions(h, w, k, missing)
        try:
            x_hat = self.model.decompress([[bytes(stream)]], shape, lost=lost)["x_hat"]
        except (RuntimeError, ValueError, IndexError) as error:
            raise UserError(f"corrupt payload: {self.name} decoder failed ({error})") from error
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
) -> VQGANImageCodec:
    """Loader registered as ``"vqgan"``: VQGAN pads internally and its ``shape`` is the image size."""
    from effvision.codecs.vqgan.model import VQGANCodec

    path, config_id = select_weights("vqgan", quality, checkpoint, config_id)
    return VQGANImageCodec(VQGANCodec.load(path), "vqgan", config_id, device=device)
