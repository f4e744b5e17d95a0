"""Triton kernels on a CUDA GPU at real sizes, against the PyTorch references on the same GPU.

Marked ``gpu`` and skipped without CUDA (CI has none). On a GPU machine:
``python -m pytest -q tests/test_kernels_cuda.py``. Sizes are the issue's: DeiT-S / ViT-B token counts at
batch 256, and the scans (8, 1536, 4096, N=16) and (1, 512, 64*64*4, N=16); gradients at a smaller
batch so autograd through the reference fits in memory.
"""

import pytest
import torch

pytest.importorskip("triton")
from effvision.kernels import gather_tokens, merge_tokens, selective_scan, size_weighted_merge  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def tome_indices(batch, tokens, r, device):
    """CLS + set B + unmerged set A kept; r tokens of set A merged into random set-B slots."""
    a_set = torch.arange(1, tokens, 2, device=device)
    b_set = torch.arange(2, tokens, 2, device=device)
    order = torch.argsort(torch.rand(batch, a_set.numel(), device=device), dim=1)
    keep = torch.cat(
        [torch.zeros(batch, 1, dtype=torch.long, device=device), b_set.expand(batch, -1), a_set[order[:, r:]]], dim=1
    )
    dst = torch.randint(1, 1 + b_set.numel(), (batch, r), device=device)
    return keep, a_set[order[:, :r]], dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [384, 768])
def test_token_kernels_match_torch_at_batch_256(channels, dtype):
    torch.manual_seed(0)
    x = torch.randn(256, 197, channels, device="cuda", dtype=dtype)
    size = torch.randint(1, 6, (256, 197), device="cuda").float()
    keep, src, dst = tome_indices(256, 197, 50, "cuda")
    weights = (torch.rand(256, keep.shape[1], device="cuda", dtype=dtype),
               torch.rand(256, 50, device="cuda", dtype=dtype))
    out = merge_tokens(x, keep, src, dst, *weights, backend="triton")
    expected = merge_tokens(x.float(), keep, src, dst, *(w.float() for w in weights), backend="torch")
    assert relative_error(out, expected) < TOLERANCE[dtype]
    merged, merged_size = size_weighted_merge(x, size, keep, src, dst, backend="triton")
    expected, expected_size = size_weighted_merge(x.float(), size, keep, src, dst, backend="torch")
    assert relative_error(merged, expected) < TOLERANCE[dtype]
    assert torch.equal(merged_size, expected_size)
    gathered = gather_tokens(x, keep, size, backend="triton")
    assert torch.equal(gathered[0], gather_tokens(x, keep, size, backend="torch")[0])


def scan_inputs(batch, dim, length, groups, dtype, requires_grad=False):
    bc_shape = (batch, groups, 16, length)

    def make(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device="cuda") * scale).to(dt).requires_grad_(requires_grad)

    return dict(
        u=make(batch, dim, length), delta=make(batch, dim, length, scale=0.5),
        A=(-torch.rand(dim, 16, device="cuda") * 4 - 0.5).requires_grad_(requires_grad),
        B=make(*bc_shape), C=make(*bc_shape), D=make(dim, dt=torch.float32), z=make(batch, dim, length),
        delta_bias=make(dim, scale=0.1, dt=torch.float32),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 1536, 4096, 1), (1, 512, 64 * 64 * 4, 4)], ids=["mamba", "vmamba-64x64x4"])
def test_scan_forward_matches_reference_at_real_sizes(shape, dtype):
    torch.manual_seed(0)
    inputs = scan_inputs(*shape, dtype)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    expected, expected_last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="torch")
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert relative_error(last, expected_last) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_gradients_match_reference_at_real_length(dtype):
    torch.manual_seed(0)
    inputs = scan_inputs(2, 1536, 4096, 4, dtype, requires_grad=True)
    leaves = list(inputs.values())
    out = selective_scan(**inputs, delta_softplus=True, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    del out
    expected = selective_scan(**inputs, delta_softplus=True, backend="torch")
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grad) < (1e-4 if dtype == torch.float32 else 3e-2), name
