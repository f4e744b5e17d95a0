"""``effvision evaluate RUN``: top-1 of a saved fine-tuning run on its (or another) val split."""

from __future__ import annotations

HELP = "evaluate a saved fine-tuning run (top-1 on DATA/val)"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="run folder written by `effvision finetune`")
    parser.add_argument("--data", help="dataset folder (default: the run's own)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args) -> int:
    from effvision.finetune.loop import evaluate_run

    top1 = evaluate_run(args.run_dir, data=args.data, batch_size=args.batch_size, device=args.device)
    print(f"val top-1 {top1:.2f}%")
    return 0
