"""VQGAN encoder, decoder and vector quantiser with the taming-transformers state-dict layout.

Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021). The module
tree reproduces taming's ``VQModel`` names (``encoder.down.{i}.block.{j}.norm1``, ``quant_conv``,
``quantize.embedding.weight``, ``decoder.up.{i}.upsample.conv`` ...) so an official ``.ckpt`` state dict
loads with ``load_state_dict``. Images are in [-1, 1], shape (B, 3, H, W) with H, W multiples of 16 (f=16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effvision.codecs.vqgan.config import VQGANConfig


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's normalisation: 32 groups, eps 1e-6, affine (``groups`` is configurable for narrow models)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a 1x1 ``nin_shortcut`` when the
    channel count changes. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj_out convs and a residual. (B, C, H, W)."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, 1 head, HW, C) so scaled_dot_product_attention applies the same 1/sqrt(C) softmax as taming.
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one pixel on the right and bottom (taming's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, maybe empty) and a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: Tensor) -> Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[index](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution = config.resolution
        block_in = ch
        for level, factor in enumerate(mult):
            stage = _Level()
            block_out = ch * factor
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, config.dropout, config.norm_groups))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, config.norm_groups))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(stage)
        self.mid = _Middle(block_in, config.dropout, config.norm_groups)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f). ``up[i]`` is stored in resolution order (0 = finest)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        resolution = config.resolution // config.downsampling_factor
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, config.dropout, config.norm_groups)
        stages: list[_Level] = []
        for level in reversed(range(len(mult))):
            stage = _Level()
            block_out = ch * mult[level]
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, config.dropout, config.norm_groups))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, config.norm_groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser (van den Oord et al., 2017) with taming's loss weighting.

    ``embedding.weight``: (n_embed, embed_dim). Input z: (B, D, h, w); returns the straight-through quantised
    latent, the codebook + commitment loss and the indices (B, h, w).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @property
    def n_embed(self) -> int:
        return self.embedding.weight.shape[0]

    def nearest_indices(self, z: Tensor) -> Tensor:
        """z: (B, D, h, w) -> indices (B, h, w) of the closest codebook entries (squared L2)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.embedding.weight
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
        )
        return distances.argmin(1).reshape(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) -> latent (B, D, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices = self.nearest_indices(z)
        quantized = self.lookup(indices)
        # taming weights the encoder-side term by 1 and the codebook-side term by beta.
        loss = F.mse_loss(quantized.detach(), z) + self.beta * F.mse_loss(quantized, z.detach())
        quantized = z + (quantized - z).detach()
        return quantized, loss, indices


class VQModel(nn.Module):
    """taming-transformers ``VQModel`` without its loss/discriminator: encoder, quant convs, codebook, decoder."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode_latent(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> pre-quantisation latent (B, embed_dim, H/16, W/16)."""
        return self.quant_conv(self.encoder(x))

    def encode_indices(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> indices (B, H/16, W/16)."""
        return self.quantize.nearest_indices(self.encode_latent(x))

    def decode_latent(self, quantized: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) -> image (B, 3, 16h, 16w) in roughly [-1, 1]."""
        return self.decode_latent(self.quantize.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (reconstruction, codebook loss, indices)."""
        quantized, loss, indices = self.quantize(self.encode_latent(x))
        return self.decode_latent(quantized), loss, indices


def taming_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model weights of a taming ``.ckpt``'s state dict (:func:`effvision.torch_checkpoint.tensor_state_dict`),
    minus the loss's (LPIPS, discriminator) keys."""
    return {k: v for k, v in state.items() if not k.startswith("loss.")}
