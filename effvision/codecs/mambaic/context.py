"""MambaIC channel-spatial context model: one :class:`SliceContext` per latent slice.

MambaIC (Zeng et al., CVPR 2025) splits the latent ``y`` (M channels) into slices coded in order.
For slice ``i``:

1. *Channel context*: ``[hyper means] + previous decoded slices`` and ``[hyper scales] + previous``
   are refined by window attention gates and turned into a coarse mean ``mu`` and scale by conv stacks.
2. *Spatial context*, two-pass checkerboard: the anchors ((row + col) even) are coded first from the
   channel context alone; the non-anchors then also see a 5x5 checkerboard-masked conv of the decoded
   anchors. Each pass runs a *context VSS stage* on ``[spatial context, mu, scale, hyper means,
   hyper scales]`` and window attention on the resulting means and scales.
3. *Latent residual prediction*: ``y_hat += 0.5 * tanh(lrp([channel context, y_hat]))``.

Encoder and decoder call exactly the same methods in the same order, so the entropy parameters match
bit for bit on the same machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effvision.codecs.mambaic.vss import VSSBlock
from effvision.codecs.mambaic.window_attention import WindowAttentionGate


def conv3x3_same(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def conv_stack(in_channels: int, hidden: tuple[int, int], out_channels: int) -> nn.Sequential:
    """conv3x3 -> GELU -> conv3x3 -> GELU -> conv3x3 (the official cc/lrp transforms)."""
    return nn.Sequential(
        conv3x3_same(in_channels, hidden[0]),
        nn.GELU(),
        conv3x3_same(hidden[0], hidden[1]),
        nn.GELU(),
        conv3x3_same(hidden[1], out_channels),
    )


def anchor_mask(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W) bool, True on checkerboard anchors ((row + col) even), coded in the first pass."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows + cols) % 2 == 0


class CheckerboardConv2d(nn.Conv2d):
    """Conv whose kernel only sees checkerboard neighbours of the other colour (He et al., CVPR 2021).

    Applied to a map holding only decoded anchors, it gives each non-anchor its spatial context.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        offsets = torch.arange(kernel_size) - kernel_size // 2
        mask = ((offsets[:, None] + offsets[None, :]) % 2 != 0).float()
        self.register_buffer("mask", mask.expand_as(self.weight).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class SliceContext(nn.Module):
    """Entropy parameters of latent slice ``index`` (of ``slice_channels`` channels).

    Args:
        index: slice position (0-based); it sees ``min(index, max_support)`` previous slices.
        latent_channels: M, channels of y (and of the hyper means/scales).
        slice_channels: M / number of slices.
        max_support: how many previous slices are used as channel context.
        attention_dim, head_dim, window: window attention gate settings.
        hidden: widths of the cc/lrp conv stacks (official: (224, 128)).
        context_depth: VSS blocks in the context stage (official: 2).
        drop_path: drop-path rates of the context VSS blocks (length ``context_depth``).
        d_state, ssm_ratio: SS2D settings.
    """

    def __init__(
        self,
        index: int,
        latent_channels: int,
        slice_channels: int,
        max_support: int,
        attention_dim: int,
        head_dim: int,
        window: int,
        hidden: tuple[int, int],
        context_depth: int,
        drop_path: list[float],
        d_state: int,
        ssm_ratio: float,
    ) -> None:
        super().__init__()
        support = latent_channels + slice_channels * min(index, max_support)
        self.mean_support_attention = WindowAttentionGate(support, attention_dim, head_dim, window)
        self.scale_support_attention = WindowAttentionGate(support, attention_dim, head_dim, window)
        if index > 0:
            # Slice 0 has no previous slices, so its coarse mean/scale would repeat the hyper prior:
            # the official model builds these transforms for slice 0 but never uses their output.
            self.mean_transform = conv_stack(support, hidden, slice_channels)
            self.scale_transform = conv_stack(support, hidden, slice_channels)
        self.lrp_transform = conv_stack(support + slice_channels, hidden, slice_channels)
        context_width = 2 * latent_channels + (2 if index == 0 else 4) * slice_channels
        self.context_vss = nn.Sequential(
            *[VSSBlock(context_width, drop_path[j], d_state, ssm_ratio) for j in range(context_depth)],
            conv3x3_same(context_width, 2 * slice_channels),
        )
        self.anchor_mean_attention = WindowAttentionGate(slice_channels, attention_dim, head_dim, window)
        self.anchor_scale_attention = WindowAttentionGate(slice_channels, attention_dim, head_dim, window)
        self.checkerboard_conv = CheckerboardConv2d(slice_channels, 2 * slice_channels)
        self.index = index
        self.slice_channels = slice_channels

    def channel_context(
        self, latent_means: Tensor, latent_scales: Tensor, previous: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Returns (mean_support, support): the refined mean support (reused by LRP) and the input of
        the context VSS stage (without the spatial context)."""
        mean_support = self.mean_support_attention(torch.cat([latent_means, *previous], dim=1))
        scale_support = self.scale_support_attention(torch.cat([latent_scales, *previous], dim=1))
        if self.index == 0:
            support = torch.cat([latent_means, latent_scales], dim=1)
        else:
            mu = self.mean_transform(mean_support)
            scale = self.scale_transform(scale_support)
            support = torch.cat([mu, scale, latent_means, latent_scales], dim=1)
        return mean_support, support

    def anchor_params(self, support: Tensor) -> tuple[Tensor, Tensor]:
        """First pass: (means, scales) (B, C_slice, H, W), valid at anchors."""
        batch, _, height, width = support.shape
        empty = support.new_zeros(batch, 2 * self.slice_channels, height, width)
        return self._params(empty, support)

    def non_anchor_params(self, anchors_hat: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        """Second pass from the decoded anchors (zeros at non-anchors): (means, scales), valid at non-anchors."""
        return self._params(self.checkerboard_conv(anchors_hat), support)

    def _params(self, spatial: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        means, scales = self.context_vss(torch.cat([spatial, support], dim=1)).chunk(2, dim=1)
        return self.anchor_mean_attention(means), self.anchor_scale_attention(scales)

    def residual(self, mean_support: Tensor, y_hat: Tensor) -> Tensor:
        """Latent residual prediction 0.5 * tanh(lrp([mean_support, y_hat]))."""
        return 0.5 * torch.tanh(self.lrp_transform(torch.cat([mean_support, y_hat], dim=1)))
