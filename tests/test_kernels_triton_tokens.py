"""Triton token gather / merge kernels under TRITON_INTERPRET=1 (CPU) against the PyTorch references.

Run in a subprocess by tests/test_kernels_triton.py (TRITON_INTERPRET=1 must be set before Triton is
imported), or directly: ``TRITON_INTERPRET=1 pytest tests/test_kernels_triton_tokens.py``.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from effvision.kernels import (  # noqa: E402
    _dispatch,
    gather_tokens,
    gather_tokens_ref,
    merge_tokens,
    merge_tokens_ref,
    size_weighted_merge,
    size_weighted_merge_ref,
)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(triton.language.standard.zeros, InterpretedFunction),
    reason="needs TRITON_INTERPRET=1 before triton is imported (run by tests/test_kernels_triton.py)",
)
RELATIVE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_dispatch, "poison_outputs", True)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def random_partition(batch, tokens, kept):
    """Per batch row: ``kept`` destination tokens and the remaining tokens as sources."""
    order = torch.argsort(torch.rand(batch, tokens), dim=1)
    return order[:, :kept], order[:, kept:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighted_merge_matches_reference(dtype):
    x = torch.randn(3, 20, 24).to(dtype)
    keep, src = random_partition(3, 20, 8)
    dst = torch.randint(0, 8, src.shape)
    keep_weight, src_weight = torch.rand(3, 8).to(dtype), torch.rand(3, 12).to(dtype)
    out = merge_tokens(x, keep, src, dst, keep_weight, src_weight, backend="triton")
    expected = merge_tokens_ref(x.float(), keep, src, dst, keep_weight.float(), src_weight.float())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < RELATIVE_TOLERANCE[dtype]


@pytest.fixture
def merge_module():
    from effvision.kernels import _token_merge_triton

    return _token_merge_triton


def test_many_sources_on_one_destination_across_channel_blocks(merge_module, monkeypatch):
    monkeypatch.setattr(merge_module, "MAX_BLOCK_C", 64)  # 136 channels = 3 channel blocks
    x = torch.randn(2, 80, 136)
    keep, src = random_partition(2, 80, 8)
    dst = torch.full_like(src, 3)  # 72 sources: 64 on destination 3, 8 on 5, none on the others
    dst[:, ::9] = 5
    out = merge_tokens(x, keep, src, dst, backend="triton")
    assert relative_error(out, merge_tokens_ref(x, keep, src, dst)) < 1e-6
    merged, merged_size = size_weighted_merge(x, torch.rand(2, 80) + 0.5, keep, src, dst, backend="triton")
    assert torch.isfinite(merged).all() and torch.isfinite(merged_size).all()


def test_sources_are_grouped_by_destination_in_list_order(merge_module):
    src = torch.tensor([[10, 11, 12, 13, 14]])
    dst = torch.tensor([[2, 0, 2, 1, 0]])
    weight = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    sources, weights, bounds = merge_module.sources_by_destination(src, dst, weight, n_out=4)
    assert sources.tolist() == [[11, 14, 13, 10, 12]]
    assert torch.equal(weights, torch.tensor([[0.2, 0.5, 0.4, 0.1, 0.3]]))
    assert bounds.tolist() == [[0, 2, 3, 5, 5]]  # destination 3 has no source


def test_gather_only_merge_copies_rows_exactly():
    x = torch.randn(2, 15, 10)
    keep, _ = random_partition(2, 15, 6)
    out = merge_tokens(x, keep, backend="triton")
    assert torch.equal(out, merge_tokens_ref(x, keep))


def test_merge_is_deterministic():
    x = torch.randn(2, 40, 16)
    keep, src = random_partition(2, 40, 4)
    dst = torch.randint(0, 4, src.shape)
    first = merge_tokens(x, keep, src, dst, backend="triton")
    assert torch.equal(first, merge_tokens(x, keep, src, dst, backend="triton"))


def test_merge_gradients_match_autograd_through_reference():
    x = torch.randn(2, 12, 8, requires_grad=True)
    keep, src = random_partition(2, 12, 5)
    dst = torch.randint(0, 5, src.shape)
    keep_weight = torch.rand(2, 5, requires_grad=True)
    src_weight = torch.rand(2, 7, requires_grad=True)
    out = merge_tokens(x, keep, src, dst, keep_weight, src_weight, backend="triton")
    expected = merge_tokens_ref(x, keep, src, dst, keep_weight, src_weight)
    grad_out = torch.randn_like(out)
    leaves = (x, keep_weight, src_weight)
    for grad, expected_grad in zip(
        torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out), strict=True
    ):
        assert relative_error(grad, expected_grad) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_size_weighted_merge_matches_reference(dtype):
    x = torch.randn(3, 18, 20).to(dtype)
    size = torch.randint(1, 5, (3, 18, 1)).float()
    keep, src = random_partition(3, 18, 7)
    dst = torch.randint(0, 7, src.shape)
    merged, merged_size = size_weighted_merge(x, size, keep, src, dst, backend="triton")
    expected, expected_size = size_weighted_merge_ref(x, size.squeeze(-1), keep, src, dst)
    assert merged.dtype == dtype and merged_size.shape == (3, 7, 1)
    assert relative_error(merged, expected) < RELATIVE_TOLERANCE[dtype]
    assert torch.equal(merged_size.squeeze(-1), expected_size)


def test_size_weighted_merge_conserves_total_size_and_mass():
    x = torch.randn(2, 16, 6)
    size = torch.randint(1, 4, (2, 16)).float()
    keep, src = random_partition(2, 16, 5)
    dst = torch.randint(0, 5, src.shape)
    merged, merged_size = size_weighted_merge(x, size, keep, src, dst, backend="triton")
    assert torch.equal(merged_size.sum(1), size.sum(1))  # small integers: exact in fp32
    torch.testing.assert_close((merged * merged_size[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_size_weighted_merge_gradients_match_reference():
    x = torch.randn(2, 10, 4, requires_grad=True)
    size = (torch.rand(2, 10) + 0.5).requires_grad_()
    keep, src = random_partition(2, 10, 4)
    dst = torch.randint(0, 4, src.shape)
    merged, merged_size = size_weighted_merge(x, size, keep, src, dst, backend="triton")
    expected, expected_size = size_weighted_merge_ref(x, size, keep, src, dst)
    grad_out, grad_size = torch.randn_like(merged), torch.randn_like(merged_size)
    grads = torch.autograd.grad((merged, merged_size), (x, size), (grad_out, grad_size))
    expected_grads = torch.autograd.grad((expected, expected_size), (x, size), (grad_out, grad_size))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) < 1e-6


def test_gather_copies_tokens_sizes_and_sources_exactly():
    x, size, source = torch.randn(2, 14, 9).half(), torch.rand(2, 14, 1), torch.rand(2, 14, 300)
    index, _ = random_partition(2, 14, 6)
    x_out, size_out, source_out = gather_tokens(x, index, size, source, backend="triton")
    expected = gather_tokens_ref(x, index, size.squeeze(-1), source)
    assert torch.equal(x_out, expected[0])
    assert size_out.shape == (2, 6, 1) and torch.equal(size_out.squeeze(-1), expected[1])
    assert torch.equal(source_out, expected[2])


def test_gather_without_extras_returns_none_for_them():
    x = torch.randn(2, 7, 5)
    index, _ = random_partition(2, 7, 3)
    x_out, size_out, source_out = gather_tokens(x, index, backend="triton")
    assert torch.equal(x_out, gather_tokens_ref(x, index)[0])
    assert size_out is None and source_out is None


def test_gather_gradient_scatters_back_to_kept_rows():
    x = torch.randn(2, 9, 4, requires_grad=True)
    index, _ = random_partition(2, 9, 4)
    x_out, _, _ = gather_tokens(x, index, backend="triton")
    grad_out = torch.randn_like(x_out)
    (grad,) = torch.autograd.grad(x_out, x, grad_out)
    expected = torch.zeros_like(x).scatter(1, index[..., None].expand(-1, -1, 4), grad_out)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("index, error", [
    (torch.tensor([[0, 6], [0, 1]]), "index holds values outside"),
    (torch.tensor([[0, -1], [0, 1]]), "index holds values outside"),
    (torch.tensor([[0, 1]]), r"index must have shape \(2, M\)"),
    (torch.tensor([[0.0, 1.0], [0.0, 1.0]]), "index must be an integer tensor"),
])
def test_gather_refuses_indices_the_kernel_would_read_past_the_buffer_with(index, error):
    """The Triton gather read memory past x for such indices and returned it as tokens."""
    x = torch.randn(2, 6, 5)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=error):
        gather_tokens(x, index, backend="triton")


@pytest.mark.parametrize("field, value, error", [
    ("keep_index", torch.tensor([[0, 9, 2], [1, 2, 3]]), "keep_index holds values outside"),
    ("src_index", torch.tensor([[4, 8], [4, 5]]), "src_index holds values outside"),
    ("dst_index", torch.tensor([[0, 3], [1, 2]]), r"dst_index holds values outside \[0, 3\)"),
    ("dst_index", None, "src_index and dst_index go together"),
    ("src_weight", torch.ones(2, 3), r"src_weight must have shape \(2, 2\)"),
])
def test_merge_refuses_indices_and_shapes_the_kernel_cannot_take(field, value, error):
    """Out-of-range keep/src indices read another row or past the buffer; an out-of-range destination
    dropped its source silently (the reference raises)."""
    inputs = dict(keep_index=torch.tensor([[0, 1, 2], [1, 2, 3]]), src_index=torch.tensor([[4, 5], [4, 5]]),
                  dst_index=torch.tensor([[0, 2], [1, 2]]), src_weight=torch.ones(2, 2))
    inputs[field] = value
    with pytest.raises((RuntimeError, ValueError), match=error):
        merge_tokens(torch.randn(2, 6, 4), backend="triton", **inputs)


def test_sizes_are_computed_when_there_are_no_channels_to_launch_for():
    """With zero channels the launch was skipped and the size outputs returned uninitialised."""
    size = torch.rand(2, 6) + 0.5
    keep, src = random_partition(2, 6, 3)
    dst = torch.randint(0, 3, src.shape)
    empty = torch.randn(2, 6, 0)
    expected = size_weighted_merge_ref(empty, size, keep, src, dst)[1]
    assert torch.equal(size_weighted_merge(empty, size, keep, src, dst, backend="triton")[1], expected)
    assert torch.equal(gather_tokens(empty, keep, size, backend="triton")[1], torch.gather(size, 1, keep))
