"""``effvision finetune DATA --model NAME``: fine-tune a (token-reduced, PEFT) ViT on an ImageFolder dataset."""

from __future__ import annotations

import ast
from pathlib import Path

from effvision.commands import MAX_SEED, int_in
from effvision.errors import UserError

HELP = "fine-tune a timm/effvision model (e.g. sparse_tuning_vit_base_patch16_224) on DATA/train, report val top-1"


def parse_options(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are Python literals (``0.7``, ``(3,6,9)``, ``True``), ``true``/``false``/``none``
    in any case (``freeze=false`` was the string "false", which is true), or plain strings."""
    words = {"true": True, "false": False, "none": None}
    options = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"model option {item!r} is not key=value")
        if text.strip().lower() in words:
            options[key] = words[text.strip().lower()]
            continue
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def add_arguments(parser) -> None:
    parser.add_argument("data", help="dataset folder with train/<class>/<image> and val/<class>/<image>")
    parser.add_argument("--model", required=True, help="registered name, e.g. sparse_tuning_vit_base_patch16_224, "
                        "clca_topk_vit_base_patch16_224 or a plain timm name (full fine-tuning)")
    parser.add_argument("-o", "--output", required=True, help="run folder (config, trainable weights, metrics)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="model/method option, repeatable: keep_rate=0.7, bottleneck=64, carriers=2, img_size=160")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    weights.add_argument("--checkpoint", help="start from a local base-model weight file (.pth/.safetensors)")
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="default 0.05")
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="default 0")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="default 0")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output after its last epoch, with the same options as the run")
    parser.add_argument("--minutes", type=float, help="stop after this many minutes of wall time, keeping the last "
                        "complete epoch (--resume continues; the unfinished epoch is trained again)")


def run(args) -> int:
    from effvision.finetune.loop import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        # resolved: the run folder is evaluated and resumed from other working directories too
        data=str(Path(args.data).resolve()), model=args.model, model_kwargs=parse_options(args.option),
        pretrained=args.pretrained, epochs=args.epochs, batch_size=args.batch_size,
        checkpoint=None if args.checkpoint is None else str(Path(args.checkpoint).resolve()),
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
        workers=args.workers, device=args.device,
    )
    result = run_finetune(config, args.output, resume=args.resume, max_minutes=args.minutes)
    from effvision.training import process_rank

    if process_rank() != 0:  # under torchrun, rank 0 saved the run and reports it
        return 0
    if result["stopped"]:
        done = len(result["history"])
        top1 = "" if result["val_top1"] is None else f"; val top-1 after epoch {done}: {result['val_top1']:.2f}%"
        print(f"stopped by --minutes after {done} of {args.epochs} epochs{top1} (run saved in {args.output}; "
              "continue with --resume)")
        return 0
    print(f"val top-1 {result['val_top1']:.2f}%  (trainable parameters {result['trainable']:,} "
          f"of {result['total']:,}; run saved in {args.output})")
    return 0
