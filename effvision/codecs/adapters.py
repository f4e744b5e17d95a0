"""Wrap compressai-style models as :class:`effvision.codecs.base.ImageCodec`, and the built-in loaders.

A compressai ``CompressionModel`` returns ``{"strings": [[bytes] per entropy model], "shape": ...}`` from
``compress`` and takes the strings back in ``decompress(strings, shape)``. The models here take the image
size as ``shape`` (they pad internally and derive every latent grid from it), so the container's image
size is the single source of truth: a file stores one section per entropy model and nothing else. Version-1
files also stored the shape (one ``uint8`` rank, then one ``uint16`` per dimension) in a first section; it
must be exactly the rank-2 image size and is dropped (:meth:`CompressAIImageCodec.strip_version1_sections`).

The wrapped model may provide ``check_strings(strings, shape)`` (cheap plausibility checks run before any
decoding work) and ``decode_memory_bytes(shape)`` (a peak-memory estimate).
"""

from __future__ import annotations

import copy
import inspect
import numbers
import re
import struct
from pathlib import Path

import torch

from effvision.codecs.base import ImageCodec, fingerprint_module
from effvision.codecs.rans import CorruptStreamError
from effvision.errors import UserError, short_repr


class CompressAIImageCodec(ImageCodec):
    """An :class:`ImageCodec` around a model with compressai's ``compress``/``decompress`` contract.

    Args:
        model: the compression model; ``update()`` is called once if it has one (builds the CDF tables).
        name: codec id written into files.
        config_id: configuration id written into files (e.g. ``"lite-q4"``).
        device: where the transforms run; entropy coding runs on the CPU inside compressai.
        compress_kwargs: extra ``compress()`` options, e.g. ``{"chunks": 4}`` for VQGAN's independently
            decodable row bands (one section each; a section the container marks lost is passed to
            ``decompress(..., lost=[flag per section])`` and restored by models that accept ``lost``).
        tile_size: side of the square tiles images are coded in (see :class:`ImageCodec`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        config_id: str,
        device: str = "cpu",
        compress_kwargs: dict | None = None,
        tile_size: int = 1024,
    ) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.config_id = config_id
        self.tile_size = tile_size
        # the model pads each tile to a multiple of its ``pad_multiple`` (MambaIC 64, VQGAN 16) inside
        self.min_tile_side = int(getattr(model, "pad_multiple", 1))
        self.device = device
        self.compress_kwargs = dict(compress_kwargs or {})
        if hasattr(model, "update"):
            model.update()
        self._accepts_lost = "lost" in inspect.signature(model.decompress).parameters
        self._fingerprint = fingerprint_module(self.model, config_id)

    def fingerprint(self) -> bytes:
        return self._fingerprint

    def with_effort(self, effort: int) -> CompressAIImageCodec:
        """This codec (same model, same files' decoder) encoding with ``effort`` steps of encoder-side latent
        refinement (e.g. :meth:`effvision.codecs.mambaic.MambaIC.refine_latents`); 0 = plain encoding."""
        if effort < 0:
            raise UserError(f"effort must be 0 or more, got {effort}")
        if effort and "effort" not in inspect.signature(self.model.compress).parameters:
            raise UserError(f"codec {self.name!r} has no encoder-side refinement (--effort)")
        codec = copy.copy(self)
        codec.compress_kwargs = {key: value for key, value in self.compress_kwargs.items() if key != "effort"}
        if effort:
            codec.compress_kwargs["effort"] = effort
        return codec

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> list[bytes]:
        out = self.model.compress(image.unsqueeze(0).to(self.device), **self.compress_kwargs)
        return [bytes(strings[0]) for strings in out["strings"]]

    def check_sections(self, sections: list[bytes | None], height: int, width: int) -> None:
        if not sections:
            raise UserError("corrupt payload: a tile without sections")
        if any(section is None for section in sections) and not self._accepts_lost:
            raise UserError(f"codec {self.name!r} cannot restore lost sections")
        if hasattr(self.model, "check_strings"):
            self.model.check_strings(sections, (height, width))

    def decode_memory_bytes(self, height: int, width: int) -> int:
        if hasattr(self.model, "decode_memory_bytes"):
            return int(self.model.decode_memory_bytes((height, width)))
        return 0

    def strip_version1_sections(self, sections: list[bytes | None], height: int, width: int) -> list[bytes | None]:
        shape_section = sections[0] if sections else None
        if not shape_section or len(shape_section) != 5 or shape_section[0] != 2:
            raise UserError("corrupt payload: a version-1 shape section must hold the rank-2 image size")
        shape = struct.unpack("<2H", shape_section[1:])
        if shape != (height, width):
            raise UserError(f"corrupt payload: shape section says {shape}, the header {(height, width)}")
        return sections[1:]

    @torch.no_grad()
    def decode(self, sections: list[bytes | None], height: int, width: int) -> torch.Tensor:
        self.check_sections(sections, height, width)
        lost = [section is None for section in sections]
        kwargs = {"lost": lost} if any(lost) else {}
        strings = [[section if section is not None else b""] for section in sections]
        try:
            x_hat = self.model.decompress(strings, (height, width), **kwargs)["x_hat"]
        except CorruptStreamError as error:
            raise UserError(f"corrupt payload: {error}") from error
        except (ValueError, IndexError, KeyError, struct.error) as error:
            raise UserError(f"corrupt payload: {self.name} decoder failed ({error})") from error
        if x_hat.shape[-2:] != (height, width):
            raise UserError(f"corrupt payload: decoded {tuple(x_hat.shape[-2:])} pixels, header says {(height, width)}")
        return x_hat[0].clamp(0, 1).to("cpu")


ASSETS = Path(__file__).resolve().parents[1] / "assets"


def check_quality(quality) -> None:
    """A :class:`UserError` unless ``quality`` is None or an int (numpy's too; not a bool, a string or a tensor:
    "2" used to load quality 2 by the text of its name)."""
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, numbers.Integral)):
        raise UserError(f"quality must be an integer, got {short_repr(quality, 40)} ({type(quality).__name__})")


#: the shipped MambaIC quality used when none is asked for (lambda = 0.013, compressai's middle quality).
#: The ladder numbers qualities as compressai's zoo does (MSE): q1..q5 are lambda 0.0018, 0.0035, 0.0067,
#: 0.013 and 0.025 (compressai's q6, 0.0483, was trained but loses to JPEG and is not shipped).
MAMBAIC_DEFAULT_QUALITY = 4


def shipped_weights(codec: str) -> dict[str, Path]:
    """Weights shipped in ``effvision/assets`` as ``<codec>-<config id>.safetensors``: config id -> path."""
    prefix = f"{codec}-"
    return {p.stem[len(prefix) :]: p for p in sorted(ASSETS.glob(f"{prefix}*.safetensors"))}


def select_weights(
    codec: str, quality: int | None, checkpoint: str | Path | None, config_id: str | None, pretrained: bool = False
) -> tuple[Path, str]:
    """The weights file and config id for a loader.

    ``checkpoint`` wins (its config id is the file's own when decoding, ``file-<stem>`` when encoding;
    the fingerprint then proves it is the right file). Otherwise the shipped weights named by
    ``config_id`` (decoding), by ``quality`` (``...-q<quality>``), or the only/first shipped one.
    Official releases (``pretrained``, or a config id of :data:`effvision.codecs.pretrained.PRETRAINED`)
    come from :func:`effvision.codecs.pretrained.select_pretrained`.
    """
    if pretrained and checkpoint is not None:
        raise UserError("pass either pretrained weights (--pretrained) or a checkpoint (--checkpoint), not both")
    if checkpoint is None:
        from effvision.codecs.pretrained import select_pretrained

        official = select_pretrained(codec, config_id, pretrained)
        if official is not None:
            return official
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
    matches = [name for name in shipped if name.endswith(f"q{quality}")]  # quality checked an int by the loaders
    if not matches:
        raise UserError(f"no shipped {codec} weights for quality {quality}; shipped: {', '.join(shipped)}")
    return shipped[matches[0]], matches[0]


def load_mambaic(
    quality: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    config_id: str | None = None,
    pretrained: bool = False,
) -> CompressAIImageCodec:
    """Loader registered as ``"mambaic"`` (MambaIC pads internally; ``shape`` is the image size).

    Without quality, checkpoint or config id: quality :data:`MAMBAIC_DEFAULT_QUALITY` of the shipped ladder.
    """
    from effvision.codecs.mambaic.checkpoint import load_checkpoint

    check_quality(quality)
    nothing_asked = quality is None and checkpoint is None and config_id is None and not pretrained
    if nothing_asked and f"lite-q{MAMBAIC_DEFAULT_QUALITY}" in shipped_weights("mambaic"):
        quality = MAMBAIC_DEFAULT_QUALITY
    path, config_id = select_weights("mambaic", quality, checkpoint, config_id, pretrained)
    model = load_checkpoint(path, device=device)
    return CompressAIImageCodec(model, "mambaic", config_id, device=device, tile_size=1024)


def load_vqgan(
    quality: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    config_id: str | None = None,
    pretrained: bool = False,
) -> CompressAIImageCodec:
    """Loader registered as ``"vqgan"`` (VQGAN pads internally; ``shape`` is the image size).

    Qualities are codebook sizes (:data:`effvision.codecs.vqgan.model.QUALITY_TO_K`, 1 = smallest files): the
    shipped codec's codebook K-means-clustered (seed 0, deterministic) to K entries, config id ``<base>-k<K>``,
    which decoding rebuilds the same way (the fingerprint then proves it is the same codebook). Files of the
    shipped or a given checkpoint's weights carry a colour band (:mod:`effvision.codecs.vqgan.colour_band`), files
    of the official release (``pretrained``) do not; every decoder reads both.
    """
    from effvision.codecs.vqgan.model import QUALITY_TO_K, VQGANCodec

    clustered_k = None
    if checkpoint is None and not pretrained:
        if config_id is not None and re.fullmatch(r".+-k\d+", config_id) and config_id not in shipped_weights("vqgan"):
            config_id, _, k = config_id.rpartition("-k")
            clustered_k = int(k)
        elif config_id is None and quality is not None:
            check_quality(quality)
            if quality not in QUALITY_TO_K:
                raise UserError(f"VQGAN quality must be one of {sorted(QUALITY_TO_K)} (codebook sizes), got {quality}")
            clustered_k, quality = QUALITY_TO_K[quality], None
    path, config_id = select_weights("vqgan", quality, checkpoint, config_id, pretrained)
    model = VQGANCodec.load(path)
    if clustered_k is not None and clustered_k != model.codebook_size:
        if clustered_k not in QUALITY_TO_K.values() or clustered_k > model.codebook_size:
            # only the qualities' codebooks: a crafted K = 1 file (0 bits an index) made a 1 kB file ask for
            # 64 full-size tile decodes, and any other K costs a clustering before the fingerprint is checked
            raise UserError(
                f"cannot cluster the {model.codebook_size}-entry codebook of {config_id} to {clustered_k}: files "
                f"of these weights use {sorted(QUALITY_TO_K.values())} entries (--quality {sorted(QUALITY_TO_K)})"
            )
        model = model.cluster(clustered_k, seed=0)
        config_id = f"{config_id}-k{clustered_k}"
    # our colour band (effvision.codecs.vqgan.colour_band, a few hundred bytes) fixes the colour cast of small
    # models; the official release codes as Mao et al. do, so its decodes stay those of the official code
    options = {} if pretrained else {"colour": True}
    if model.index_model is None:  # official weights: no fitted index model
        options["coder"] = "fixed"
    tile_size = model.tile_size or 1024  # the scale the weights were trained at (official: whole images)
    return CompressAIImageCodec(model, "vqgan", config_id, device=device, compress_kwargs=options, tile_size=tile_size)
