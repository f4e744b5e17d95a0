"""Training-step time and peak memory: full fine-tuning vs adapters only vs Sparse-Tuning, plus GMACs.

Variants (same base ViT, random weights, AdamW, cross-entropy on random labels):

* ``full``: every parameter trains (plain timm model).
* ``adapters``: frozen backbone + Sparse-Tuning's released adapters + head, no token reduction.
* ``sparse_tuning``: frozen backbone + released adapters + head, top-k keep 0.7 at blocks 3, 6, 9.
* ``sparse_tuning_dense``: the same with ``adapter="dense"`` (our reading of the paper's figure).

Memory: each variant runs 3 steps in its own subprocess so numbers do not mix; on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights + optimizer state + activations);
on CPU the growth of the process's peak RSS (``resource.getrusage``) from just before the first
training step to the end (activations, gradients, optimizer state; the weights are already resident
before, so they are excluded). Time: one more subprocess holds all variants and steps them in turn
(round robin), so load from other users of a shared machine hits every variant alike; wall and CPU
time (all threads) per step are reported.

    python bench/finetune.py                                  # CUDA: ViT-B/16 batch 32; CPU: ViT-S/16 batch 4
    python bench/finetune.py --model vit_base_patch16_224 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("full", "adapters", "sparse_tuning", "sparse_tuning_dense")


def build(variant: str, model_name: str, num_classes: int):
    import timm

    import effvision
    from effvision.peft import sparse_tuning

    model = timm.create_model(model_name, num_classes=num_classes)
    if variant == "adapters":
        sparse_tuning(model, reduction="none")
    elif variant == "sparse_tuning":
        sparse_tuning(model, reduction="topk", keep_rate=0.7, layers=(3, 6, 9))
    elif variant == "sparse_tuning_dense":
        sparse_tuning(model, reduction="topk", adapter="dense", keep_rate=0.7, layers=(3, 6, 9))
    info = effvision.reduction_info(model)
    return model, info


def make_step(variant: str, model_name: str, batch: int, device):
    """(one training step, model, trainable params, reduction info) for ``variant``."""
    import torch

    model, info = build(variant, model_name, num_classes=100)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    cuda = device.type == "cuda"

    def step():
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        with amp:
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    return step, model, params, info


def timed(step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads) of one call."""
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(variant: str, model_name: str, batch: int, steps: int, warmup: int, device_name: str) -> dict:
    """Runs in a subprocess: build, train ``warmup + steps`` steps, report time and memory."""
    import torch

    device = torch.device(device_name)
    step, model, params, info = make_step(variant, model_name, batch, device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    samples = [timed(step) for _ in range(warmup + steps)][warmup:]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        memory = "torch.cuda.max_memory_allocated (weights + optimizer + activations)"
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # KiB on Linux
        memory = "peak RSS growth from before the first step (activations + grads + optimizer state)"
    return {
        "variant": variant,
        "isolated_step_ms_median": 1000 * statistics.median(wall for wall, _ in samples),
        "peak_memory_mb": peak_mb,
        "memory_measure": memory,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "gmacs": info["gmacs"],
        "tokens_after": info["tokens_after"],
    }


def measure_interleaved(model_name: str, batch: int, rounds: int, warmup: int, device_name: str) -> dict:
    """Runs in a subprocess: all variants in one process, one step of each per round, so a load change
    on a shared machine hits every variant alike. Returns per-variant wall and CPU step times (ms)."""
    import torch

    device = torch.device(device_name)
    steps = {variant: make_step(variant, model_name, batch, device)[0] for variant in VARIANTS}
    samples = {variant: [] for variant in VARIANTS}
    for index in range(warmup + rounds):
        for variant, step in steps.items():
            sample = timed(step)
            if index >= warmup:
                samples[variant].append(sample)
    return {
        variant: {
            "step_ms_median": 1000 * statistics.median(wall for wall, _ in values),
            "step_ms_all": [1000 * wall for wall, _ in values],
            # CPU time of all threads: the work done, less sensitive to other load than wall time
            "step_cpu_ms_median": 1000 * statistics.median(cpu for _, cpu in values),
        }
        for variant, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="results stem (default bench/results/finetune-<cpu|cuda>)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # subprocess mode: memory of one variant
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)  # subprocess: timing
    args = parser.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("vit_base_patch16_224" if device == "cuda" else "vit_small_patch16_224")
    batch = args.batch or (32 if device == "cuda" else 4)
    if args.variant or args.interleaved:
        torch.set_num_threads(args.threads)
        if args.variant:
            print(json.dumps(measure(args.variant, model, batch, 2, 1, device)))
        else:
            print(json.dumps(measure_interleaved(model, batch, args.steps, args.warmup, device)))
        return

    def subprocess_json(*mode: str) -> dict:
        command = [sys.executable, __file__, *mode, "--model", model, "--batch", str(batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = []
    for variant in VARIANTS:
        results.append(subprocess_json("--variant", variant))
        print(f"{variant}: peak memory {results[-1]['peak_memory_mb']:.0f} MB", flush=True)
    timing = subprocess_json("--interleaved")
    for result in results:
        result.update(timing[result["variant"]])

    base_gmacs = build("full", model, 100)[1]["gmacs"]
    full = results[0]
    for result in results:
        result["time_vs_full"] = result["step_ms_median"] / full["step_ms_median"]
        result["cpu_time_vs_full"] = result["step_cpu_ms_median"] / full["step_cpu_ms_median"]
        result["memory_vs_full"] = result["peak_memory_mb"] / full["peak_memory_mb"]
        result["gmacs_vs_base"] = result["gmacs"] / base_gmacs
    device_text = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{os.cpu_count()} cores (shared machine), {args.threads} threads"
    report = {"model": model, "batch": batch, "steps": args.steps, "warmup": args.warmup, "device": device_text,
              "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "results": results}
    stem = Path(args.out or Path(__file__).parent / "results" / f"finetune-{'cuda' if device == 'cuda' else 'cpu'}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Fine-tuning step cost: {model}, batch {batch}",
        "",
        f"Device: {device_text}; torch {torch.__version__}. Command: `python {report['command']}`.",
        f"Step time: median of {args.steps} rounds after {args.warmup} warm-up rounds, the variants stepping "
        "in turn in one process (AdamW, random data, random weights).",
        f"Memory: one subprocess per variant (3 steps), {results[0]['memory_measure']}.",
        "",
        "| variant | step wall (ms) | x full | step CPU (ms) | x full | peak memory (MB) | x full | trainable params "
        "| GMACs | x base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['variant']} | {r['step_ms_median']:.1f} | {r['time_vs_full']:.2f} | "
                     f"{r['step_cpu_ms_median']:.1f} | {r['cpu_time_vs_full']:.2f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['memory_vs_full']:.2f} | {r['trainable_params']:,} | "
                     f"{r['gmacs']:.2f} | {r['gmacs_vs_base']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
