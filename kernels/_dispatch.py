"""Backend selection shared by every kernel's dispatch function.

``auto`` picks Triton for CUDA tensors when Triton is importable and the PyTorch reference otherwise.
An explicitly requested backend that cannot run raises ``RuntimeError`` saying why; an unknown name
raises ``ValueError``. Triton is never imported here (importing it is slow); only its presence is checked.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch
from torch import Tensor


@cache
def module_available(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


def triton_interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _devices(tensors: tuple[Tensor | None, ...]) -> set[str]:
    return {t.device.type for t in tensors if t is not None}


def triton_unavailable_reason(tensors: tuple[Tensor | None, ...]) -> str | None:
    """Why the Triton backend cannot run on ``tensors``, or ``None`` when it can."""
    if not module_available("triton"):
        return "triton backend needs the 'triton' package, which is not installed"
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
            return "triton"
        return "torch"
    reason = triton_unavailable_reason(tensors) if backend == "triton" else extra_backends[backend]
    if reason is not None:
        raise RuntimeError(f"{operation}: {reason}")
    return backend


#: When True, Triton wrappers fill freshly allocated outputs with NaN so that tests catch any element a
#: kernel forgot to write. Off in normal use (``torch.empty`` costs nothing).
poison_outputs = False


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate a kernel output: uninitialised, or NaN-filled when ``poison_outputs`` is set."""
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
