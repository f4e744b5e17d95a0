"""Ahead-of-time compile of every Triton kernel for real NVIDIA targets, without a GPU.

The interpreter tests (test_kernels_triton.py) check the kernels' arithmetic but bypass the compiler;
these compile each kernel variant the token policies and the scan launch down to a cubin with the
``ptxas`` shipped in the Triton wheel, and check the result fits the hardware (no register spills to
local memory, shared memory within the per-block limit).
"""

import pytest
import torch

pytest.importorskip("triton")
from effvision.kernels import aot_check  # noqa: E402

#: sm_80 = A100, sm_90 = H100/H200.
ARCHES = [80, 90]
SHARED_MEMORY_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90 (sm_80: 163 KiB, both well above)


def _variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        variants += aot_check.token_variants(dtype, channels=384 if dtype == torch.float32 else 768)
    variants += aot_check.scan_variants(torch.float32, full=True)
    variants += aot_check.scan_variants(torch.bfloat16, full=False, sub_blocks=1)
    variants += aot_check.scan_variants(torch.float16, full=True, sub_blocks=4)
    return variants


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("variant", _variants(), ids=lambda v: v.name)
def test_kernel_compiles_for_cuda_target_without_spills(variant, arch):
    compiled = aot_check.compile_variant(variant, arch)
    assert compiled.ptx_lines > 0
    assert compiled.registers is not None and 0 < compiled.registers <= 255, compiled.resource_line
    assert compiled.spilled_bytes == 0, f"{variant.name} spills on sm_{arch}: {compiled.resource_line}"
    assert compiled.shared_bytes <= SHARED_MEMORY_LIMIT


def test_a_wrong_argument_list_is_reported_by_name():
    variant = aot_check.token_variants()[0]
    broken = aot_check.KernelVariant("broken", variant.kernel, {**variant.args, "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        aot_check.compile_variant(broken)
