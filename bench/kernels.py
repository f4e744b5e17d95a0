"""Benchmark the effvision kernels against their PyTorch paths and the memory-bandwidth floor.

CUDA (``python bench/kernels.py --device cuda``): ``triton.testing.do_bench`` medians of the Triton
kernels vs the PyTorch reference path (and mamba-ssm when installed) at DeiT-S / ViT-B token counts and
Mamba / VMamba scan shapes, the bandwidth floor (bytes a kernel must move / measured copy bandwidth of
a large ``clone``), and the relative error vs the reference at those sizes. Writes
``bench/results/kernels-<gpu name>.json`` and ``.md``.

CPU (``python bench/kernels.py --device cpu``): wall-clock medians of the scan reference vs naive
loops and of the torch merge/gather paths. Writes ``bench/results/kernels-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from effvision.kernels import (
    gather_tokens,
    merge_tokens,
    selective_scan,
    selective_scan_ref,
    size_weighted_merge,
)

from effvision.io_utils import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN_SHAPES = [  # (name, batch, tokens, channels, r)
    ("DeiT-S", 256, 197, 384, 50),
    ("ViT-B", 256, 197, 768, 50),
]
SCAN_SHAPES_CUDA = [  # (batch, dim, length, state, groups)
    (8, 1536, 4096, 16, 1),
    (1, 512, 64 * 64 * 4, 16, 1),
    (2, 1536, 64 * 64, 16, 4),
]
SCAN_SHAPES_CPU = [(1, 192, 1024, 16, 4), (1, 192, 4096, 16, 4)]
NAIVE_SCAN_SHAPE_CPU = (1, 64, 1024, 16, 1)


def bipartite_merge_indices(batch: int, tokens: int, r: int, device) -> tuple[torch.Tensor, ...]:
    """ToMe-like indices: CLS + set B + unmerged set A are kept; r tokens of set A merge into set B."""
    a_set = torch.arange(1, tokens, 2, device=device)
    b_set = torch.arange(2, tokens, 2, device=device)
    order = torch.argsort(torch.rand(batch, a_set.numel(), device=device), dim=1)
    src = a_set[order[:, :r]]
    unmerged = a_set[order[:, r:]]
    cls = torch.zeros(batch, 1, dtype=torch.long, device=device)
    keep = torch.cat([cls, b_set.expand(batch, -1), unmerged], dim=1)
    dst = torch.randint(1, 1 + b_set.numel(), (batch, r), device=device)  # positions of set B in keep
    return keep, src, dst


def token_operations(x, size, keep, src, dst) -> dict[str, Callable[[str], object]]:
    """Each token operation as a function of the backend name."""
    return {
        "size_weighted_merge": lambda backend: size_weighted_merge(x, size, keep, src, dst, backend=backend),
        "merge_tokens": lambda backend: merge_tokens(x, keep, src, dst, backend=backend),
        "gather_tokens": lambda backend: gather_tokens(x, keep, size, backend=backend),
    }


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB clone (read + write), timed with do_bench."""
    from triton.testing import do_bench

    big = torch.empty(1 << 28, dtype=torch.float32, device=device)
    return 2 * big.numel() * 4 / (do_bench(big.clone) * 1e-3)


def cpu_median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def scan_inputs(batch, dim, length, state, groups, dtype, device, requires_grad=False):
    bc_shape = (batch, state, length) if groups == 1 else (batch, groups, state, length)

    def make(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_(requires_grad)

    return dict(
        u=make(batch, dim, length), delta=make(batch, dim, length, scale=0.5),
        A=(-torch.rand(dim, state, device=device) * 4 - 0.5).requires_grad_(requires_grad),
        B=make(*bc_shape), C=make(*bc_shape), D=make(dim, dt=torch.float32), z=make(batch, dim, length),
        delta_bias=make(dim, scale=0.1, dt=torch.float32),
    )


def positive_steps(inputs: dict) -> dict:
    """u, softplus(delta), A, B, C: the option-free inputs the naive loops take (dt > 0 keeps them stable)."""
    return dict(u=inputs["u"], delta=torch.nn.functional.softplus(inputs["delta"]), A=inputs["A"],
                B=inputs["B"], C=inputs["C"])


def naive_channel_loop_scan(u, delta, A, B, C, **_):
    """What the reference avoids: a Python loop over channels and time (vectorised over batch, state)."""
    batch, dim, length = u.shape
    out = torch.empty(batch, dim, length)
    for d in range(dim):
        h = torch.zeros(batch, A.shape[1])
        for t in range(length):
            dt = delta[:, d, t, None]
            h = torch.exp(dt * A[d]) * h + dt * B[:, :, t] * u[:, d, t, None]
            out[:, d, t] = (h * C[:, :, t]).sum(-1)
    return out


def materialised_scan(u, delta, A, B, C, **_):
    """Per-step loop vectorised over batch/dim/state with exp(dt*A) materialised for the whole sequence."""
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))
    drive = torch.einsum("bdl,bnl->lbdn", delta * u, B)
    h = torch.zeros_like(decay[0])
    ys = []
    for t in range(u.shape[-1]):
        h = decay[t] * h + drive[t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def bench_cpu(repeats: int) -> dict:
    torch.manual_seed(0)
    results = {"scan": [], "tokens": []}
    for batch, dim, length, state, groups in SCAN_SHAPES_CPU:
        x = scan_inputs(batch, dim, length, state, groups, torch.float32, "cpu")
        ms = cpu_median_ms(lambda x=x: selective_scan_ref(**x, delta_softplus=True), repeats)
        results["scan"].append(dict(shape=[batch, dim, length, state, groups], path="reference (chunked)", ms=ms))
        plain = positive_steps(x)
        plain["B"], plain["C"] = x["B"][:, 0], x["C"][:, 0]
        ms_ref = cpu_median_ms(lambda p=plain: selective_scan_ref(**p), repeats)
        ms_mat = cpu_median_ms(lambda p=plain: materialised_scan(**p), repeats)
        ungrouped = [batch, dim, length, state, 1]
        results["scan"].append(dict(shape=ungrouped, path="reference, no options", ms=ms_ref))
        results["scan"].append(dict(shape=ungrouped, path="materialised per-step loop", ms=ms_mat))
    batch, dim, length, state, _ = NAIVE_SCAN_SHAPE_CPU
    x = scan_inputs(batch, dim, length, state, 1, torch.float32, "cpu")
    plain = positive_steps(x)
    naive_ms = cpu_median_ms(lambda: naive_channel_loop_scan(**plain), max(1, repeats // 3))
    ref_ms = cpu_median_ms(lambda: selective_scan_ref(**plain), repeats)
    error = relative_error(selective_scan_ref(**plain), naive_channel_loop_scan(**plain))
    results["scan"].append(dict(shape=list(NAIVE_SCAN_SHAPE_CPU), path="naive channel x time loop", ms=naive_ms))
    results["scan"].append(dict(shape=list(NAIVE_SCAN_SHAPE_CPU), path="reference (chunked)", ms=ref_ms,
                                relative_error_vs_naive=error))
    for name, batch, tokens, channels, r in TOKEN_SHAPES:
        x = torch.randn(batch, tokens, channels)
        size = torch.ones(batch, tokens)
        keep, src, dst = bipartite_merge_indices(batch, tokens, r, "cpu")
        for op, run in token_operations(x, size, keep, src, dst).items():
            ms = cpu_median_ms(partial(run, "torch"), repeats)
            results["tokens"].append(dict(model=name, shape=[batch, tokens, channels, r], op=op, path="torch",
                                          dtype="float32", ms=ms))
    return results


def bench_cuda(dtype: torch.dtype) -> dict:
    import triton
    from triton.testing import do_bench


    device = "cuda"
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    element = torch.finfo(dtype).bits // 8
    results = {"copy_bandwidth_GBps": bandwidth / 1e9, "tokens": [], "scan": []}

    def record(kind, entry, ms, floor_bytes):
        floor_ms = floor_bytes / bandwidth * 1e3
        entry.update(ms=ms, floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
        results[kind].append(entry)

    for name, batch, tokens, channels, r in TOKEN_SHAPES:
        x = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
        size = torch.ones(batch, tokens, device=device, dtype=dtype)
        keep, src, dst = bipartite_merge_indices(batch, tokens, r, device)
        kept = keep.shape[1]
        merge_bytes = batch * (tokens + kept) * channels * element
        gather_bytes = 2 * batch * kept * channels * element
        floor_bytes = {"size_weighted_merge": merge_bytes, "merge_tokens": merge_bytes, "gather_tokens": gather_bytes}
        for op, run in token_operations(x, size, keep, src, dst).items():
            outputs = {backend: run(backend) for backend in ("torch", "triton")}
            error = relative_error(_first(outputs["triton"]), _first(outputs["torch"]))
            for backend in ("torch", "triton"):
                entry = dict(model=name, shape=[batch, tokens, channels, r], op=op, path=backend,
                             dtype=str(dtype), relative_error_vs_torch=error)
                record("tokens", entry, do_bench(partial(run, backend)), floor_bytes[op])

    for batch, dim, length, state, groups in SCAN_SHAPES_CUDA:
        x = scan_inputs(batch, dim, length, state, groups, dtype, device, requires_grad=True)
        bc = batch * groups * state * length * element
        per_channel = batch * dim * length * element
        n_chunks = triton.cdiv(length, 64)
        states = batch * dim * n_chunks * state * 4
        forward_bytes = 4 * per_channel + 2 * bc  # u, delta, z in; out
        backward_bytes = 7 * per_channel + 4 * bc + states  # u, delta, z, dout in; du, ddelta, dz; B, C, dB, dC
        backends = ["triton", "torch"] + (["mamba_ssm"] if _has_mamba_ssm() else [])
        shape = [batch, dim, length, state, groups]
        reference = selective_scan(**x, delta_softplus=True, backend="torch").detach().float()
        leaves = list(x.values())
        for backend in backends:
            run = partial(selective_scan, **x, delta_softplus=True, backend=backend)
            out = run()
            entry = dict(shape=shape, path=backend, pass_="forward", dtype=str(dtype),
                         relative_error_vs_torch=relative_error(out, reference))
            repeat_ms = 20 if backend == "torch" else 200
            record("scan", entry, do_bench(run, rep=repeat_ms), forward_bytes)
            backward = partial(torch.autograd.grad, out, leaves, torch.randn_like(out), retain_graph=True)
            record("scan", dict(shape=shape, path=backend, pass_="backward", dtype=str(dtype)),
                   do_bench(backward, rep=repeat_ms), backward_bytes)
            del out, backward
            torch.cuda.empty_cache()
    results["scan_configs"] = sweep_scan_configs(SCAN_SHAPES_CUDA[0], dtype, device, lambda fn: do_bench(fn, rep=100))
    return results


#: (block_d, chunk, num_warps, backward_block_d) tile configs timed on the first CUDA scan shape.
SCAN_CONFIG_SWEEP = [(4, 64, 8, 2), (2, 64, 4, 2), (4, 32, 4, 2), (8, 32, 8, 4), (2, 32, 2, 1), (4, 128, 8, 2)]


def sweep_scan_configs(shape, dtype, device, timer: Callable[[Callable[[], object]], float]) -> list[dict]:
    """Forward and backward time of the Triton scan under each ``SCAN_CONFIG_SWEEP`` tile config."""
    from effvision.kernels._selective_scan_triton import ScanConfig, selective_scan_triton

    inputs = scan_inputs(*shape, dtype, device, requires_grad=True)
    B, C = inputs["B"], inputs["C"]
    if shape[-1] == 1:  # ungrouped B/C as the kernel takes them
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    args = (inputs["u"], inputs["delta"], inputs["A"], B, C, inputs["D"], inputs["z"], inputs["delta_bias"], True)
    leaves = [inputs[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    rows = []
    for block_d, chunk, num_warps, backward_block_d in SCAN_CONFIG_SWEEP:
        config = ScanConfig(block_d=block_d, chunk=chunk, num_warps=num_warps, backward_block_d=backward_block_d)
        out, _ = selective_scan_triton(*args, config)
        grad = torch.randn_like(out)
        forward_ms = timer(lambda config=config: selective_scan_triton(*args, config))
        backward_ms = timer(lambda out=out, grad=grad: torch.autograd.grad(out, leaves, grad, retain_graph=True))
        rows.append(dict(shape=list(shape), block_d=block_d, chunk=chunk, num_warps=num_warps,
                         backward_block_d=backward_block_d, forward_ms=forward_ms, backward_ms=backward_ms))
        del out, grad
    return rows


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _has_mamba_ssm() -> bool:
    from effvision.kernels import _dispatch

    return _dispatch.module_available("mamba_ssm")


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; shared machine (other jobs running)")


def to_markdown(report: dict) -> str:
    lines = [f"# Kernel benchmark ({report['device_name']})", "", f"Machine: {report['machine']}", "",
             f"Command: `{report['command']}`", ""]
    lines += [note for note in report.get("notes", [])] + [""]
    if "copy_bandwidth_GBps" in report:
        lines += [f"Measured copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s", ""]
    lines += ["## Token gather / merge", "", "| model | (B, N, C, r) | op | path | dtype | ms | floor ms | "
              "floor/ms | rel. err |", "|---|---|---|---|---|---|---|---|---|"]
    for e in report["tokens"]:
        lines.append(f"| {e['model']} | {tuple(e['shape'])} | {e['op']} | {e['path']} | {e['dtype']} | "
                     f"{e['ms']:.3f} | {_fmt(e.get('floor_ms'))} | {_fmt(e.get('fraction_of_floor'))} | "
                     f"{_fmt(e.get('relative_error_vs_torch'), '.1e')} |")
    lines += ["", "## Selective scan", "", "| (B, D, L, N, G) | path | pass | ms | floor ms | floor/ms | rel. err |",
              "|---|---|---|---|---|---|---|"]
    for e in report["scan"]:
        error = e.get("relative_error_vs_torch", e.get("relative_error_vs_naive"))
        lines.append(f"| {tuple(e['shape'])} | {e['path']} | {e.get('pass_', 'forward')} | {e['ms']:.1f} | "
                     f"{_fmt(e.get('floor_ms'))} | {_fmt(e.get('fraction_of_floor'))} | {_fmt(error, '.1e')} |")
    if report.get("scan_configs"):
        lines += ["", "## Scan tile configs (Triton, first scan shape)", "",
                  "| (B, D, L, N, G) | block_d | chunk | warps | backward block_d | forward ms | backward ms |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["scan_configs"]:
            lines.append(f"| {tuple(e['shape'])} | {e['block_d']} | {e['chunk']} | {e['num_warps']} | "
                         f"{e['backward_block_d']} | {e['forward_ms']:.3f} | {e['backward_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="input dtype on CUDA (the CPU runs are float32)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (median reported)")
    args = parser.parse_args()
    options = {"device": args.device, **({"dtype": args.dtype} if args.device == "cuda" else {"repeats": args.repeats})}
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python bench/kernels.py " + " ".join(
        f"--{k} {v}" for k, v in options.items()
    )
    if args.device == "cuda":
        results = bench_cuda(getattr(torch, args.dtype))
        device_name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        notes = ["Times are `triton.testing.do_bench` medians. floor = bytes the kernel must move / copy "
                 "bandwidth; floor/ms = fraction of that floor reached (1.0 = at the floor)."]
    else:
        results = bench_cpu(args.repeats)
        device_name = "cpu"
        notes = ["Wall-clock medians on the CPU; the Triton kernels are not timed here (they need a GPU).",
                 "**No GPU numbers exist yet: no GPU was lent to this task.** Run "
                 "`python bench/kernels.py --device cuda` on a CUDA machine to write kernels-<gpu>.json."]
    report = dict(device_name=device_name, machine=machine_description(args.device), command=command,
                  notes=notes, **results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS / f"kernels-{device_name}.json", (json.dumps(report, indent=2) + "\n").encode(),
                       force=True)
    atomic_write_bytes(RESULTS / f"kernels-{device_name}.md", to_markdown(report).encode(), force=True)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
