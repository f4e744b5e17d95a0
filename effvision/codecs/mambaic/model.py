"""MambaIC (Zeng et al., CVPR 2025, arXiv 2503.12461) as a compressai ``CompressionModel``.

Transforms (``T`` = transform width = 2N in the paper's notation)::

    g_a: conv5x5/2 (3->T), VSS x d0, conv3x3/2, VSS x d1, conv3x3/2, VSS x d2, conv3x3/2 (->M)   y: H/16
    h_a: conv3x3/2 (M->T), VSS x d3, conv3x3/2 (->Z)                                          z: H/64
    h_mean_s, h_scale_s: deconv3x3/2 (Z->T), VSS x d3, deconv3x3/2 (->M)
    g_s: deconv3x3/2 (M->T), VSS x d2, deconv/2, VSS x d1, deconv/2, VSS x d0, deconv5x5/2 (->3)

``z`` is coded with a factorised ``EntropyBottleneck``; ``y`` slice by slice (5 slices) with a
``GaussianConditional`` whose means/scales come from :mod:`effvision.codecs.mambaic.context`.

Bitstream layout of :meth:`MambaIC.compress`: ``strings`` = for each slice its anchor strings then its
non-anchor strings (``2 * num_slices`` lists), then the ``z`` strings; every list holds one ``bytes``
per batch image. ``shape`` is the image (height, width): inputs of any size are edge-padded to a
multiple of 64 and the reconstruction is cropped back. Real bpp counts every string
(:func:`bits_per_pixel`), unlike the official evaluation which counted only the first per slice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from torch import Tensor, nn

from effvision.bounded_config import Limit
from effvision.codecs.base import check_image_batch, evaluating, gradients_available
from effvision.codecs.mambaic.context import SliceContext, anchor_mask
from effvision.codecs.mambaic.vss import VSSBlock
from effvision.codecs.progress import refinement_steps
from effvision.codecs.rans import (
    MIN_STREAM_BYTES,
    SYMBOL_SLACK_BITS,
    CorruptStreamError,
    min_stream_bytes,
    use_checked_decoder,
)
from effvision.errors import UserError

#: inputs are padded to a multiple of this (4 stride-2 layers in g_a, 2 more in h_a).
ALIGNMENT = 64
SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
#: peak decode memory per padded pixel and per transform channel (float32), an upper estimate: the lite
#: config decoding one 1024 x 1024 tile on CPU peaked 517 MB above the loaded model (estimate: 640 MB).
#: Used to refuse up front what cannot fit.
DECODE_BYTES_PER_PIXEL_CHANNEL = 12
#: peak training memory per crop pixel and per transform channel (float32, forward and backward): the lite
#: config (48 channels) took about 7 kB a pixel at 256 and 512 px crops on CPU. Used to refuse up front a
#: --crop x --batch-size that cannot fit (the check on the input batch alone let --crop 8192 through).
TRAIN_BYTES_PER_PIXEL_CHANNEL = 160
#: Adam step size of encoder-side latent refinement (latents are in quantisation-bin units).
REFINE_LR = 0.05


@dataclass(frozen=True)
class MambaICConfig:
    """Hyper-parameters of a MambaIC model. ``paper`` reproduces the released model."""

    transform_channels: int = 256
    latent_channels: int = 320
    hyper_channels: int = 192
    depths: tuple[int, int, int, int] = (2, 2, 9, 2)
    num_slices: int = 5
    max_support_slices: int = 5
    window: int = 8
    attention_dim: int = 128
    head_dim: int = 16
    context_hidden: tuple[int, int] = (224, 128)
    context_depth: int = 2
    d_state: int = 16
    ssm_ratio: float = 2.0
    drop_path_rate: float = 0.1
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.latent_channels % self.num_slices:
            raise ValueError(f"latent_channels {self.latent_channels} not divisible by {self.num_slices} slices")
        if len(self.depths) != 4:
            raise ValueError(f"depths must have 4 entries, got {self.depths}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["depths"] = list(self.depths)
        data["context_hidden"] = list(self.context_hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MambaICConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("depths", "context_hidden"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


# Small enough to train on a CPU, ship in a few MB and encode 768x512 in seconds on 2 cores: narrow channels,
# no VSS stage at H/2 (a sequential CPU scan over H/2 x W/2 positions would dominate), one VSS block per other
# stage and per context stage; same 5-slice two-pass context structure.
_LITE = MambaICConfig(
    transform_channels=48,
    latent_channels=50,
    hyper_channels=32,
    depths=(0, 1, 1, 1),
    attention_dim=16,
    head_dim=8,
    context_hidden=(32, 32),
    context_depth=1,
    d_state=8,
    ssm_ratio=1.0,
    drop_path_rate=0.0,
    name="lite",
)

CONFIGS: dict[str, MambaICConfig] = {
    "paper": MambaICConfig(name="paper"),
    "lite": _LITE,
    # ``lite`` with 100 latent channels instead of 50 (20 per slice), for the upper rungs of the ladder: 50
    # latent channels cap a transform at about 33 dB on photos even at infinite rate, 100 at about 35.6
    # (bench/mambaic_ceiling.py). Same transform bodies, so it can be widened from a trained ``lite``
    # (scripts/train_mambaic_ladder.py --config wide). A training step costs about 1.2x lite's on a CPU.
    "wide": replace(_LITE, latent_channels=100, name="wide"),
    # ``lite`` with 160 latent channels (32 per slice; linear bound 38.2 dB on the test photos), for the
    # rungs near 1 bpp. Started from a two-stage KLT (scripts/init_mambaic_klt.py), not from a trained ``lite``.
    "wide160": replace(_LITE, latent_channels=160, name="wide160"),
}


#: what a checkpoint's config may ask for (read_config_fields); the ``paper`` config is well inside
CONFIG_LIMITS: dict[str, Limit] = {
    "transform_channels": Limit(1, 1024),
    "latent_channels": Limit(1, 1024),
    "hyper_channels": Limit(1, 1024),
    "depths": Limit(0, 32, "ints", 4, 4),
    "num_slices": Limit(1, 64),
    "max_support_slices": Limit(0, 64),
    "window": Limit(1, 64),
    "attention_dim": Limit(1, 1024),
    "head_dim": Limit(1, 1024),
    "context_hidden": Limit(1, 2048, "ints", 2, 2),
    "context_depth": Limit(0, 32),
    "d_state": Limit(1, 256),
    "ssm_ratio": Limit(0.0625, 16, "float"),
    "drop_path_rate": Limit(0, 1, "float"),
    "name": Limit(0, 64, "str"),
}

#: the largest latent magnitude (after subtracting its mean) the entropy coder is given. Trained weights stay
#: within a few hundred; only corrupt or crafted weights go beyond, and compressai's rANS encoder never returns
#: on symbols near 2^31 (its escape code shifts a negative number until it reaches zero).
MAX_CODED_MAGNITUDE = 1 << 16


def _check_codable(residual: Tensor, what: str) -> None:
    if residual.numel() and not (torch.isfinite(residual).all() and residual.abs().max() <= MAX_CODED_MAGNITUDE):
        raise UserError(
            f"these MambaIC weights give {what} values that cannot be coded (not finite, or beyond "
            f"+-{MAX_CODED_MAGNITUDE}): the weights are corrupt or not a trained codec"
        )

def get_config(name: str) -> MambaICConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown MambaIC config {name!r}; available: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def get_scale_table() -> Tensor:
    return torch.exp(torch.linspace(math.log(SCALES_MIN), math.log(SCALES_MAX), SCALES_LEVELS))


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, output_padding=stride - 1
    )


def _linspace(stop: float, count: int) -> list[float]:
    """``count`` evenly spaced drop-path rates from 0 to ``stop`` (plain floats: works on the meta device)."""
    if count <= 1:
        return [0.0] * count
    return [stop * i / (count - 1) for i in range(count)]


#: seed of the noise encoder-side refinement draws (a fixed one: refined files are reproducible)
REFINE_SEED = 0


def ste_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient."""
    return torch.round(x) - x.detach() + x


def bits_per_pixel(strings: list[list[bytes]], height: int, width: int) -> float:
    """Real rate of :meth:`MambaIC.compress`'s ``strings`` (one list per stream, one ``bytes`` per image):
    8 x the bytes of every string, per pixel, the mean over the batch's images (as compressai's evaluation
    counts per image; it summed the batch, so two copies of an image read twice its rate)."""
    images = max((len(part) for part in strings), default=1) or 1
    return 8.0 * sum(len(s) for part in strings for s in part) / (images * height * width)


class MambaIC(CompressionModel):
    """MambaIC learned image codec. ``forward`` for training, ``compress``/``decompress`` for bitstreams.

    Args:
        config: a :class:`MambaICConfig` or the name of one in :data:`CONFIGS` ("paper", "lite").
    """

    #: every image (or tile) is edge-padded to a multiple of this before coding (:meth:`pad`)
    pad_multiple = ALIGNMENT

    def __init__(self, config: MambaICConfig | str = "paper") -> None:
        super().__init__()
        cfg = get_config(config) if isinstance(config, str) else config
        self.config = cfg
        width, latent, hyper = cfg.transform_channels, cfg.latent_channels, cfg.hyper_channels
        d0, d1, d2, d3 = cfg.depths
        rates = _linspace(cfg.drop_path_rate, sum(cfg.depths))

        def stage(depth: int, first: int) -> list[nn.Module]:
            return [VSSBlock(width, rates[first + i], cfg.d_state, cfg.ssm_ratio) for i in range(depth)]

        self.g_a = nn.Sequential(
            conv(3, width, 5),
            *stage(d0, 0),
            conv(width, width),
            *stage(d1, d0),
            conv(width, width),
            *stage(d2, d0 + d1),
            conv(width, latent),
        )
        self.h_a = nn.Sequential(conv(latent, width), *stage(d3, d0 + d1 + d2), conv(width, hyper))
        # Decoder-side drop-path rates follow the official code (it reuses the encoder schedule reversed).
        self.h_mean_s = nn.Sequential(deconv(hyper, width), *stage(d3, 0), deconv(width, latent))
        self.h_scale_s = nn.Sequential(deconv(hyper, width), *stage(d3, 0), deconv(width, latent))
        self.g_s = nn.Sequential(
            deconv(latent, width),
            *stage(d2, d3),
            deconv(width, width),
            *stage(d1, d3 + d2),
            deconv(width, width),
            *stage(d0, d3 + d2 + d1),
            deconv(width, 3, 5),
        )
        slice_channels = latent // cfg.num_slices
        context_rates = _linspace(cfg.drop_path_rate, cfg.num_slices * cfg.context_depth)
        self.slices = nn.ModuleList(
            SliceContext(
                index=i,
                latent_channels=latent,
                slice_channels=slice_channels,
                max_support=cfg.max_support_slices,
                attention_dim=cfg.attention_dim,
                head_dim=cfg.head_dim,
                window=cfg.window,
                hidden=cfg.context_hidden,
                context_depth=cfg.context_depth,
                drop_path=context_rates[i * cfg.context_depth : (i + 1) * cfg.context_depth],
                d_state=cfg.d_state,
                ssm_ratio=cfg.ssm_ratio,
            )
            for i in range(cfg.num_slices)
        )
        self.entropy_bottleneck = EntropyBottleneck(hyper)
        self.gaussian_conditional = GaussianConditional(None)

    def update(self, scale_table: Tensor | None = None, force: bool = False, update_quantiles: bool = False) -> bool:
        """Build the CDF tables for the rANS coder (64 scales, 0.11..256, as the paper)."""
        return super().update(
            scale_table=get_scale_table() if scale_table is None else scale_table,
            force=force,
            update_quantiles=update_quantiles,
        )

    # ---- padding -------------------------------------------------------------------------------
    @staticmethod
    def pad(x: Tensor) -> Tensor:
        """Edge-pad (B, 3, H, W) on the bottom/right to multiples of :data:`ALIGNMENT`."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % ALIGNMENT, -width % ALIGNMENT
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

    # ---- training / estimation -------------------------------------------------------------------
    def forward(self, x: Tensor) -> dict:
        """x: (B, 3, H, W) in [0, 1]. Returns x_hat (cropped to H, W), likelihoods {y, z} and y_hat.

        Training: additive noise for the likelihoods, straight-through rounding around the predicted
        means for the decoder input (as the paper). Eval: hard rounding, exactly what the coder does.
        """
        y = self.g_a(self.pad(x))
        return self._forward_from_latents(y, self.h_a(y), x.shape[-2:], relaxed=self.training)

    def _forward_from_latents(self, y: Tensor, z: Tensor, size, relaxed: bool) -> dict:
        """The rest of :meth:`forward` from the latents ``y`` (B, M, H/16, W/16) and ``z`` (B, Z, H/64, W/64);
        ``relaxed``: noise for the likelihoods and straight-through rounding (differentiable in y and z)."""
        height, width = size
        _, z_likelihoods = self.entropy_bottleneck(z, training=relaxed)
        z_offset = self.entropy_bottleneck._get_medians()
        if relaxed:
            z_hat = ste_round(z - z_offset) + z_offset
        else:
            z_hat = self.entropy_bottleneck.quantize(z, "dequantize", z_offset)
        latent_means, latent_scales = self.h_mean_s(z_hat), self.h_scale_s(z_hat)
        anchors = anchor_mask(*y.shape[-2:], device=y.device)
        y_hat_slices: list[Tensor] = []
        likelihoods: list[Tensor] = []
        for context, y_slice in zip(self.slices, y.chunk(len(self.slices), dim=1), strict=True):
            previous = y_hat_slices[: self.config.max_support_slices]
            mean_support, support = context.channel_context(latent_means, latent_scales, previous)
            means_anchor, scales_anchor = context.anchor_params(support)
            anchors_hat = torch.where(anchors, self._round(y_slice, means_anchor, relaxed), 0.0)
            means_other, scales_other = context.non_anchor_params(anchors_hat, support)
            means = torch.where(anchors, means_anchor, means_other)
            scales = torch.where(anchors, scales_anchor, scales_other)
            _, slice_likelihoods = self.gaussian_conditional(y_slice, scales, means=means, training=relaxed)
            y_hat_slice = self._round(y_slice, means, relaxed)
            y_hat_slices.append(y_hat_slice + context.residual(mean_support, y_hat_slice))
            likelihoods.append(slice_likelihoods)
        y_hat = torch.cat(y_hat_slices, dim=1)
        x_hat = self.g_s(y_hat)[..., :height, :width]
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "y_hat": y_hat,
        }

    def refine_latents(self, x: Tensor, y: Tensor, z: Tensor, lmbda: float, steps: int) -> tuple[Tensor, Tensor]:
        """Encoder-side refinement: ``steps`` Adam steps on ``y`` and ``z`` for this image's rate-distortion
        loss ``lmbda * 255^2 * MSE + bpp`` (the training loss), every weight fixed, so the decoder and the
        bitstream format are unchanged (only which latents are coded). Rates use the training relaxation
        (noise for the likelihoods, straight-through rounding for the decoder input)."""
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        y, z = y.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([y, z], lr=REFINE_LR)
        best = (float("inf"), y.detach().clone(), z.detach().clone())

        def scored() -> Tensor:
            nonlocal best
            out = self._forward_from_latents(y, z, x.shape[-2:], relaxed=True)
            bits = sum(-torch.log2(p.clamp_min(1e-9)).sum() for p in out["likelihoods"].values())
            loss = lmbda * 255**2 * F.mse_loss(out["x_hat"], x) + bits / pixels
            if loss.item() < best[0]:
                best = (loss.item(), y.detach().clone(), z.detach().clone())
            return loss

        # the relaxed rate draws uniform noise: from a fixed seed, in a forked generator, so the same image and
        # effort give the same file every time (it drew from the global generator) and the caller's is untouched
        devices = [y.device] if y.device.type == "cuda" else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(REFINE_SEED)
            for _ in refinement_steps(steps, "refine latents"):
                loss = scored()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scored()  # the last step's latents are candidates too (effort 1 coded exactly what effort 0 did)
        return best[1], best[2]

    def _round(self, y: Tensor, means: Tensor, relaxed: bool) -> Tensor:
        if relaxed:
            return ste_round(y - means) + means
        return self.gaussian_conditional.quantize(y, "dequantize", means)

    # ---- bitstreams -------------------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, x: Tensor, effort: int = 0, lmbda: float | None = None) -> dict:
        """x: (B, 3, H, W) in [0, 1] -> {"strings": [[bytes] * B] * (2 * slices + 1), "shape": (H, W)}.

        ``effort`` > 0 refines the latents for this image first (:meth:`refine_latents`, that many steps) under
        ``lmbda`` (default: the λ the weights were trained for, ``self.rd_lambda``); decoding is unchanged. Each
        image of a batch is refined on its own, so its streams do not depend on the other images. An empty
        batch gives empty string lists, as compressai's models do.
        """
        check_image_batch(x)
        streams = 2 * len(self.slices) + 1
        if x.shape[0] == 0:
            return {"strings": [[] for _ in range(streams)], "shape": tuple(x.shape[-2:])}
        if effort > 0 and x.shape[0] > 1:  # one loss over the batch kept the batch's best step for every image
            parts = [self.compress(x[index:index + 1], effort, lmbda)["strings"] for index in range(x.shape[0])]
            return {"strings": [[s for part in parts for s in part[k]] for k in range(streams)],
                    "shape": tuple(x.shape[-2:])}
        if effort > 0 and torch.is_inference_mode_enabled():
            with gradients_available():
                return self.compress(x.clone(), effort, lmbda)
        with evaluating(self):
            return self._compress(x, effort, lmbda)

    def _compress(self, x: Tensor, effort: int, lmbda: float | None) -> dict:
        x = x.to(self.entropy_bottleneck.quantiles.dtype)
        height, width = x.shape[-2:]
        y = self.g_a(self.pad(x))
        z = self.h_a(y)
        if effort > 0:
            lmbda = lmbda if lmbda is not None else getattr(self, "rd_lambda", None)
            if lmbda is None:
                raise ValueError("encoder-side refinement needs the lambda the weights were trained for (lmbda=)")
            y, z = self.refine_latents(x, y, z, lmbda, effort)
        _check_codable(z - self.entropy_bottleneck._get_medians(), "hyper-latent")
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        strings: list[list[bytes]] = []

        def code(y_slice: Tensor, means: Tensor, scales: Tensor, where: Tensor) -> Tensor:
            values, means_at, indexes = self._select(y_slice, means, scales, where)
            _check_codable(values - means_at, "latent")
            strings.append(self.gaussian_conditional.compress(values, indexes, means=means_at))
            # Exactly the decoder's dequantisation: integer symbols cast to float, plus the means.
            symbols = self.gaussian_conditional.quantize(values, "symbols", means_at)
            return self._scatter(self.gaussian_conditional.dequantize(symbols, means_at), where, y_slice)

        self._code_slices(z_hat, y.chunk(len(self.slices), dim=1), code)
        strings.append(z_strings)
        return {"strings": strings, "shape": (height, width)}

    @staticmethod
    def latent_grids(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Image (H, W) -> the grids of ``y`` (H/16 x W/16 after padding to 64) and ``z`` (H/64 x W/64)."""
        height, width = int(shape[0]), int(shape[1])
        z_grid = (-(-height // ALIGNMENT), -(-width // ALIGNMENT))
        return (z_grid[0] * 4, z_grid[1] * 4), z_grid

    def _min_z_bits_per_position(self) -> float:
        """Fewest bits one z position (all channels) can cost under the factorised prior's CDF tables."""
        cdfs, lengths = self.entropy_bottleneck._quantized_cdf, self.entropy_bottleneck._cdf_length
        if cdfs.numel() == 0:
            return 0.0
        bits = 0.0
        for row, length in zip(cdfs.tolist(), lengths.tolist(), strict=True):
            largest = max(b - a for a, b in zip(row[: length - 1], row[1:length], strict=True))
            bits += max(0.0, -math.log2(largest / (1 << 16)) - SYMBOL_SLACK_BITS)
        return bits

    def check_strings(self, strings: list[bytes | None], shape: tuple[int, int]) -> None:
        """Cheap checks before decoding (``strings``: one ``bytes`` per stream, as in a file): the stream
        count, no lost stream, whole rANS words, and a z stream long enough for the z grid the image size
        implies (the factorised prior's most likely symbols still cost bits). Raises CorruptStreamError."""
        expected = 2 * len(self.slices) + 1
        if len(strings) != expected:
            raise CorruptStreamError(f"MambaIC tile has {len(strings)} streams, expected {expected}")
        for index, stream in enumerate(strings):
            if stream is None:
                raise CorruptStreamError("MambaIC cannot restore a lost stream")
            if len(stream) < MIN_STREAM_BYTES or len(stream) % 4:
                raise CorruptStreamError(f"stream {index} has {len(stream)} bytes, not a whole rANS stream")
        _, (z_h, z_w) = self.latent_grids(shape)
        needed = min_stream_bytes(self._min_z_bits_per_position() * z_h * z_w)
        if len(strings[-1]) < needed:
            raise CorruptStreamError(
                f"hyperprior stream of {len(strings[-1])} bytes cannot hold a {z_w}x{z_h} grid (at least {needed})"
            )

    def decode_memory_bytes(self, shape: tuple[int, int]) -> int:
        """Estimated peak memory of :meth:`decompress` for one (H, W) image (float32, batch 1)."""
        (y_h, y_w), _ = self.latent_grids(shape)
        pixels = y_h * y_w * 256
        return pixels * DECODE_BYTES_PER_PIXEL_CHANNEL * self.config.transform_channels + 64 * 2**20

    def training_memory_bytes(self, batch_size: int, crop: int) -> int:
        """Estimated peak memory of one training step on ``batch_size`` crops of ``crop`` px (float32)."""
        return batch_size * crop * crop * TRAIN_BYTES_PER_PIXEL_CHANNEL * self.config.transform_channels

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int]) -> dict:
        """Inverse of :meth:`compress`: returns {"x_hat": (B, 3, H, W) clamped to [0, 1], "y_hat"}.

        Streams are decoded with :mod:`effvision.codecs.rans`'s bounds-checked decoder: a truncated,
        padded or corrupt stream raises :class:`CorruptStreamError` instead of reading past its end.
        """
        if len(strings) != 2 * len(self.slices) + 1:
            raise ValueError(f"expected {2 * len(self.slices) + 1} string lists, got {len(strings)}")
        if len(shape) != 2:
            raise ValueError(f"shape must be the image (height, width), got {tuple(shape)}")
        height, width = int(shape[0]), int(shape[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"invalid image shape {tuple(shape)}")
        use_checked_decoder(self)
        with evaluating(self):
            return self._decompress(strings, height, width)

    def _decompress(self, strings: list[list[bytes]], height: int, width: int) -> dict:
        padded_h, padded_w = height + (-height % ALIGNMENT), width + (-width % ALIGNMENT)
        z_hat = self.entropy_bottleneck.decompress(strings[-1], (padded_h // ALIGNMENT, padded_w // ALIGNMENT))
        parts = iter(strings[:-1])

        def decode(template: Tensor, means: Tensor, scales: Tensor, where: Tensor) -> Tensor:
            _, means_at, indexes = self._select(template, means, scales, where)
            values = self.gaussian_conditional.decompress(next(parts), indexes, means=means_at)
            return self._scatter(values, where, template)

        batch = z_hat.shape[0]
        slice_channels = self.config.latent_channels // len(self.slices)
        template = z_hat.new_zeros(batch, slice_channels, padded_h // 16, padded_w // 16)
        y_hat = self._code_slices(z_hat, [template] * len(self.slices), decode)
        x_hat = self.g_s(y_hat)[..., :height, :width].clamp_(0, 1)
        return {"x_hat": x_hat, "y_hat": y_hat}

    def _code_slices(self, z_hat: Tensor, y_slices, code) -> Tensor:
        """The slice loop shared by encoder and decoder (identical op order on both sides).

        ``code(y_slice, means, scales, where)`` entropy-codes (or decodes) the positions ``where`` and
        returns the dequantised values there, zeros elsewhere.
        """
        latent_means, latent_scales = self.h_mean_s(z_hat), self.h_scale_s(z_hat)
        anchors = anchor_mask(*latent_means.shape[-2:], device=z_hat.device)
        y_hat_slices: list[Tensor] = []
        for context, y_slice in zip(self.slices, y_slices, strict=True):
            previous = y_hat_slices[: self.config.max_support_slices]
            mean_support, support = context.channel_context(latent_means, latent_scales, previous)
            means_anchor, scales_anchor = context.anchor_params(support)
            anchors_hat = code(y_slice, means_anchor, scales_anchor, anchors)
            means_other, scales_other = context.non_anchor_params(anchors_hat, support)
            y_hat_slice = anchors_hat + code(y_slice, means_other, scales_other, ~anchors)
            y_hat_slices.append(y_hat_slice + context.residual(mean_support, y_hat_slice))
        return torch.cat(y_hat_slices, dim=1)

    def _select(self, y: Tensor, means: Tensor, scales: Tensor, where: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Values, means and CDF indexes at the positions ``where``: each (B, C, K), raster order."""
        scales_at = scales[:, :, where]
        return y[:, :, where], means[:, :, where], self.gaussian_conditional.build_indexes(scales_at)

    @staticmethod
    def _scatter(values: Tensor, where: Tensor, like: Tensor) -> Tensor:
        out = torch.zeros_like(like)
        out[:, :, where] = values.to(like.dtype)
        return out
