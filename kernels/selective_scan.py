"""Selective scan (Mamba-1, Gu & Dao 2023): PyTorch reference and dispatch.

Shapes: ``u, delta, z``: (batch, dim, length); ``A``: (dim, state) real; ``B, C``: (batch, state, length)
or grouped (batch, groups, state, length) where channel ``d`` reads group ``d // (dim // groups)``
(VMamba packs its 4 scan directions as 4 groups); ``D, delta_bias``: (dim,).

Math, per batch, channel ``d`` and state ``n`` (fp32 throughout)::

    dt_t  = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    h_t   = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t          (h_{-1} = 0)
    y_t   = sum_n C_t[n] * h_t[n]
    out_t = (y_t + D[d] * u_t) * silu(z_t)

``out`` has ``u``'s dtype; the optional last state ``h_{L-1}`` is (batch, dim, state) fp32 and carries
no gradient on the Triton / mamba-ssm paths.

This file holds the PyTorch reference and the dispatch function; the Triton forward/backward kernels
live in ``_selective_scan_triton.py`` so that Triton is only imported when they run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch

#: time steps per chunk of the reference: bounds the (chunk, batch, dim, state) temporaries.
REFERENCE_CHUNK = 256


def check_scan_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the first input whose shape does not fit the others (``D`` and
    ``delta_bias`` are (dim,), ``z`` is u's shape: the PyTorch path broadcast other shapes silently and the
    Triton kernel read past their buffers)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, length); got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, state); got {tuple(A.shape)}")
    state = A.shape[1]
    for name, bc in (("B", B), ("C", C)):
        grouped = bc.dim() == 4
        expected = (batch, bc.shape[1], state, length) if grouped else (batch, state, length)
        if tuple(bc.shape) != expected or (grouped and dim % bc.shape[1] != 0):
            raise ValueError(
                f"{name} must be (batch, state, length) or (batch, groups, state, length) with dim {dim} "
                f"divisible by groups; got {tuple(bc.shape)} for u {tuple(u.shape)} and state {state}"
            )
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape; got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, value, expected in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape))):
        _dispatch.check_shape(value, name, expected)


def _grouped(bc: Tensor) -> Tensor:
    """(batch, state, length) -> (batch, 1, state, length); grouped inputs pass through."""
    return bc.unsqueeze(1) if bc.dim() == 3 else bc


class _LinearRecurrence(torch.autograd.Function):
    """``h_t = a_t * h_{t-1} + b_t`` over the leading (time) dimension, with a hand-written backward.

    Autograd on the plain loop records two nodes per step; here the forward is two in-place ops per step
    and the backward one fused ``addcmul`` per step, with no graph, which is what makes the CPU reference
    usable for training.
    """

    @staticmethod
    def forward(ctx, decay: Tensor, drive: Tensor, h0: Tensor) -> Tensor:
        states = torch.empty_like(drive)
        h = h0
        for t in range(decay.shape[0]):
            # multiply, then add (not a fused addcmul): bit for bit the rounding of ``decay * h + drive``,
            # so latents, and hence bitstreams, match the plain loop of earlier versions
            h = torch.mul(decay[t], h, out=states[t]).add_(drive[t])
        ctx.save_for_backward(decay, h0, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        decay, h0, states = ctx.saved_tensors
        grad_drive = torch.empty_like(grad_states)  # dL/dh_t = grad_states[t] + a_{t+1} * dL/dh_{t+1}
        last = decay.shape[0] - 1
        carry = grad_drive[last].copy_(grad_states[last])
        for t in range(last - 1, -1, -1):
            carry = torch.addcmul(grad_states[t], decay[t + 1], carry, out=grad_drive[t])
        previous = torch.cat([h0.unsqueeze(0), states[:-1]])
        grad_decay = grad_drive * previous
        grad_h0 = decay[0] * grad_drive[0]
        return grad_decay, grad_drive, grad_h0


def linear_recurrence(decay: Tensor, drive: Tensor, h0: Tensor) -> Tensor:
    """States of ``h_t = decay[t] * h_{t-1} + drive[t]`` (``h_{-1} = h0``); (T, ...) in, (T, ...) out.

    Differentiable in all three inputs. Shapes: ``decay`` and ``drive`` (T, *S), ``h0`` (*S).
    """
    if decay.shape[0] == 0:
        return drive.new_zeros(drive.shape)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        # graph capture: the out= writes of the fused loop do not trace; record the plain loop instead
        states, h = [], h0
        for decay_t, drive_t in zip(decay.unbind(0), drive.unbind(0), strict=True):
            h = decay_t * h + drive_t
            states.append(h)
        return torch.stack(states)
    return _LinearRecurrence.apply(decay.contiguous(), drive.contiguous(), h0.contiguous())


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = REFERENCE_CHUNK,
) -> Tensor | tuple[Tensor, Tensor]:
    """PyTorch reference of the selective scan (see module docstring); differentiable.

    A sequential recurrence over time, vectorised over batch, channels and state, so it is stable for
    any ``dt * A`` (it only ever multiplies by ``exp(dt * A)``, never by exponentials of cumulative
    sums). Time is processed in chunks of ``chunk_size`` steps so the per-step decay and input terms
    are materialised for one chunk at a time.
    """
    batch, dim, length = u.shape
    state = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    groups = Bg.shape[1]
    if dim % groups != 0 or Cg.shape[1] != groups:
        raise ValueError(f"dim {dim} must be divisible by the number of B/C groups {groups}")
    per_group = dim // groups

    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.float()
    # Layout (time, batch, groups, channels per group, state) keeps each step's slice contiguous.
    A_g = A.float().reshape(1, 1, groups, per_group, state)
    dt_g = dt.reshape(batch, groups, per_group, length)
    dtu_g = (dt * uf).reshape(batch, groups, per_group, length)
    h = u.new_zeros(batch, groups, per_group, state, dtype=torch.float32)
    ys = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        # the small per-step factors are made contiguous first, so the (T, b, g, p, n) products come out
        # contiguous and the recurrence needs no copies
        dt_c = dt_g[..., start:stop].permute(3, 0, 1, 2).contiguous().unsqueeze(-1)  # (T, b, g, p, 1)
        decay = torch.exp(dt_c * A_g)  # (T, b, g, p, n)
        B_c = Bg[..., start:stop].float().permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # (T, b, g, 1, n)
        C_c = Cg[..., start:stop].float().permute(3, 0, 1, 2).contiguous().unsqueeze(3)  # (T, b, g, 1, n)
        drive = dtu_g[..., start:stop].permute(3, 0, 1, 2).contiguous().unsqueeze(-1) * B_c  # (T, b, g, p, n)
        states = linear_recurrence(decay, drive, h)  # (T, b, g, p, n)
        h = states[-1]
        if states.requires_grad:  # training: a batched matmul, far cheaper to differentiate than mul + sum
            y_c = torch.einsum("tbgpn,tbgn->tbgp", states, C_c.squeeze(3))  # (T, b, g, p)
        else:  # inference (encode/decode): the rounding of earlier versions, so their files decode the same
            y_c = (states * C_c).sum(-1)
        ys.append(y_c.permute(1, 2, 3, 0).reshape(batch, dim, stop - start))
    out = torch.cat(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    if D is not None:
        out = out + D.float()[:, None] * uf
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(u.dtype)
    if return_last_state:
        return out, h.reshape(batch, dim, state)
    return out


def _mamba_ssm_unavailable_reason() -> str | None:
    if not _dispatch.module_available("mamba_ssm"):
        return "mamba_ssm backend needs the 'mamba_ssm' package (pip install effvision[gpu])"
    failure = _dispatch.import_failure("mamba_ssm")
    return None if failure is None else f"mamba_ssm backend: {failure}"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm ``selective_scan_fn`` semantics (see module docstring).

    ``backend``: "auto" (Triton on CUDA tensors when Triton is importable, else PyTorch), "torch",
    "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or "mamba_ssm" (when installed).
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    chosen = _dispatch.resolve_backend(
        backend,
        (u, delta, A, B, C, D, z, delta_bias),
        "selective_scan",
        extra_backends={"mamba_ssm": _mamba_ssm_unavailable_reason()},
    )
    if chosen == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    if chosen == "triton" and A.shape[1] > 0:  # a state of width 0 has no block to launch: the reference
        from ._selective_scan_triton import selective_scan_triton

        out, last_state = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last_state) if return_last_state else out
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
