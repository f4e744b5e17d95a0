"""Swin-style window attention used by the MambaIC context model (MambaIC, Zeng et al., CVPR 2025).

Each channel-context and anchor-parameter stage is refined by a *window attention gate*: a 1x1
projection, one regular and one shifted window self-attention block (window 8, relative position
bias), and the residual attention gate of Cheng et al. 2020 (``trunk(x) * sigmoid(gate(swin(x))) + x``).

Any spatial size works: the map is zero-padded to a multiple of the window internally and padded
positions are masked out as keys, so they never influence real positions (the official code crashes
or silently changes shape for sides <= window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai.layers import AttentionBlock, conv1x1
from torch import Tensor, nn

# Added to masked attention logits; finite so a fully masked (padded) query row stays NaN-free.
_MASKED_LOGIT = -1e9


class WindowSelfAttention(nn.Module):
    """Multi-head self attention inside non-overlapping ``window x window`` windows.

    Args:
        dim: channels (tokens are (B, H, W, dim), H and W multiples of ``window``).
        head_dim: channels per head (``dim // head_dim`` heads).
        window: window side.
        shifted: roll the map by ``window // 2`` first (Swin SW-MSA) and mask across the wrap.
    """

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention dim {dim} is not a multiple of head_dim {head_dim}")
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.window = window
        self.shifted = shifted
        self.qkv = nn.Linear(dim, 3 * dim)
        self.relative_position_bias = nn.Parameter(torch.zeros(self.heads, 2 * window - 1, 2 * window - 1))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
        self.proj = nn.Linear(dim, dim)
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), dim=-1
        ).reshape(-1, 2)
        relative = coords[:, None, :] - coords[None, :, :] + window - 1
        self.register_buffer("relative_index", relative, persistent=False)

    def _window_bias(self) -> Tensor:
        """(heads, P, P) relative position bias, P = window^2."""
        index = self.relative_index
        return self.relative_position_bias[:, index[..., 0], index[..., 1]]

    def _key_mask(self, valid: Tensor) -> Tensor:
        """(nW, P, P) bool: True where a query may attend to a key (same shift region, key not padding)."""
        height, width = valid.shape
        w = self.window
        region = torch.zeros(height, width, dtype=torch.long, device=valid.device)
        if self.shifted:
            s = w // 2
            bands = (slice(0, -w), slice(-w, -s), slice(-s, None))
            label = 0
            for rows in bands:
                for cols in bands:
                    region[rows, cols] = label
                    label += 1
        region = _to_windows(region[None, :, :, None], w)[0, :, :, 0]  # (nW, P)
        keys = _to_windows(valid[None, :, :, None], w)[0, :, :, 0]
        return (region[:, :, None] == region[:, None, :]) & keys[:, None, :]

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x: (B, H, W, C); valid: (H, W) bool, False on padding. Returns (B, H, W, C)."""
        batch, height, width, channels = x.shape
        shift = self.window // 2 if self.shifted else 0
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
        windows = _to_windows(x, self.window)  # (B, nW, P, C)
        num_windows, tokens = windows.shape[1], windows.shape[2]
        qkv = self.qkv(windows).reshape(batch, num_windows, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, nW, P, hd)
        logits = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
        logits = logits + self._window_bias().float()[None, :, None]
        allowed = self._key_mask(valid)[None, None]
        logits = logits.masked_fill(~allowed, _MASKED_LOGIT)
        out = torch.softmax(logits, dim=-1).to(v.dtype) @ v
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, num_windows, tokens, channels)
        out = _from_windows(self.proj(out), self.window, height, width)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out


class SwinBlock(nn.Module):
    """Pre-norm transformer block: x + WSA(LN(x)), then x + MLP(LN(x)). Tokens (B, H, W, C)."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowSelfAttention(dim, head_dim, window, shifted)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), valid)
        return x + self.mlp(self.norm2(x))


class WindowAttentionGate(nn.Module):
    """1x1 in -> (regular + shifted window attention) gated residual -> 1x1 out. (B, C, H, W) -> same.

    Args:
        channels: input/output channels.
        attention_dim: inner width (official: 128).
        head_dim: channels per attention head (official: 16).
        window: window side (official: 8).
    """

    def __init__(self, channels: int, attention_dim: int, head_dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.project_in = conv1x1(channels, attention_dim)
        self.regular_window = SwinBlock(attention_dim, head_dim, window, shifted=False)
        self.shifted_window = SwinBlock(attention_dim, head_dim, window, shifted=True)
        residual_gate = AttentionBlock(attention_dim)
        self.trunk = residual_gate.conv_a
        self.gate = residual_gate.conv_b
        self.project_out = conv1x1(attention_dim, channels)

    def _swin(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h = -height % self.window
        pad_w = -width % self.window
        tokens = F.pad(x, (0, pad_w, 0, pad_h)).permute(0, 2, 3, 1)
        valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        tokens = self.shifted_window(self.regular_window(tokens, valid), valid)
        return tokens.permute(0, 3, 1, 2)[:, :, :height, :width]

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        out = self.trunk(x) * torch.sigmoid(self.gate(self._swin(x))) + x
        return self.project_out(out)


def _to_windows(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, window*window, C), windows in raster order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def _from_windows(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`_to_windows`: (B, nW, P, C) -> (B, H, W, C)."""
    batch, channels = windows.shape[0], windows.shape[-1]
    x = windows.reshape(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)
