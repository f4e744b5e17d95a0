"""Ahead-of-time compile of the Triton kernels for a CUDA target, on a machine without a GPU.

The ``TRITON_INTERPRET=1`` tests check the kernels' arithmetic, but the interpreter runs them as NumPy and
skips everything the real compiler does (layouts, register allocation, PTX). This module drives
``triton.compile`` down to a cubin for an explicit ``GPUTarget`` (e.g. sm_90 for the H100), using the
``ptxas`` that ships inside the Triton wheel, so the kernels are known to compile, and their register,
spill and shared-memory use can be read, with no CUDA driver present.

Each kernel variant is a :class:`KernelVariant`: the kernel's arguments by name, given the way they
would be passed at a launch (a dtype stands for a tensor of that dtype, an int for a runtime integer,
``None`` for an absent optional pointer, constexpr values as they are). Pointers get the 16-byte
alignment hint the JIT derives from torch allocations.

Triton is imported lazily (only when a variant is compiled), so importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

#: Triton's short names of the pointer element types used by the kernels.
_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}


@dataclass(frozen=True)
class KernelVariant:
    """One specialisation of a kernel: ``args`` maps every argument name to its launch value."""

    name: str
    kernel: Any  # a triton.runtime.jit.JITFunction
    args: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class CompiledKernel:
    """What the compiler produced for one variant on one target."""

    name: str
    arch: int
    registers: int | None
    spilled_bytes: int | None
    shared_bytes: int
    ptx_lines: int
    resource_line: str = field(default="", repr=False)


def _signature(variant: KernelVariant) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
    kernel = variant.kernel
    missing = set(kernel.arg_names) - set(variant.args)
    extra = set(variant.args) - set(kernel.arg_names)
    if missing or extra:
        raise ValueError(f"{variant.name}: arguments missing {sorted(missing)}, unknown {sorted(extra)}")
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(kernel.arg_names):
        value = variant.args[name]
        if name in constexpr_names or value is None:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.dtype):
            signature[name] = "*" + _TRITON_TYPE[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            raise TypeError(f"{variant.name}: cannot type argument {name}={value!r}")
    return signature, constants, attrs


def _resource_usage(cubin: bytes) -> str:
    """``cuobjdump -res-usage`` output for a cubin, using the binary shipped with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or ""
    if not tool:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        result = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=False)
    return result.stdout


def compile_variant(variant: KernelVariant, arch: int = 90) -> CompiledKernel:
    """Compile ``variant`` to a cubin for ``sm_<arch>``; raises whatever the compiler raises on failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = _signature(variant)
    source = ASTSource(variant.kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
    usage = _resource_usage(compiled.asm["cubin"])
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return CompiledKernel(
        name=variant.name,
        arch=arch,
        registers=int(registers.group(1)) if registers else None,
        spilled_bytes=int(stack.group(1)) if stack else None,
        shared_bytes=int(compiled.metadata.shared),
        ptx_lines=compiled.asm["ptx"].count("\n"),
        resource_line=usage.strip().splitlines()[-1] if usage.strip() else "",
    )


def scan_variants(dtype: torch.dtype = torch.float32, full: bool = True, sub_blocks: int = 16) -> list[KernelVariant]:
    """Forward and backward scan kernels with the default tiles (all options on, or none), shaped as at
    (8, 1536, 4096) with N=16; ``sub_blocks=16`` is what the backward picks there on a 132-SM H100."""
    from . import _selective_scan_triton as scan

    config = scan.DEFAULT_CONFIG
    opt = dtype if full else None
    flags = {"HAS_D": full, "HAS_Z": full, "HAS_BIAS": full, "SOFTPLUS": full}
    tiles = {"BLOCK_N": 16, "CHUNK": config.chunk}
    sizes = {"dim": 1536, "length": 4096, "state": 16, "per_group": 1536, "groups": 1, "n_chunks": 64}
    common = {
        "u_ptr": dtype, "delta_ptr": dtype, "A_ptr": torch.float32, "B_ptr": dtype, "C_ptr": dtype,
        "D_ptr": torch.float32 if full else None, "z_ptr": opt, "bias_ptr": torch.float32 if full else None,
    }
    tag = f"{str(dtype).removeprefix('torch.')}{'-all-options' if full else ''}"
    forward = KernelVariant(
        f"scan_forward[{tag}]", scan._scan_forward_kernel,
        {**common, "out_ptr": dtype, "states_ptr": torch.float32, **sizes, **flags,
         "STORE_ALL_STATES": True, "BLOCK_D": config.block_d, **tiles},
        num_warps=config.num_warps,
    )
    backward = KernelVariant(
        f"scan_backward[{tag}]", scan._scan_backward_kernel,
        {**common, "dout_ptr": dtype, "states_ptr": torch.float32,
         "du_ptr": dtype, "ddelta_ptr": dtype, "dz_ptr": opt, "dA_ptr": torch.float32,
         "dD_ptr": torch.float32 if full else None, "dbias_ptr": torch.float32 if full else None,
         "dB_ptr": torch.float32, "dC_ptr": torch.float32, "dh_ptr": torch.float32,
         **sizes, "n_programs": 1536 // (config.backward_block_d * sub_blocks), **flags,
         "SUB_BLOCKS": sub_blocks, "BLOCK_D": config.backward_block_d, **tiles},
        num_warps=config.num_warps,
    )
    return [forward, backward]


def token_variants(dtype: torch.dtype = torch.float32, channels: int = 384) -> list[KernelVariant]:
    """Gather, weighted merge and size-weighted merge, specialised as the token policies launch them."""
    from . import _token_gather_triton as gather
    from . import _token_merge_triton as merge

    tag = f"{str(dtype).removeprefix('torch.')},C={channels}"
    block_c = min(1 << (channels - 1).bit_length(), merge.MAX_BLOCK_C)
    merge_common = {
        "x_ptr": dtype, "keep_ptr": torch.int64, "src_ptr": torch.int64, "bounds_ptr": torch.int64,
        "out_ptr": dtype, "n_tokens": 197, "n_out": 184, "n_src": 13, "channels": channels,
        "HAS_SRC": True, "BLOCK_C": block_c,
    }
    return [
        KernelVariant(
            f"token_gather[{tag}]", gather._gather_kernel,
            {"x_ptr": dtype, "index_ptr": torch.int64, "size_ptr": torch.float32, "source_ptr": torch.float32,
             "x_out_ptr": dtype, "size_out_ptr": torch.float32, "source_out_ptr": torch.float32,
             "n_tokens": 197, "n_out": 148, "channels": channels, "source_width": 197,
             "HAS_SIZE": True, "HAS_SOURCE": True, "BLOCK": min(1 << (channels - 1).bit_length(), gather.MAX_BLOCK)},
        ),
        KernelVariant(
            f"token_merge_weighted[{tag}]", merge._merge_kernel,
            {**merge_common, "keep_weight_ptr": dtype, "src_weight_ptr": dtype, "size_ptr": None,
             "out_size_ptr": None, "HAS_KEEP_WEIGHT": True, "HAS_SRC_WEIGHT": True, "SIZE_WEIGHTED": False},
            num_warps=merge.NUM_WARPS,
        ),
        KernelVariant(
            f"token_merge_size_weighted[{tag}]", merge._merge_kernel,
            {**merge_common, "keep_weight_ptr": None, "src_weight_ptr": None, "size_ptr": torch.float32,
             "out_size_ptr": torch.float32, "HAS_KEEP_WEIGHT": False, "HAS_SRC_WEIGHT": False, "SIZE_WEIGHTED": True},
            num_warps=merge.NUM_WARPS,
        ),
    ]
