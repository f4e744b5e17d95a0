"""The PyTorch selective-scan reference against a naive per-timestep, per-channel loop."""

import pytest
import torch
import torch.nn.functional as F
from effvision.kernels import selective_scan, selective_scan_ref


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Literal transcription of the recurrence: loops over batch, channel, time (float64)."""
    batch, dim, length = u.shape
    state = A.shape[1]
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = dim // B.shape[1]
    out = torch.zeros(batch, dim, length, dtype=torch.float64)
    last = torch.zeros(batch, dim, state, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            g = d // per_group
            h = torch.zeros(state, dtype=torch.float64)
            for t in range(length):
                dt = delta[b, d, t].double() + (0.0 if delta_bias is None else delta_bias[d].double())
                if delta_softplus:
                    dt = F.softplus(dt)
                h = torch.exp(dt * A[d].double()) * h + dt * B[b, g, :, t].double() * u[b, d, t].double()
                y = (C[b, g, :, t].double() * h).sum()
                if D is not None:
                    y = y + D[d].double() * u[b, d, t].double()
                if z is not None:
                    y = y * F.silu(z[b, d, t].double())
                out[b, d, t] = y
            last[b, d] = h
    return out, last


def random_inputs(batch=2, dim=6, length=13, state=4, groups=None, dtype=torch.float32):
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    return dict(
        u=torch.randn(batch, dim, length, dtype=dtype),
        delta=torch.randn(batch, dim, length, dtype=dtype) * 0.5,
        A=-torch.rand(dim, state) * 2 - 0.1,
        B=torch.randn(*bc_shape, dtype=dtype),
        C=torch.randn(*bc_shape, dtype=dtype),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_reference_matches_naive_loop_across_chunk_boundaries(chunk_size):
    x = random_inputs(length=13)
    out, last = selective_scan_ref(**x, return_last_state=True, chunk_size=chunk_size)
    ref_out, ref_last = naive_scan(**x)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-5, atol=1e-5)


def test_reference_matches_naive_loop_with_all_options_and_groups():
    x = random_inputs(dim=8, groups=4)
    extra = dict(D=torch.randn(8), z=torch.randn(2, 8, 13), delta_bias=torch.randn(8))
    out = selective_scan_ref(**x, **extra, delta_softplus=True, chunk_size=5)
    ref_out, _ = naive_scan(**x, **extra, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_reference_is_stable_for_strong_decay_over_long_sequences():
    x = random_inputs(batch=1, dim=2, length=2000, state=3)
    x["A"] = torch.full((2, 3), -50.0)
    x["delta"] = torch.full((1, 2, 2000), 5.0)
    out, last = selective_scan_ref(**x, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()


def test_reference_keeps_input_dtype_and_returns_fp32_state():
    x = random_inputs(dtype=torch.bfloat16)
    out, last = selective_scan_ref(**x, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert last.shape == (2, 6, 4)


def test_dispatch_uses_reference_on_cpu():
    x = random_inputs()
    torch.testing.assert_close(selective_scan(**x), selective_scan_ref(**x), rtol=0, atol=0)


def test_linear_recurrence_gradients_match_autograd_of_the_loop():
    """The hand-written backward of the recurrence against autograd through the literal loop (float64)."""
    from effvision.kernels.selective_scan import linear_recurrence

    torch.manual_seed(0)
    decay = torch.rand(9, 2, 3, dtype=torch.float64, requires_grad=True)
    drive = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_recurrence, (decay, drive, h0))

    states, h = [], h0
    for t in range(9):
        h = decay[t] * h + drive[t]
        states.append(h)
    weights = torch.randn(9, 2, 3, dtype=torch.float64)
    expected = torch.autograd.grad((torch.stack(states) * weights).sum(), (decay, drive, h0))
    got = torch.autograd.grad((linear_recurrence(decay, drive, h0) * weights).sum(), (decay, drive, h0))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)


def test_reference_chunks_carry_state_and_gradient():
    """Chunk boundaries of the reference change nothing, values or gradients."""
    torch.manual_seed(1)
    inputs = random_inputs(length=23, groups=2, dim=6)
    for tensor in inputs.values():
        tensor.requires_grad_(tensor.is_floating_point())
    whole = selective_scan_ref(**inputs, delta_softplus=True, chunk_size=64)
    chunked = selective_scan_ref(**inputs, delta_softplus=True, chunk_size=5)
    torch.testing.assert_close(chunked, whole)
    g_whole = torch.autograd.grad(whole.square().sum(), inputs["u"])
    g_chunked = torch.autograd.grad(chunked.square().sum(), inputs["u"])
    torch.testing.assert_close(g_chunked[0], g_whole[0])


def test_inference_rounds_exactly_like_the_plain_float32_loop():
    """Encode and decode run without gradients; there the reference must give the very floats of the plain
    loop (``h = exp(dt A) h + dt B u``, ``y = (h * C).sum``), so files written by earlier versions decode
    the same."""
    torch.manual_seed(2)
    x = random_inputs(batch=2, dim=8, length=40, groups=2)
    with torch.no_grad():
        out = selective_scan_ref(**x, chunk_size=16)
    dt = x["delta"]
    batch, dim, length = x["u"].shape
    B, C = x["B"].repeat_interleave(4, dim=1), x["C"].repeat_interleave(4, dim=1)  # (batch, dim, state, length)
    h = torch.zeros(batch, dim, x["A"].shape[1])
    expected = []
    for t in range(length):
        decay = torch.exp(dt[..., t, None] * x["A"])
        h = decay * h + (dt[..., t] * x["u"][..., t])[..., None] * B[..., t]
        expected.append((h * C[..., t]).sum(-1))
    assert torch.equal(out, torch.stack(expected, dim=-1))
