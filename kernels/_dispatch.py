"""Backend selection shared by every kernel's dispatch function.

``auto`` picks Triton for CUDA tensors when Triton is importable and the PyTorch reference otherwise (with
one warning when Triton is installed but fails to import). An explicitly requested backend that cannot run
raises ``RuntimeError`` saying why; an unknown name raises ``ValueError``. Triton is imported only when a
kernel is about to use it (importing it is slow); otherwise only its presence is checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from functools import cache

import torch
from torch import Tensor


@cache
def module_available(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


@cache
def import_failure(name: str) -> str | None:
    """Why the installed package ``name`` fails to import (a broken or mismatched install), or ``None``
    when it imports. Called only when a kernel is about to use the package."""
    try:
        importlib.import_module(name)
    except Exception as error:  # a broken install raises anything from ImportError to RuntimeError
        return f"the {name!r} package is installed but fails to import ({type(error).__name__}: {error})"
    return None


@cache
def _warn_fallback(operation: str, failure: str) -> None:
    warnings.warn(f"{operation}: {failure}; using the PyTorch reference instead", RuntimeWarning, stacklevel=4)


def triton_interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _devices(tensors: tuple[Tensor | None, ...]) -> set[str]:
    return {t.device.type for t in tensors if t is not None}


def triton_unavailable_reason(tensors: tuple[Tensor | None, ...]) -> str | None:
    """Why the Triton backend cannot run on ``tensors``, or ``None`` when it can."""
    if not module_available("triton"):
        return "triton backend needs the 'triton' package, which is not installed"
    failure = import_failure("triton")
    if failure is not None:
        return f"triton backend: {failure}"
    devices = _devices(tensors)
    if devices == {"cuda"}:
        return None
    if triton_interpret_mode() and devices == {"cpu"}:
        return None
    return (
        f"triton backend needs CUDA tensors or TRITON_INTERPRET=1 with CPU tensors "
        f"(got devices {sorted(devices)}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})"
    )


def resolve_backend(
    backend: str,
    tensors: tuple[Tensor | None, ...],
    operation: str,
    extra_backends: dict[str, str | None] | None = None,
) -> str:
    """Return the backend that will run ``operation``.

    Args:
        backend: "auto", "torch", "triton", or a key of ``extra_backends``.
        tensors: the inputs (``None`` entries are ignored); their devices decide what can run.
        operation: name used in error messages.
        extra_backends: further backends mapped to why they are unavailable (``None`` = available).
    """
    extra_backends = extra_backends or {}
    known = ("auto", "torch", "triton", *extra_backends)
    if backend not in known:
        raise ValueError(f"unknown backend {backend!r} for {operation}; choose one of {known}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if _devices(tensors) == {"cuda"} and module_available("triton"):
            failure = import_failure("triton")
            if failure is None:
                return "triton"
            _warn_fallback(operation, failure)
        return "torch"
    reason = triton_unavailable_reason(tensors) if backend == "triton" else extra_backends[backend]
    if reason is not None:
        raise RuntimeError(f"{operation}: {reason}")
    return backend


#: When True, Triton wrappers fill freshly allocated outputs with NaN so that tests catch any element a
#: kernel forgot to write. Off in normal use (``torch.empty`` costs nothing).
poison_outputs = False


def check_index(index: Tensor, name: str, batch: int, limit: int, width: int | None = None) -> None:
    """Before a Triton launch, which reads through ``index`` without bounds checks: an integer (batch, M)
    tensor (M = ``width`` when given) whose values lie in [0, ``limit``). Type and shape errors are raised at
    once; out-of-range values by a device-side assertion (no host synchronisation; on the CPU at once).
    Before, such indices read memory past the input's buffer and returned it as tokens."""
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != batch or (width is not None and index.shape[1] != width):
        wanted = f"({batch}, {'M' if width is None else width})"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(index.shape)}")
    if index.numel():
        torch._assert_async(((index >= 0) & (index < limit)).all(), f"{name} holds values outside [0, {limit})")


def check_shape(value: Tensor | None, name: str, shape: tuple[int, ...]) -> None:
    """A ``ValueError`` unless ``value`` is None or has exactly ``shape`` (a Triton kernel reads it by it)."""
    if value is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate a kernel output: uninitialised, or NaN-filled when ``poison_outputs`` is set."""
    if poison_outputs:  # integers have no NaN: their most negative value, as unlikely a real result
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _FastForwardReferenceBackward(torch.autograd.Function):
    """Forward with a fast kernel; backward by autograd through the PyTorch reference (same math)."""

    @staticmethod
    def forward(ctx, fast, reference, *inputs):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        outputs = fast(*inputs)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable  # the reference runs without a graph of its own: a second
    def backward(ctx, *output_grads):  # derivative is a clear error, not "element 0 ... does not require grad"
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(need)
                for t, need in zip(ctx.saved_tensors, needs, strict=True)
            ]
            outputs = ctx.reference(*leaves)
        differentiable = [
            (out, grad)
            for out, grad in zip(outputs, output_grads, strict=True)
            if out is not None and out.requires_grad and grad is not None
        ]
        wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
        targets = [out for out, _ in differentiable]
        target_grads = [grad for _, grad in differentiable]
        grads = iter(torch.autograd.grad(targets, wanted, target_grads, allow_unused=True))
        return (None, None, *(next(grads) if need else None for need in needs))


def fast_forward_reference_backward(fast, reference, *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """Run ``fast(*inputs)`` (a tuple of tensors); gradients, when needed, come from ``reference``.

    Both callables take the same positional inputs and return tuples of the same structure.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _FastForwardReferenceBackward.apply(fast, reference, *inputs)
    return fast(*inputs)
