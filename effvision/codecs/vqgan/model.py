"""The VQGAN extreme-compression codec (Mao et al., DCC 2024, arXiv 2307.08265) as a compressai model.

An image (B, 3, H, W) in [0, 1] is padded (edge replication) to a multiple of 16, encoded to an index map
(B, H/16, W/16) of a K-entry codebook, and the index map is coded losslessly (rANS under an empirical
model, or fixed length). ``cluster(K)`` derives a codec whose codebook is the K-means clustering of this
one. ``decompress(..., lost=mask)`` fills lost indices with the MaskGIT-style restorer before decoding.

``compress(x) -> {"strings": [[bytes per image] per chunk], "shape": (H, W)}``,
``decompress(strings, shape, lost=None) -> {"x_hat": (B, 3, H, W)}``: the compressai contract. ``shape``
is the image size, so a wrapper's latent stride is 1; one chunk (section) by default.

``compress(x, colour=True)`` appends a colour band (:mod:`.colour_band`, our extension) as one more string
and sets :data:`COLOUR_FLAG` in the first byte of every index band, so a decoder knows the last string is
the colour band even when that string is lost. effvision's image codec turns it on for the shipped and
user-trained weights; it is off for the official release and by default here, so that the compressai-level
codec is Mao et al.'s.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from compressai.models import CompressionModel
from torch import Tensor

from effvision.bounded_config import check_finite, meta_state_shapes, read_config_fields, shape_mismatches
from effvision.codecs.base import check_image_batch, evaluating, gradients_available
from effvision.codecs.rans import SYMBOL_SLACK_BITS, min_stream_bytes
from effvision.codecs.vqgan.colour_band import check_colour_band, decode_colour_band, encode_colour_band
from effvision.codecs.vqgan.config import CONFIG_LIMITS, VQGANConfig
from effvision.codecs.vqgan.index_coding import (
    FIXED_LENGTH,
    HEADER,
    RANS,
    CorruptStreamError,
    IndexEntropyModel,
    bits_per_index,
    decode_index_map,
    encode_index_map,
)
from effvision.codecs.vqgan.kmeans import kmeans
from effvision.codecs.vqgan.restoration import RESTORER_LIMITS, IndexRestorer
from effvision.codecs.vqgan.taming import VQModel, taming_state_dict
from effvision.errors import UserError
from effvision.io_utils import atomic_path, check_safetensors_file

CELL = 16
#: fit_index_model encodes training images in tiles of this many cells (1024 px) at most
FIT_TILE_CELLS = 64
CONTEXT_GROUPS = 8
CODERS = ("learned", "fixed")
#: a file may mark at most this share of a tile's indices lost: restoration costs no bytes, so this keeps
#: the decoder's work proportional to the bytes the file holds (Mao et al. restore up to ~20-40%).
MAX_LOST_FRACTION = 0.5
#: largest coding tile a weights file may ask for (the container refuses tiles over 2048 x 2048 pixels)
MAX_TILE_SIZE = 2048
#: peak decode memory: bytes per pixel and per full-resolution decoder channel (float32), plus the non-local
#: block's (cells x cells) attention matrix; the small config (32 channels at full resolution) decoding one
#: 1024 x 1024 tile on CPU peaked about 0.9 GB above the loaded model (estimate: 0.8 GB). Scaling by the
#: channels makes the estimate follow larger configs (the ImageNet model has 128).
DECODE_BYTES_PER_PIXEL_CHANNEL = 22
#: set in the first byte of every index band of a file that ends with a colour band
COLOUR_FLAG = 0x80


class VQGANInputError(UserError, ValueError):
    """A bad image, option or file given to the VQGAN codec (a UserError the CLI prints as one line)."""


def _user_error(message: str) -> VQGANInputError:
    return VQGANInputError(message)


class VQGANCodec(CompressionModel):
    """VQGAN codec with a clustered codebook, coded indices and lost-index restoration.

    Args:
        config: the VQGAN architecture (``n_embed`` = this codec's K).
        vqmodel: an existing :class:`VQModel` (default: freshly initialised from ``config``).
        restorer: optional :class:`IndexRestorer` for ``decompress(..., lost=...)``.
        reference_maps: (N, h, w) index maps of reference images, used to fit the index model (and remapped
            when the codebook is clustered).
        tile_size: side (pixels, a multiple of 16) of the square tiles this model codes images in, stored in
            its weights file; ``None`` (the shipped and official weights): whole images, up to the container's
            default tile. Coding in the crop size a model was trained at makes its GroupNorm and attention
            statistics cover the same area as in training, but every tile then gets its own colour cast: on
            the shipped small model 128 px tiles raise PSNR by 3 dB and give a patchwork picture
            (bench/results/codec-rd-vqgan-cpu.md), so it does not set one.
    """

    #: every image (or tile) is edge-padded to a multiple of this (one index cell) before coding
    pad_multiple = CELL

    def __init__(
        self,
        config: VQGANConfig,
        vqmodel: VQModel | None = None,
        restorer: IndexRestorer | None = None,
        reference_maps: Tensor | None = None,
        tile_size: int | None = None,
    ) -> None:
        super().__init__()
        if tile_size is not None and not (isinstance(tile_size, int) and CELL <= tile_size <= MAX_TILE_SIZE
                                          and tile_size % CELL == 0):
            raise _user_error(f"VQGAN tile size must be a multiple of {CELL} up to {MAX_TILE_SIZE}, got {tile_size!r}")
        self.tile_size = tile_size
        self.config = config
        self.vq = vqmodel if vqmodel is not None else VQModel(config)
        self.restorer = restorer
        if reference_maps is None:
            reference_maps = torch.zeros(0, 1, 1, dtype=torch.long)
        self.register_buffer("reference_maps", reference_maps.long())
        self.register_load_state_dict_post_hook(VQGANCodec._refit_after_load)
        self.index_model: IndexEntropyModel | None = None
        if self.reference_maps.numel():
            self._fit_index_model_to_references()

    @property
    def codebook_size(self) -> int:
        return self.vq.quantize.n_embed

    # ----------------------------------------------------------------------------------------------- models
    def _context_groups(self) -> Tensor:
        """Group of every codebook entry for the index model's context (K-means of the codebook)."""
        k = self.codebook_size
        if k <= CONTEXT_GROUPS:
            return torch.arange(k)
        return kmeans(self.vq.quantize.embedding.weight.detach(), CONTEXT_GROUPS, seed=0).assignment

    def _fit_index_model_to_references(self) -> None:
        self.index_model = IndexEntropyModel(self.codebook_size, self._context_groups()).fit(self.reference_maps)

    @torch.no_grad()
    def fit_index_model(self, images: list[Tensor], crop: int = 256, per_image: int = 0) -> None:
        """Fit the index model on images (each (3, H, W) in [0, 1]). Their index maps are kept (cropped to
        ``crop // 16`` cells from the top-left when larger) as ``reference_maps``."""
        cells = crop // CELL
        maps = []
        for image in images:
            indices = self._tiled_indices(image, max(cells, FIT_TILE_CELLS) * CELL)
            for top in range(0, indices.shape[0] - cells + 1, cells):
                for left in range(0, indices.shape[1] - cells + 1, cells):
                    maps.append(indices[top : top + cells, left : left + cells])
        if not maps:
            raise ValueError(f"no reference image is at least {crop}x{crop} pixels")
        self.reference_maps = torch.stack(maps)
        self._fit_index_model_to_references()

    def _tiled_indices(self, image: Tensor, tile: int) -> Tensor:
        """(3, H, W) -> its (h, w) index map, encoded in ``tile`` px tiles (whole when it fits in one): a whole
        2048 px image took 3.6 GB to encode, so a folder of large photos could not be fitted."""
        height, width = image.shape[-2:]
        if height <= tile and width <= tile:
            return self.encode_indices(image[None])[0]
        rows = [
            torch.cat([self.encode_indices(image[None, :, top:top + tile, left:left + tile])[0]
                       for left in range(0, width, tile)], dim=1)
            for top in range(0, height, tile)
        ]
        return torch.cat(rows, dim=0)

    def aux_loss(self) -> Tensor:
        """compressai's auxiliary loss: zero, as a tensor (the VQGAN has no entropy bottleneck whose quantiles
        train; compressai's examples/train.py therefore does not apply: train it with ``effvision train-vqgan``)."""
        return self.reference_maps.new_zeros((), dtype=torch.float32)

    def load_state_dict(self, state_dict, strict: bool = True):
        """torch's, with a clear error for a state that holds a lost-index restorer when this codec has none
        (torch's "Unexpected key(s) restorer.mask_token, ..." did not say its config is needed to build one)."""
        if strict and self.restorer is None and any(str(key).startswith("restorer.") for key in state_dict):
            raise RuntimeError(
                "the state holds a lost-index restorer (restorer.*) and this codec has none: build it with "
                "restorer=IndexRestorer(**source.restorer.config), or save the source with .save(path) and read it "
                "with VQGANCodec.load(path), which keeps the restorer's config"
            )
        return super().load_state_dict(state_dict, strict=strict)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # reference_maps has the shape of the maps it holds (compressai resizes its CDF buffers the same way):
        # another codec's state dict failed with "size mismatch for reference_maps: [1152, 8, 8] vs [0, 1, 1]"
        incoming = state_dict.get(prefix + "reference_maps")
        codebook = state_dict.get(prefix + "vq.quantize.embedding.weight")
        same_codebook = not isinstance(codebook, Tensor) or codebook.shape[0] == self.codebook_size
        if not same_codebook and isinstance(incoming, Tensor):
            # the maps index another codebook: they stay out (they were loaded, and the model was left holding
            # another codebook's indices), and the load fails as torch fails on any size mismatch
            state_dict = {key: value for key, value in state_dict.items() if key != prefix + "reference_maps"}
            error_msgs.append(f"size mismatch for {prefix}reference_maps: they index a codebook of {codebook.shape[0]} "
                              f"entries, this model's has {self.codebook_size}")
        elif isinstance(incoming, Tensor) and incoming.dim() == 3:
            self.reference_maps = self.reference_maps.new_zeros(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _refit_after_load(module: VQGANCodec, incompatible_keys) -> None:
        """After ``load_state_dict``: the index model is refitted to the loaded reference maps (it kept coding
        with the previous ones until ``update()``), which must hold indices of this codebook."""
        maps = module.reference_maps
        if maps.numel() and (int(maps.min()) < 0 or int(maps.max()) >= module.codebook_size):
            raise ValueError(f"reference_maps must hold codebook indices in [0, {module.codebook_size})")
        module.index_model = None
        if maps.numel():
            module._fit_index_model_to_references()

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """compressai's hook: (re)build the index model's CDFs from the reference maps."""
        if self.reference_maps.numel():
            self._fit_index_model_to_references()
            return True
        return False

    # ---------------------------------------------------------------------------------------- transforms
    def _check_image(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise _user_error(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] < 1 or x.shape[-1] < 1:
            raise _user_error(f"image is {x.shape[-1]}x{x.shape[-2]} pixels; it must have at least one pixel")

    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % CELL, -w % CELL
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    @torch.no_grad()
    def encode_indices(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, ceil(H/16), ceil(W/16)) indices."""
        self._check_image(x)
        return self.vq.encode_indices(self._pad(x) * 2 - 1)

    def refine_indices(self, x: Tensor, steps: int, colour: bool = False) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h, w) indices refined for the decoded image (see :mod:`.refine`)."""
        from effvision.codecs.vqgan.refine import refine_indices

        self._check_image(x)
        return refine_indices(self.vq, x, self._pad(x) * 2 - 1, steps, colour=colour)

    @torch.no_grad()
    def decode_indices(self, indices: Tensor, shape: tuple[int, int]) -> Tensor:
        """(B, h, w) indices -> (B, 3, H, W) in [0, 1], cropped to ``shape`` = (H, W)."""
        x_hat = (self.vq.decode_indices(indices) + 1) / 2
        return x_hat[..., : shape[0], : shape[1]].clamp(0, 1)

    def forward(self, x: Tensor) -> dict:
        """Training/eval pass: x (B, 3, H, W) in [0, 1] -> x_hat, likelihoods of the indices, codebook loss."""
        self._check_image(x)
        h, w = x.shape[-2:]
        x_hat, codebook_loss, indices = self.vq(self._pad(x) * 2 - 1)
        if self.index_model is not None:
            likelihoods = self.index_model.likelihoods(indices)
        else:
            likelihoods = torch.full(indices.shape, 1.0 / self.codebook_size, device=indices.device)
        return {
            "x_hat": ((x_hat + 1) / 2)[..., :h, :w],
            "likelihoods": {"indices": likelihoods},
            "codebook_loss": codebook_loss,
        }

    # ------------------------------------------------------------------------------------------- coding
    def _coder_model(self, coder: str) -> IndexEntropyModel | None:
        if coder not in CODERS:
            raise _user_error(f"unknown index coder {coder!r}; choose one of {', '.join(CODERS)}")
        if coder == "fixed":
            return None
        if self.index_model is None:
            raise _user_error("this VQGAN codec has no fitted index model; use coder='fixed' or fit_index_model()")
        return self.index_model

    @torch.no_grad()
    def compress(
        self, x: Tensor, coder: str = "learned", chunks: int = 1, colour: bool = False, effort: int = 0
    ) -> dict:
        """x (B, 3, H, W) in [0, 1] -> {"strings": [[bytes per image] per chunk], "shape": (H, W)}.

        ``chunks`` > 1 splits the index rows into that many independently decodable bands (see
        :func:`chunk_rows`), so a transport or container can lose one band and ``decompress(..., lost=...)``
        restores it; each band costs a 3-byte header. ``colour`` appends a colour band (the encoder then
        also decodes, to see the colour error it corrects). ``effort`` > 0 refines the indices for this image
        with that many gradient steps (:mod:`.refine`; same decoder, same format, slower encoding).
        """
        check_image_batch(x)
        model = self._coder_model(coder)
        if not isinstance(effort, int) or effort < 0:
            raise _user_error(f"effort must be a non-negative integer, got {effort!r}")
        if not isinstance(chunks, int) or chunks < 1:
            raise _user_error(f"chunks must be a positive integer, got {chunks!r}")
        if effort > 0 and torch.is_inference_mode_enabled():
            with gradients_available():
                return self.compress(x.clone(), coder, chunks, colour, effort)
        with evaluating(self):
            return self._compress(x, model, chunks, colour, effort)

    def _compress(self, x: Tensor, model: IndexEntropyModel | None, chunks: int, colour: bool, effort: int) -> dict:
        x = x.to(self.vq.quantize.embedding.weight.dtype)
        indices = self.encode_indices(x) if not effort else self.refine_indices(x, effort, colour)
        bands = chunk_rows(indices.shape[1], chunks)
        strings = [
            [encode_index_map(index_map[top:bottom], self.codebook_size, model) for index_map in indices]
            for top, bottom in bands
        ]
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        if colour:
            x_hat = self.decode_indices(indices, shape)
            strings = [[bytes([stream[0] | COLOUR_FLAG]) + stream[1:] for stream in chunk] for chunk in strings]
            strings.append([encode_colour_band(image, decoded) for image, decoded in zip(x, x_hat, strict=True)])
        return {"strings": strings, "shape": shape}

    def index_grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Image (H, W) -> index map (h, w)."""
        return (-(-int(shape[0]) // CELL), -(-int(shape[1]) // CELL))

    def _lost_mask(self, lost, bands: list[tuple[int, int]], batch: int, h: int, w: int) -> Tensor | None:
        """``lost`` as a (B, h, w) bool mask. Accepts a mask (h, w) / (B, h, w), or one bool per chunk
        (the container's "this section is missing" flags)."""
        if lost is None:
            return None
        if isinstance(lost, list | tuple) and len(lost) == len(bands) and all(isinstance(v, bool) for v in lost):
            mask = torch.zeros(batch, h, w, dtype=torch.bool)
            for (top, bottom), missing in zip(bands, lost, strict=True):
                mask[:, top:bottom] = missing
            return mask
        mask = torch.as_tensor(lost, dtype=torch.bool)
        if tuple(mask.shape) == (h, w):
            mask = mask.expand(batch, h, w)
        if tuple(mask.shape) != (batch, h, w):
            raise _user_error(
                f"lost mask must be ({h}, {w}), ({batch}, {h}, {w}) or {len(bands)} per-chunk flags, "
                f"got {tuple(mask.shape)}"
            )
        return mask

    def _min_bits_per_index(self) -> float:
        """Fewest bits one index can cost under the index model's quantised CDFs (0 without a model)."""
        if self.index_model is None:
            return 0.0
        largest = max(max(b - a for a, b in zip(cdf[:-1], cdf[1:], strict=True)) for cdf in self.index_model.cdfs)
        return max(0.0, -math.log2(largest / (1 << 16)) - SYMBOL_SLACK_BITS)

    def check_strings(self, strings: list[bytes | None], shape: tuple[int, int]) -> None:
        """Cheap checks before decoding one image's streams (one ``bytes`` or ``None`` = lost per row band):
        band count, stream lengths the index map implies (exact for the fixed-length code, a lower bound from
        the index model's CDFs for rANS), at most :data:`MAX_LOST_FRACTION` of the indices lost, and a valid
        colour-band header when the file has one."""
        strings, colour_band = split_colour_band(strings)
        if colour_band:
            check_colour_band(colour_band, int(shape[0]), int(shape[1]))
        h, w = self.index_grid(shape)
        if not strings or len(strings) > h:
            raise CorruptStreamError(f"{len(strings)} index bands for an index map of {h} rows")
        fixed_bits = bits_per_index(self.codebook_size)
        lost_cells = 0
        for band, ((top, bottom), stream) in enumerate(zip(chunk_rows(h, len(strings)), strings, strict=True)):
            cells = (bottom - top) * w
            if stream is None:
                lost_cells += cells
                continue
            if len(stream) < HEADER.size:
                raise CorruptStreamError(f"index band {band} is shorter than its {HEADER.size}-byte header")
            payload = len(stream) - HEADER.size
            if stream[0] == FIXED_LENGTH:
                needed = math.ceil(cells * fixed_bits / 8)
                if payload != needed:
                    raise CorruptStreamError(f"index band {band} has {payload} payload bytes, expected {needed}")
            elif stream[0] == RANS:
                needed = min_stream_bytes(cells * self._min_bits_per_index())
                if payload < needed or payload % 4:
                    raise CorruptStreamError(
                        f"index band {band} has {payload} payload bytes; {cells} indices need at least {needed}"
                    )
            else:
                raise CorruptStreamError(f"index band {band}: unknown index coder id {stream[0]}")
        if lost_cells > MAX_LOST_FRACTION * h * w:
            raise CorruptStreamError(
                f"{lost_cells} of {h * w} indices are lost; at most {MAX_LOST_FRACTION:.0%} can be restored"
            )

    def decode_memory_bytes(self, shape: tuple[int, int]) -> int:
        """Estimated peak memory of :meth:`decompress` for one (H, W) image (float32, batch 1)."""
        h, w = self.index_grid(shape)
        channels = self.config.ch * self.config.ch_mult[0]
        return h * w * CELL * CELL * DECODE_BYTES_PER_PIXEL_CHANNEL * channels + 2 * 4 * (h * w) ** 2 + 64 * 2**20

    def _split_strings(self, strings: list, lost) -> tuple[list, list, object]:
        """compressai strings -> (index strings with :data:`COLOUR_FLAG` cleared, each image's colour band or
        ``None``, ``lost`` for the index strings only)."""
        if not strings or not all(isinstance(chunk, list | tuple) for chunk in strings):
            raise _user_error("expected strings as [[bytes per image] per chunk] (compressai layout)")
        batch = len(strings[0])
        if any(len(chunk) != batch for chunk in strings):
            raise _user_error("every chunk must hold one stream per image")
        per_image = [split_colour_band(list(streams)) for streams in zip(*strings, strict=True)]
        colour_bands = [colour_band for _, colour_band in per_image]
        has_colour = {colour_band is not None for colour_band in colour_bands}
        if len(has_colour) > 1:
            raise CorruptStreamError("the images of a batch disagree on whether they have a colour band")
        if True in has_colour:
            if isinstance(lost, list | tuple) and len(lost) == len(strings):
                lost = lost[:-1]  # per-section flags: the last section was the colour band
            index_strings = [[bands[chunk] for bands, _ in per_image] for chunk in range(len(strings) - 1)]
        else:
            index_strings = strings
        return index_strings, colour_bands, lost

    @torch.no_grad()
    def decompress_indices(self, strings: list, shape: tuple[int, int], lost=None) -> Tensor:
        """Strings -> (B, h, w) indices; positions marked in ``lost`` are restored (see :meth:`decompress`).
        A colour band, when the file has one, is skipped."""
        index_strings, _, lost = self._split_strings(strings, lost)
        return self._decode_index_strings(index_strings, shape, lost)

    def _decode_index_strings(self, strings: list, shape: tuple[int, int], lost) -> Tensor:
        if len(shape) != 2 or min(shape) < 1:
            raise _user_error(f"invalid VQGAN image shape {tuple(shape)}; each side must be at least 1")
        batch = len(strings[0])
        h, w = self.index_grid(shape)
        if len(strings) > h:
            raise _user_error(f"{len(strings)} chunks for an index map of only {h} rows")
        bands = chunk_rows(h, len(strings))
        lost_mask = self._lost_mask(lost, bands, batch, h, w)
        indices = torch.zeros(batch, h, w, dtype=torch.long)
        for (top, bottom), chunk in zip(bands, strings, strict=True):
            for i, stream in enumerate(chunk):
                damaged = lost_mask is not None and bool(lost_mask[i, top:bottom].any())
                if damaged and not stream:
                    continue  # a lost section: nothing to decode, the restorer fills it
                indices[i, top:bottom] = decode_index_map(
                    stream, bottom - top, w, self.codebook_size, self.index_model, damaged
                )
        if lost_mask is not None and lost_mask.any():
            indices = self.restore_indices(indices, lost_mask)
        return indices

    @torch.no_grad()
    def restore_indices(self, indices: Tensor, lost: Tensor) -> Tensor:
        """Fill ``lost`` (B, h, w) positions of ``indices`` (B, h, w) with the restorer's predictions."""
        if self.restorer is None:
            raise _user_error("this VQGAN codec has no restoration model; lost indices cannot be restored")
        return self.restorer.restore(indices, lost, self.vq.quantize.embedding.weight)

    @torch.no_grad()
    def decompress(self, strings: list, shape: tuple[int, int], lost=None) -> dict:
        """Inverse of :meth:`compress`: {"x_hat": (B, 3, H, W) in [0, 1]}.

        ``lost``: indices to restore instead of trusting the stream, as a bool mask (h, w) or (B, h, w) of the
        index map, or one bool per chunk (a missing chunk's bytes may be ``b""``).
        """
        with evaluating(self):
            return self._decompress(strings, shape, lost)

    def _decompress(self, strings: list, shape: tuple[int, int], lost) -> dict:
        index_strings, colour_bands, lost = self._split_strings(strings, lost)
        indices = self._decode_index_strings(index_strings, shape, lost)
        # the colour bands are decoded (and a corrupt one refused) before the expensive VQGAN decoder runs;
        # b"" or None: the file has none, or it was lost (the picture then keeps its colour cast)
        corrections = [decode_colour_band(band, int(shape[0]), int(shape[1])) if band else None
                       for band in colour_bands]
        x_hat = self.decode_indices(indices, shape)
        for image, correction in enumerate(corrections):
            if correction is not None:
                x_hat[image] = (x_hat[image] + correction.to(x_hat.device)).clamp(0, 1)
        return {"x_hat": x_hat}

    # --------------------------------------------------------------------------------------- clustering
    @torch.no_grad()
    def cluster(self, k: int, seed: int = 0, weighted: bool = True, iterations: int = 50) -> VQGANCodec:
        """A codec whose codebook is the K-means clustering (exactly ``k`` centroids) of this codebook.

        Encoder, decoder and quant convs are shared with this codec; ``weighted`` weights codebook rows by
        their usage in the reference maps (unused rows still get a small weight). Reference maps are
        remapped through the cluster assignment, so the derived codec has a fitted index model at once.
        """
        n = self.codebook_size
        if not isinstance(k, int) or not 1 <= k <= n:
            raise _user_error(f"cannot cluster a codebook of {n} entries into K={k}; K must be between 1 and {n}")
        weights = None
        if weighted and self.reference_maps.numel():
            weights = torch.bincount(self.reference_maps.flatten(), minlength=n).double()
        result = kmeans(self.vq.quantize.embedding.weight.detach(), k, weights=weights, seed=seed,
                        iterations=iterations)
        config = replace(self.config, n_embed=k, name=f"{self.config.name}-k{k}")
        with torch.device("meta"):  # shells only: the transforms are shared, the codebook is new
            derived = VQModel(config)
        derived.encoder, derived.decoder = self.vq.encoder, self.vq.decoder
        derived.quant_conv, derived.post_quant_conv = self.vq.quant_conv, self.vq.post_quant_conv
        derived.quantize = type(self.vq.quantize)(k, config.embed_dim, beta=self.vq.quantize.beta)
        derived.quantize.embedding.weight.copy_(result.centroids)
        references = result.assignment[self.reference_maps] if self.reference_maps.numel() else None
        codec = VQGANCodec(config, vqmodel=derived, restorer=self.restorer, reference_maps=references,
                           tile_size=self.tile_size)
        codec.cluster_assignment = result.assignment
        return codec.eval()

    # -------------------------------------------------------------------------------------- persistence
    def load_taming_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a taming-transformers VQModel ``.ckpt`` (loss/discriminator keys are ignored)."""
        from effvision.torch_checkpoint import load_torch_checkpoint, tensor_state_dict

        checkpoint = load_torch_checkpoint(path)  # Lightning .ckpt: allow-listed stand-ins, never plain pickle
        state = taming_state_dict(tensor_state_dict(checkpoint, str(path)))
        expected = {k: tuple(v.shape) for k, v in self.vq.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        problem = shape_mismatches(expected, found)
        if problem:
            raise _user_error(f"{path} does not match VQGAN config {self.config.name}: {problem}")
        check_finite(state, str(path))
        self.vq.load_state_dict(state)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16, force: bool = True) -> None:
        """Write weights (``dtype``), reference maps and configs to a safetensors file, atomically (an existing
        ``path`` is replaced only with ``force``)."""
        from safetensors.torch import save_file

        tensors = {f"vq.{k}": v.detach().to(dtype).contiguous() for k, v in self.vq.state_dict().items()}
        tensors["reference_maps"] = self.reference_maps.to(torch.int16 if self.codebook_size < 2**15 else torch.int32)
        metadata = {"vqgan_config": json.dumps(self.config.to_dict())}
        if self.tile_size is not None:
            metadata["tile_size"] = str(self.tile_size)
        if self.restorer is not None:
            restorer_state = self.restorer.state_dict().items()
            tensors.update({f"restorer.{k}": v.detach().to(dtype).contiguous() for k, v in restorer_state})
            metadata["restorer_config"] = json.dumps(self.restorer.config)
        with atomic_path(path, force=force) as temp:
            save_file(tensors, temp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VQGANCodec:
        """Inverse of :meth:`save` (weights come back as float32). The file may be crafted: its configs are read
        within bounds and checked against its tensors' shapes before any model is built
        (:mod:`effvision.bounded_config`), and its reference maps must hold codebook indices."""
        from safetensors import safe_open

        source = str(path)
        if not Path(source).is_file():  # safe_open blocks on a FIFO
            raise _user_error(f"VQGAN weights {path} do not exist or are not a regular file")
        try:  # a huge header costs gigabytes in safe_open
            check_safetensors_file(source, "VQGAN weights")
        except UserError as error:
            raise _user_error(str(error)) from None
        try:
            with safe_open(source, framework="pt") as handle:
                metadata = handle.metadata() or {}
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as error:  # noqa: BLE001
            raise _user_error(f"cannot read VQGAN weights {path}: {error}") from error
        if "vqgan_config" not in metadata:
            raise _user_error(f"{path} is not a VQGAN codec file (no vqgan_config metadata)")
        config = VQGANConfig.from_dict(read_config_fields(metadata["vqgan_config"], CONFIG_LIMITS, source,
                                                          "VQGAN config"))
        tile_size = metadata.get("tile_size")
        if tile_size is not None:
            if not (tile_size.isascii() and tile_size.isdigit() and len(tile_size) <= 5):
                raise _user_error(f"{path}: tile_size metadata must be an integer, got {tile_size!r}")
            tile_size = int(tile_size)
        expected = {f"vq.{k}": v for k, v in meta_state_shapes(lambda: VQModel(config), source, "VQGAN config").items()}
        restorer_config = None
        if "restorer_config" in metadata:
            restorer_config = read_config_fields(metadata["restorer_config"], RESTORER_LIMITS, source,
                                                 "restorer config")
            restorer_shapes = meta_state_shapes(lambda: IndexRestorer(**restorer_config), source, "restorer config")
            expected.update({f"restorer.{k}": v for k, v in restorer_shapes.items()})
        if "reference_maps" in shapes:
            if len(shapes["reference_maps"]) != 3:
                raise _user_error(f"{path}: reference_maps must be (N, h, w), got shape {shapes['reference_maps']}")
            expected["reference_maps"] = shapes["reference_maps"]
        problem = shape_mismatches(expected, shapes)
        if problem:  # before any model is built: its size is then that of the file's tensors
            raise _user_error(f"{path} does not match its VQGAN config: {problem}")
        with safe_open(source, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        reference_maps = tensors.get("reference_maps")
        if reference_maps is not None and reference_maps.numel() and (
            reference_maps.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
            or int(reference_maps.min()) < 0 or int(reference_maps.max()) >= config.n_embed
        ):
            raise _user_error(f"{path}: reference_maps must hold codebook indices in [0, {config.n_embed})")
        check_finite(tensors, source)
        vqmodel = VQModel(config)
        vqmodel.load_state_dict({k[3:]: v.float() for k, v in tensors.items() if k.startswith("vq.")})
        restorer = None
        if restorer_config is not None:
            restorer = IndexRestorer(**restorer_config)
            restorer.load_state_dict({k[9:]: v.float() for k, v in tensors.items() if k.startswith("restorer.")})
        return cls(config, vqmodel.eval(), restorer.eval() if restorer else None, reference_maps,
                   tile_size=tile_size).eval()


def split_colour_band(streams: list) -> tuple[list, bytes | None]:
    """One image's streams (index bands, then maybe a colour band; ``None``/``b""`` = lost) -> (index bands
    with :data:`COLOUR_FLAG` cleared, the colour band or ``None``). The first present stream says whether the
    file has a colour band; every other present index band must agree."""
    first = next((stream for stream in streams if stream), None)
    if first is None or not first[0] & COLOUR_FLAG:
        return streams, None
    if len(streams) < 2:
        raise CorruptStreamError("index band announces a colour band, but the file has no other section")
    index_bands = []
    for stream in streams[:-1]:
        if stream and not stream[0] & COLOUR_FLAG:
            raise CorruptStreamError("index bands disagree on whether the file has a colour band")
        index_bands.append(bytes([stream[0] & ~COLOUR_FLAG]) + bytes(stream[1:]) if stream else stream)
    return index_bands, (bytes(streams[-1]) if streams[-1] else b"")


def chunk_rows(rows: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``rows`` index rows into ``min(chunks, rows)`` balanced bands [(top, bottom), ...]."""
    chunks = max(1, min(chunks, rows))
    return [(i * rows // chunks, (i + 1) * rows // chunks) for i in range(chunks)]


def demo_weights_path() -> Path:
    """The small demo codec shipped with effvision (see scripts/train_demo_vqgan.py)."""
    return Path(__file__).resolve().parents[2] / "assets" / "vqgan-small-f16-1024.safetensors"


# quality level -> codebook size K of the demo codec (1 = smallest files)
QUALITY_TO_K = {1: 16, 2: 64, 3: 256, 4: 1024}


def load_demo_codec(k: int | None = None) -> VQGANCodec:
    """The shipped demo codec, K-means-clustered (seed 0, deterministic) to ``k`` entries when given."""
    path = demo_weights_path()
    if not path.exists():
        raise _user_error(f"the VQGAN demo weights are missing ({path}); run scripts/train_demo_vqgan.py")
    codec = VQGANCodec.load(path)
    return codec if k is None or k == codec.codebook_size else codec.cluster(k, seed=0)
