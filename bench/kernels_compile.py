"""Compile every Triton kernel ahead of time for NVIDIA targets and report its resource use (no GPU needed).

For each kernel variant (``effvision.kernels.aot_check``) and target (sm_80 = A100, sm_90 = H100/H200):
registers per thread, stack bytes (register spills), shared memory, PTX size, and the occupancy those
registers allow (resident warps per SM out of 64). Writes ``bench/results/kernels-compile.json`` and ``.md``.

This is not a timing: it shows the kernels lower through the real compiler and where register pressure
limits occupancy, which is what a GPU session should look at first.

    python bench/kernels_compile.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from effvision.kernels import aot_check

from effvision.io_utils import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps per SM the register file allows (registers are allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps


def variants() -> list[aot_check.KernelVariant]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out += aot_check.token_variants(dtype, channels=384)
        out += aot_check.token_variants(dtype, channels=768)
    for dtype in (torch.float32, torch.bfloat16):
        out += aot_check.scan_variants(dtype, full=True)
        out += aot_check.scan_variants(dtype, full=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels-compile")
    args = parser.parse_args()
    import triton

    rows = []
    for variant in variants():
        for arch in args.arch:
            compiled = aot_check.compile_variant(variant, arch)
            rows.append(dict(
                kernel=variant.name, arch=f"sm_{arch}", num_warps=variant.num_warps,
                registers=compiled.registers, stack_bytes=compiled.spilled_bytes,
                shared_bytes=compiled.shared_bytes, ptx_lines=compiled.ptx_lines,
                resident_warps=resident_warps(compiled.registers, variant.num_warps),
            ))
            print(rows[-1])
    report = dict(triton=triton.__version__, torch=torch.__version__, command="python bench/kernels_compile.py",
                  rows=rows)
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)", "",
        f"Triton {triton.__version__} (its bundled ptxas), torch {torch.__version__}. Command: "
        f"`{report['command']}`. These are compiler outputs, not timings: no GPU was lent to this task.", "",
        "Token kernels are specialised for DeiT-S (C=384) / ViT-B (C=768) with 197 tokens; scan kernels for "
        "(B, D, L, N) = (8, 1536, 4096, 16) with the default tiles (forward 4 channels x 64 steps, backward "
        "2 channels x 64 steps, 16 channel blocks per backward program). stack = bytes of stack frame "
        "(register spills); warps/SM = resident warps the registers allow, of 64.", "",
        "| kernel | arch | warps | registers | stack B | shared B | PTX lines | warps/SM |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {r['ptx_lines']} | {r['resident_warps']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", "\n".join(lines) + "\n")):
        atomic_write_bytes(args.out.with_suffix(suffix), text.encode(), force=True)
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
