"""Triton forward and backward kernels of the selective scan (math in ``selective_scan.py``).

Imported lazily by ``selective_scan`` so that ``import effvision.kernels`` never imports Triton.

Parallel layout: one program per (block of ``block_d`` channels, batch row), all ``state`` entries of
each channel in registers; time is walked in chunks of ``chunk`` steps. Inside a chunk the linear
recurrence ``h_t = a_t h_{t-1} + x_t`` is an associative scan over pairs ``(a, x)`` (composition of
affine maps), so every load is a coalesced (channels x time) tile. Accumulation is fp32.

The forward pass stores the state at the end of every chunk (fp32, (batch, dim, n_chunks, state)); the
backward pass walks chunks in reverse, recomputes the states inside the chunk from the stored one and
runs the adjoint recurrence ``dh_t = a_{t+1} dh_{t+1} + C_t dy_t`` as a reverse associative scan.
Gradients of B and C are shared by all channels of a group. A backward program owns ``sub_blocks``
channel blocks and sums their dB/dC contributions in registers before writing one partial row per
program; the partial rows are reduced afterwards in a fixed order, so the backward pass is
deterministic (no atomics). More sub-blocks per program means fewer partial rows (less memory and
traffic: at (8, 1536, 4096) one row per 4 channels would be 1.6 GB of fp32 partials) but fewer
programs; ``backward_sub_blocks=None`` picks the largest count that still leaves two programs per SM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _dispatch


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes: channels per block (forward and backward), time steps per chunk, warps per program,
    and channel blocks per backward program (``None``: chosen from the problem size and the SM count).

    The backward keeps about twice as many fp32 tiles live as the forward; with 2 channels a block it
    compiles without register spills for sm_80 and sm_90 in every dtype (``kernels/aot_check.py``),
    while 4 channels a block spills on some (``tests/test_kernels_compile.py``).
    """

    block_d: int = 4
    chunk: int = 64
    num_warps: int = 8
    backward_block_d: int = 2
    backward_sub_blocks: int | None = None


DEFAULT_CONFIG = ScanConfig()


@triton.jit
def _affine_combine(a_first, x_first, a_second, x_second):
    # Composition of h -> a_first*h + x_first followed by h -> a_second*h + x_second.
    return a_first * a_second, a_second * x_first + x_second


@triton.jit
def _step_size(delta_ptr, bias, offsets, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt for a (channels, time) tile; exactly 0 where masked so padded steps leave the state alone."""
    dt = tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + bias[:, None]
    raw = dt
    if SOFTPLUS:
        # Same threshold as torch.nn.functional.softplus; the log form is exact enough below it.
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _channel_tile(
    A_ptr, D_ptr, bias_ptr, channels, states_n, batch, dim, length, state, per_group, groups,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Per-channel constants and row offsets of one (BLOCK_D channels, BLOCK_N states) tile."""
    mask_d = channels < dim
    mask_dn = mask_d[:, None] & (states_n < state)[None, :]
    A = tl.load(A_ptr + channels[:, None] * state + states_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.zeros(channels.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.zeros(channels.shape, dtype=tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + channels, mask=mask_d, other=0.0).to(tl.float32)
    row = (batch * dim + channels) * length  # start of each channel's time series
    group = channels // per_group
    bc_row = ((batch * groups + group)[:, None] * state + states_n[None, :]) * length  # (BLOCK_D, BLOCK_N)
    return mask_d, mask_dn, A, bias, skip, row, bc_row


@triton.jit
def _scan_forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    dim, length, state, per_group, groups, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_ALL_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    states_n = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    mask_d, mask_dn, A, bias, skip, row, bc_row = _channel_tile(
        A_ptr, D_ptr, bias_ptr, channels, states_n, batch, dim, length, state, per_group, groups, HAS_D, HAS_BIAS
    )
    state_row = (batch * dim + channels)[:, None] * n_chunks
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk_index in range(0, n_chunks):
        t = chunk_index * CHUNK + steps
        mask_dt = mask_d[:, None] & (t < length)[None, :]
        offsets = row[:, None] + t[None, :]
        dt, _ = _step_size(delta_ptr, bias, offsets, mask_dt, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
        bc_offsets = bc_row[:, :, None] + t[None, None, :]
        mask_bc = mask_dn[:, :, None] & (t < length)[None, None, :]
        B = tl.load(B_ptr + bc_offsets, mask=mask_bc, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + bc_offsets, mask=mask_bc, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, None, :] * A[:, :, None])
        drive = (dt * u)[:, None, :] * B
        decay_prefix, drive_prefix = tl.associative_scan((decay, drive), 2, _affine_combine)
        hs = drive_prefix + decay_prefix * h[:, :, None]
        y = tl.sum(hs * C, axis=1)
        # Padded steps carry the state unchanged, so the last column is the state after this chunk.
        h = tl.sum(tl.where(steps[None, None, :] == CHUNK - 1, hs, 0.0), axis=2)
        if STORE_ALL_STATES:
            state_offsets = (state_row + chunk_index) * state + states_n[None, :]
            tl.store(states_ptr + state_offsets, h, mask=mask_dn)
        if HAS_D:
            y += skip[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask_dt)
    if not STORE_ALL_STATES:
        tl.store(states_ptr + (batch * dim + channels)[:, None] * state + states_n[None, :], h, mask=mask_dn)


@triton.jit
def _scan_backward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh_ptr,
    dim, length, state, per_group, groups, n_chunks, n_programs,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SUB_BLOCKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # One program per (SUB_BLOCKS * BLOCK_D channels, batch row). Chunks are walked in reverse; inside a
    # chunk the program visits its channel sub-blocks in turn and sums their dB/dC contributions in
    # registers, so only one partial dB/dC row per program reaches memory. What a sub-block carries from
    # one chunk to the next (dh, and the dA/dD/dbias sums) lives in global rows owned by this program.
    program = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    states_n = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    mask_n = states_n < state
    partial_row = ((batch * n_programs + program) * state + states_n) * length  # (BLOCK_N,)
    for reverse_index in range(0, n_chunks):
        chunk_index = n_chunks - 1 - reverse_index
        t = chunk_index * CHUNK + steps
        mask_t = t < length
        dB_chunk = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
        dC_chunk = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
        for sub in range(0, SUB_BLOCKS):
            channels = (program * SUB_BLOCKS + sub) * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d, mask_dn, A, bias, skip, row, bc_row = _channel_tile(
                A_ptr, D_ptr, bias_ptr, channels, states_n, batch, dim, length, state, per_group, groups,
                HAS_D, HAS_BIAS,
            )
            per_channel = batch * dim + channels
            carried = per_channel[:, None] * state + states_n[None, :]  # (BLOCK_D, BLOCK_N) rows of dh, dA
            not_first = (states_n[None, :] * 0 + reverse_index) > 0
            dh = tl.load(dh_ptr + carried, mask=mask_dn & not_first, other=0.0)
            mask_dt = mask_d[:, None] & mask_t[None, :]
            offsets = row[:, None] + t[None, :]
            dt, raw_dt = _step_size(delta_ptr, bias, offsets, mask_dt, HAS_BIAS, SOFTPLUS)
            u = tl.load(u_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
            bc_offsets = bc_row[:, :, None] + t[None, None, :]
            mask_bc = mask_dn[:, :, None] & mask_t[None, None, :]
            B = tl.load(B_ptr + bc_offsets, mask=mask_bc, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + bc_offsets, mask=mask_bc, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)

            # Recompute the states of this chunk from the state stored at the end of the previous one.
            previous = tl.load(
                states_ptr + (per_channel[:, None] * n_chunks + chunk_index - 1) * state + states_n[None, :],
                mask=mask_dn & (states_n[None, :] * 0 + chunk_index > 0), other=0.0,
            )
            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            drive = (dt * u)[:, None, :] * B
            decay_prefix, drive_prefix = tl.associative_scan((decay, drive), 2, _affine_combine)
            hs = drive_prefix + decay_prefix * previous[:, :, None]

            if HAS_Z:
                z = tl.load(z_ptr + offsets, mask=mask_dt, other=0.0).to(tl.float32)
                gate = tl.sigmoid(z)
                pre_gate = tl.sum(hs * C, axis=1)
                if HAS_D:
                    pre_gate += skip[:, None] * u
                dz = dout * pre_gate * gate * (1.0 + z * (1.0 - gate))
                tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask_dt)
                dy = dout * z * gate
            else:
                dy = dout

            # Adjoint recurrence needs a_{t+1}; its dt is read from memory (t+1 may lie in the next chunk).
            next_dt, _ = _step_size(delta_ptr + 1, bias, offsets, mask_d[:, None] & (t + 1 < length)[None, :],
                                    HAS_BIAS, SOFTPLUS)
            next_decay = tl.exp(next_dt[:, None, :] * A[:, :, None])
            adjoint_decay, adjoint_drive = tl.associative_scan(
                (next_decay, C * dy[:, None, :]), 2, _affine_combine, reverse=True
            )
            dhs = adjoint_drive + adjoint_decay * dh[:, :, None]
            dh = tl.sum(tl.where(steps[None, None, :] == 0, dhs, 0.0), axis=2)

            decayed_previous = hs - drive  # a_t * h_{t-1}, without dividing by a possibly tiny a_t
            dt_grad = tl.sum(dhs * (B * u[:, None, :] + A[:, :, None] * decayed_previous), axis=1)
            du = tl.sum(dhs * B, axis=1) * dt
            if HAS_D:
                du += skip[:, None] * dy
            if SOFTPLUS:
                dt_grad = dt_grad * tl.sigmoid(raw_dt)
            dt_grad = tl.where(mask_dt, dt_grad, 0.0)
            tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=mask_dt)
            tl.store(ddelta_ptr + offsets, dt_grad.to(ddelta_ptr.dtype.element_ty), mask=mask_dt)
            dB_chunk += tl.sum(dhs * (dt * u)[:, None, :], axis=0)
            dC_chunk += tl.sum(hs * dy[:, None, :], axis=0)

            # Carried sums: read-modify-write of rows only this program touches. The barrier keeps every
            # thread's read of this chunk's dh row ahead of the overwrite below (threads may differ).
            tl.debug_barrier()
            not_first_d = (channels * 0 + reverse_index) > 0
            dA = tl.load(dA_ptr + carried, mask=mask_dn & not_first, other=0.0)
            dA += tl.sum(dhs * dt[:, None, :] * decayed_previous, axis=2)
            tl.store(dA_ptr + carried, dA, mask=mask_dn)
            tl.store(dh_ptr + carried, dh, mask=mask_dn)
            if HAS_D:
                dD = tl.load(dD_ptr + per_channel, mask=mask_d & not_first_d, other=0.0)
                tl.store(dD_ptr + per_channel, dD + tl.sum(dy * u, axis=1), mask=mask_d)
            if HAS_BIAS:
                dbias = tl.load(dbias_ptr + per_channel, mask=mask_d & not_first_d, other=0.0)
                tl.store(dbias_ptr + per_channel, dbias + tl.sum(dt_grad, axis=1), mask=mask_d)
            # The next chunk reads these rows back, possibly through other threads of this program.
            tl.debug_barrier()

        partial_offsets = partial_row[:, None] + t[None, :]
        mask_partial = mask_n[:, None] & mask_t[None, :]
        tl.store(dB_ptr + partial_offsets, dB_chunk, mask=mask_partial)
        tl.store(dC_ptr + partial_offsets, dC_chunk, mask=mask_partial)


def _block_d_for(per_group: int, wanted: int) -> int:
    """Largest power of two <= ``wanted`` dividing ``per_group``: a block never straddles two groups."""
    block = 1
    while block * 2 <= wanted and per_group % (block * 2) == 0:
        block *= 2
    return block


#: Most channel blocks one backward program walks through per chunk.
MAX_BACKWARD_SUB_BLOCKS = 16


def _backward_sub_blocks(
    batch: int, dim: int, per_group: int, block_d: int, config: ScanConfig, device: torch.device
) -> int:
    """Channel blocks per backward program: a power of two whose channels never straddle two groups.

    An explicit ``config.backward_sub_blocks`` is used as given (``ValueError`` if it straddles groups).
    Otherwise: 1 off CUDA, and on CUDA the largest count <= ``MAX_BACKWARD_SUB_BLOCKS`` that still gives
    at least two programs per streaming multiprocessor.
    """
    if config.backward_sub_blocks is not None:
        sub_blocks = config.backward_sub_blocks
        if sub_blocks < 1 or per_group % (block_d * sub_blocks) != 0:
            raise ValueError(
                f"backward_sub_blocks={sub_blocks} with block_d={block_d} must tile the {per_group} channels "
                f"of each B/C group exactly"
            )
        return sub_blocks
    if device.type != "cuda":
        return 1
    wanted_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    sub_blocks = 1
    while (
        sub_blocks * 2 <= MAX_BACKWARD_SUB_BLOCKS
        and per_group % (block_d * sub_blocks * 2) == 0
        and batch * triton.cdiv(dim, block_d * sub_blocks * 2) >= wanted_programs
    ):
        sub_blocks *= 2
    return sub_blocks


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, store_all_states, config):
    batch, dim, length = u.shape
    state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    block_d = _block_d_for(per_group, config.block_d)
    n_chunks = max(1, triton.cdiv(length, config.chunk))
    out = _dispatch.new_output((batch, dim, length), u.dtype, u.device)
    states = _dispatch.new_output(
        (batch, dim, n_chunks if store_all_states else 1, state), torch.float32, u.device
    )
    grid = (triton.cdiv(dim, block_d), batch)
    _scan_forward_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, states,
        dim, length, state, per_group, groups, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        STORE_ALL_STATES=store_all_states, BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(state), CHUNK=config.chunk, num_warps=config.num_warps,
    )
    return out, states


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper; inputs already validated, B/C grouped (batch, groups, state, length)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, config):
        u, delta, A, B, C, D, z, delta_bias = map(_contiguous, (u, delta, A, B, C, D, z, delta_bias))
        store_all = any(ctx.needs_input_grad[:8])
        out, states = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, store_all, config)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.config = softplus, config
        last_state = states[:, :, -1]
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        config = ctx.config
        batch, dim, length = u.shape
        state = A.shape[1]
        groups = B.shape[1]
        per_group = dim // groups
        block_d = _block_d_for(per_group, config.backward_block_d)
        sub_blocks = _backward_sub_blocks(batch, dim, per_group, block_d, config, u.device)
        n_programs = triton.cdiv(dim, block_d * sub_blocks)
        n_chunks = states.shape[2]
        device = u.device
        du = _dispatch.new_output(u.shape, u.dtype, device)
        ddelta = _dispatch.new_output(delta.shape, delta.dtype, device)
        dz = _dispatch.new_output(z.shape, z.dtype, device) if z is not None else None
        dA = _dispatch.new_output((batch, dim, state), torch.float32, device)
        dD = _dispatch.new_output((batch, dim), torch.float32, device) if D is not None else None
        dbias = _dispatch.new_output((batch, dim), torch.float32, device) if delta_bias is not None else None
        dB = _dispatch.new_output((batch, n_programs, state, length), torch.float32, device)
        dC = _dispatch.new_output((batch, n_programs, state, length), torch.float32, device)
        dh = _dispatch.new_output((batch, dim, state), torch.float32, device)  # carried between chunks
        _scan_backward_kernel[(n_programs, batch)](
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), states,
            du, ddelta, dz, dA, dD, dbias, dB, dC, dh,
            dim, length, state, per_group, groups, n_chunks, n_programs,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            SUB_BLOCKS=sub_blocks, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(state), CHUNK=config.chunk,
            num_warps=config.num_warps,
        )
        dB = dB.view(batch, groups, n_programs // groups, state, length).sum(2).to(B.dtype)
        dC = dC.view(batch, groups, n_programs // groups, state, length).sum(2).to(C.dtype)
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB, dC,
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None, None,
        )


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    config: ScanConfig = DEFAULT_CONFIG,
) -> tuple[Tensor, Tensor]:
    """Run the Triton scan; B/C may be (batch, state, length) or grouped. Returns (out, last_state)."""
    grouped = B.dim() == 4
    B4 = B if grouped else B.unsqueeze(1)
    C4 = C if grouped else C.unsqueeze(1)
    out, last_state = SelectiveScanTriton.apply(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, config)
    return out, last_state
