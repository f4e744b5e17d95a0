"""Triton selective scan under TRITON_INTERPRET=1 (CPU) against the PyTorch reference.

The interpreter only takes effect when TRITON_INTERPRET=1 is set before Triton is imported, so these
tests run in a subprocess started by tests/test_kernels_triton.py (or directly:
``TRITON_INTERPRET=1 pytest tests/test_kernels_triton_scan.py``) and are skipped otherwise.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from effvision.kernels import _dispatch, selective_scan, selective_scan_ref  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(triton.language.standard.zeros, InterpretedFunction),
    reason="needs TRITON_INTERPRET=1 before triton is imported (run by tests/test_kernels_triton.py)",
)
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def scan_module(monkeypatch):
    """The Triton scan module, with NaN-poisoned outputs to catch unwritten elements."""
    monkeypatch.setattr(_dispatch, "poison_outputs", True)
    from effvision.kernels import _selective_scan_triton

    return _selective_scan_triton


def small_config(scan_module):
    """Tiny tiles so that short sequences cross several chunk boundaries."""
    return scan_module.ScanConfig(block_d=2, chunk=4, num_warps=1)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def random_inputs(batch=2, dim=6, length=13, state=3, groups=None, dtype=torch.float32, options=False):
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    inputs = dict(
        u=torch.randn(batch, dim, length).to(dtype),
        delta=(torch.randn(batch, dim, length) * 0.5).to(dtype),
        A=-torch.rand(dim, state) * 2 - 0.1,
        B=torch.randn(*bc_shape).to(dtype),
        C=torch.randn(*bc_shape).to(dtype),
    )
    if options:
        inputs.update(D=torch.randn(dim), z=torch.randn(batch, dim, length).to(dtype), delta_bias=torch.randn(dim))
    return inputs


def run_triton(scan_module, inputs, softplus=False, config=None):
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    args = [inputs.get(name) for name in names]
    return scan_module.selective_scan_triton(*args, softplus, config or small_config(scan_module))


def test_kernels_run_in_the_interpreter(scan_module):
    assert isinstance(scan_module._scan_forward_kernel, InterpretedFunction)
    assert isinstance(scan_module._scan_backward_kernel, InterpretedFunction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_reference_across_chunk_boundaries(scan_module, dtype):
    inputs = random_inputs(length=13, dtype=dtype)  # 13 steps = 3 full chunks of 4 + 1 step
    out, last_state = run_triton(scan_module, inputs)
    expected, expected_state = selective_scan_ref(**inputs, return_last_state=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < RELATIVE_TOLERANCE[dtype]
    assert relative_error(last_state, expected_state) < 1e-5


@pytest.mark.parametrize("groups, dim", [(2, 8), (2, 6), (4, 8)])
def test_grouped_forward_with_every_option_matches_reference(scan_module, groups, dim):
    inputs = random_inputs(dim=dim, groups=groups, options=True)
    out, last_state = run_triton(scan_module, inputs, softplus=True)
    expected, expected_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(last_state, expected_state) < 1e-5


def test_gradients_with_every_option_match_autograd_through_reference(scan_module):
    inputs = {k: v.requires_grad_() for k, v in random_inputs(dim=8, groups=2, options=True).items()}
    out, _ = run_triton(scan_module, inputs, softplus=True)
    expected = selective_scan_ref(**inputs, delta_softplus=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    expected_grads = torch.autograd.grad(expected, list(inputs.values()), grad_out)
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grad) < 1e-4, name


def test_gradients_without_options_match_autograd_through_reference(scan_module):
    inputs = {k: v.requires_grad_() for k, v in random_inputs(length=9).items()}
    out, _ = run_triton(scan_module, inputs)
    expected = selective_scan_ref(**inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    expected_grads = torch.autograd.grad(expected, list(inputs.values()), grad_out)
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) < 1e-4, name


@pytest.mark.parametrize("groups, dim, sub_blocks", [(2, 8, 2), (1, 8, 4), (1, 6, 3)])
def test_backward_programs_owning_several_channel_blocks_match_reference(scan_module, groups, dim, sub_blocks):
    # Several chunks (length 13, chunk 4) so dh and the dA/dD/dbias sums are carried through memory.
    config = scan_module.ScanConfig(block_d=2, chunk=4, num_warps=1, backward_sub_blocks=sub_blocks)
    inputs = {k: v.requires_grad_() for k, v in random_inputs(dim=dim, groups=groups, options=True).items()}
    out, _ = run_triton(scan_module, inputs, softplus=True, config=config)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    expected = selective_scan_ref(**inputs, delta_softplus=True)
    expected_grads = torch.autograd.grad(expected, list(inputs.values()), grad_out)
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grad) < 1e-4, name


def test_sub_blocks_straddling_a_group_are_refused(scan_module):
    config = scan_module.ScanConfig(block_d=2, chunk=4, num_warps=1, backward_sub_blocks=2)
    inputs = {k: v.requires_grad_() for k, v in random_inputs(dim=6, groups=3).items()}  # 2 channels a group
    out, _ = run_triton(scan_module, inputs, config=config)
    with pytest.raises(ValueError, match="backward_sub_blocks=2"):
        out.sum().backward()


def test_half_precision_gradients_match_reference_in_input_dtypes(scan_module):
    inputs = {k: v.requires_grad_() for k, v in random_inputs(length=7, dtype=torch.bfloat16, groups=2).items()}
    out, _ = run_triton(scan_module, inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    expected_grads = torch.autograd.grad(selective_scan_ref(**inputs), list(inputs.values()), grad_out)
    for (name, value), grad, expected_grad in zip(inputs.items(), grads, expected_grads, strict=True):
        assert grad.dtype == value.dtype and grad.shape == value.shape, name
        assert relative_error(grad, expected_grad) < 3e-2, name


def test_strong_decay_stays_finite_and_matches_reference(scan_module):
    inputs = random_inputs(length=10)
    inputs["A"] = torch.full_like(inputs["A"], -80.0)
    inputs["delta"] = torch.full_like(inputs["delta"], 4.0)
    out, _ = run_triton(scan_module, inputs)
    assert torch.isfinite(out).all()
    assert relative_error(out, selective_scan_ref(**inputs)) < 1e-5


def test_dispatch_runs_triton_on_cpu_under_the_interpreter():
    inputs = random_inputs(options=True)
    out, last_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    expected, expected_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(last_state, expected_state) < 1e-5
    assert not last_state.requires_grad
