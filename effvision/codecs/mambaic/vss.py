"""Visual state-space (VSS) block with the 4-direction 2D selective scan (SS2D).

MambaIC (Zeng et al., CVPR 2025) builds its transforms and context model from VMamba's VSS block:
``x + DropPath(SS2D(LayerNorm(x)))``. SS2D projects to ``2 * d_inner`` channels (value and gate),
runs a depthwise 3x3 conv + SiLU on the value, scans the map in 4 orders (row-major, column-major
and both reversed), each order with its own x/dt projections, ``A`` and ``D``, sums the 4 outputs
back in image order, applies LayerNorm and the ``SiLU(gate)``, and projects back to ``d_model``.

The 4 directions are packed as ``G = 4`` groups of one selective-scan call, dispatched through
:func:`effvision.kernels.selective_scan.selective_scan` (Triton on CUDA, the PyTorch reference on CPU).
Parameter names follow VMamba's SS2D so official checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIRECTIONS = 4


def _selective_scan(backend: str, *args, **kwargs) -> Tensor:
    # Imported on first use so importing the codec modules stays light.
    from effvision.kernels.selective_scan import selective_scan

    return selective_scan(*args, backend=backend, **kwargs)


def cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, reversed row-major, reversed column-major."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, H*W) -> (B, D, H*W): undo each scan order and sum, in image row-major order."""
    batch, _, channels, length = y.shape
    unflipped = y[:, 0:2] + y[:, 2:4].flip(-1)
    cols = unflipped[:, 1].reshape(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, length)
    return unflipped[:, 0] + cols


class SS2D(nn.Module):
    """2D selective scan over 4 directions. Input/output (B, H, W, d_model), channels last.

    Args:
        d_model: channels.
        d_state: SSM state size N (official: 16).
        ssm_ratio: d_inner = ssm_ratio * d_model (official: 2).
        dt_rank: rank of the dt projection (official: ceil(d_model / 16)).
        scan_backend: backend passed to ``selective_scan`` ("auto", "torch", ...).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(DIRECTIONS, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )
        # Mamba's dt init: weights keep unit variance, bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        dt_std = dt_rank**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(DIRECTIONS, d_inner, dt_rank).uniform_(-dt_std, dt_std))
        dt = torch.exp(torch.rand(DIRECTIONS, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A = -(1..N) for every channel of every direction.
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(DIRECTIONS * d_inner, 1)
        self.A_logs = nn.Parameter(a_log)
        self.Ds = nn.Parameter(torch.ones(DIRECTIONS * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        value, gate = self.in_proj(x).chunk(2, dim=-1)
        value = F.silu(self.conv2d(value.permute(0, 3, 1, 2).contiguous()))
        length = height * width
        xs = cross_scan(value)  # (B, 4, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        # The scan runs in float32 (as the official code): its recurrence is sensitive to precision.
        y = _selective_scan(
            self.scan_backend,
            xs.reshape(batch, -1, length).float(),
            dts.reshape(batch, -1, length).float(),
            -torch.exp(self.A_logs.float()),
            b_ssm.float().contiguous(),
            c_ssm.float().contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
        )
        y = cross_merge(y.reshape(batch, DIRECTIONS, self.d_inner, length), height, width)
        y = self.out_norm(y.transpose(1, 2).reshape(batch, height, width, self.d_inner).to(x.dtype))
        return self.out_proj(y * F.silu(gate))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the residual branch of each sample with probability ``drop_prob``
    and scale the kept ones by ``1 / (1 - drop_prob)``; the identity in eval mode. Same random draws as
    timm's ``DropPath`` (the codec path does not import timm)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob) if keep_prob > 0.0 else x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LayerNorm(x)))`` on a (B, C, H, W) map."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 16, ssm_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self.drop_path(self.op(self.norm(tokens)))
        return tokens.permute(0, 3, 1, 2)
