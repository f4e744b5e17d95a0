"""``effvision train-codec``: train a MambaIC codec on a folder of images (random crops)."""

from __future__ import annotations

from pathlib import Path

from effvision.commands import MAX_SEED, int_in

HELP = "train a MambaIC learned codec on a folder of images (random crops; torchrun for several processes)"


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder of training images")
    parser.add_argument("--val-data", type=Path, help="folder of validation images (whole images)")
    parser.add_argument("--config", default="lite", help="model config: lite, wide, wide160 (lite with 100 / 160 "
                        "latent channels) or paper (the released 124M-parameter config); default lite")
    parser.add_argument("--lambda", dest="lmbda", type=float, default=0.0130,
                        help="rate-distortion trade-off (default 0.013)")
    parser.add_argument("--metric", choices=("mse", "ms-ssim"), default="mse", help="distortion term")
    parser.add_argument("--steps", type=int, default=10000, help="training steps (default 10000)")
    parser.add_argument("--batch-size", type=int, default=8, help="crops a step (default 8)")
    parser.add_argument("--crop", type=int, default=256, help="square crop side in pixels (default 256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--final-lr", type=float, help="cosine decay of the learning rate to this at --steps "
                        "(default: constant)")
    parser.add_argument("--val-every", type=int, default=500, help="steps between validations (default 500)")
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--out", type=Path, default=Path("runs/mambaic"), help="output folder (default runs/mambaic)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--force", action="store_true", help="start a new run in OUT, replacing the run there")
    parser.add_argument("--init", type=Path, help="start from this MambaIC safetensors checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    parser.add_argument("--no-amp", action="store_true", help="disable bfloat16 autocast on CUDA")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    parser.add_argument("--minutes", type=float, help="stop after this many minutes of wall time, writing the "
                        "checkpoint and model as at the last step (--resume continues)")


def run(args) -> int:
    import math

    import torch

    from effvision.bounded_config import check_memory_fits
    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.mambaic.model import CONFIGS, MambaIC
    from effvision.codecs.mambaic.train import TrainSettings, train
    from effvision.errors import UserError
    from effvision.training import check_training_options, load_image_folder

    if args.config not in CONFIGS:
        raise UserError(f"unknown config {args.config!r}; choose from {', '.join(CONFIGS)}")
    check_training_options(steps=args.steps, batch_size=args.batch_size, lr=args.lr, crop=args.crop,
                           minutes=args.minutes)
    if not (math.isfinite(args.lmbda) and args.lmbda > 0):
        raise UserError(f"--lambda must be a finite number > 0, got {args.lmbda}")
    if args.final_lr is not None and not 0 <= args.final_lr <= args.lr:
        raise UserError("--final-lr must be between 0 and --lr")
    for name in ("val_every", "save_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    _check_output_folder(args.out, args.resume, args.force)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        on_cpu = torch.device(device).type == "cpu"  # the estimates are of CPU float32 runs, against this machine
    except RuntimeError as error:
        raise UserError(f"--device {device!r} is not a device ({error})") from None
    with torch.device("meta"):  # the config's size, for the memory estimates below
        sized = MambaIC(args.config)
    if on_cpu:
        check_memory_fits(sized.training_memory_bytes(args.batch_size, args.crop),
                          f"a training step on {args.batch_size} crops of {args.crop} px", share=2)
    train_images = load_image_folder(args.data)
    small = sum(min(image.shape[-2:]) < args.crop for image in train_images)
    if small:  # random_crops pads them by repeating their edges
        print(f"note: {small} of {len(train_images)} training images are smaller than --crop {args.crop} on a side; "
              "their crops are padded by repeating the edge pixels")
    val_images = load_image_folder(args.val_data) if args.val_data else []
    if val_images and on_cpu:  # validated whole, one image at a time, after the first steps: check now
        largest = max(val_images, key=lambda image: image.shape[-2] * image.shape[-1])
        check_memory_fits(sized.decode_memory_bytes(tuple(largest.shape[-2:])),
                          f"validating a whole {largest.shape[-1]}x{largest.shape[-2]} image (crop the --val-data "
                          "images)", share=2)
    torch.manual_seed(args.seed)
    model = load_checkpoint(args.init, expected_config=args.config) if args.init else MambaIC(args.config)
    settings = TrainSettings(
        lmbda=args.lmbda, metric=args.metric, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
        lr=args.lr, final_lr=args.final_lr, val_every=args.val_every, save_every=args.save_every, seed=args.seed,
        amp=not args.no_amp, max_seconds=None if args.minutes is None else 60 * args.minutes,
    )
    _start_output_folder(args.out, args.force)
    history = train(model, train_images, settings, out_dir=args.out, val_images=val_images, resume=args.resume,
                    device=device)
    from effvision.training import process_rank

    if process_rank() != 0:  # under torchrun, rank 0 wrote the files and says so
        return 0
    if history and history[-1]["step"] < args.steps:
        print(f"stopped by --minutes at step {history[-1]['step']} of {args.steps}; continue with --resume")
    print(f"wrote {args.out / 'model.safetensors'}")
    return 0


def _check_output_folder(out: Path, resume: bool, force: bool) -> None:
    """Before any work: OUT must be a folder (or not exist yet), and a run there is continued with --resume or
    replaced with --force, never overwritten by accident."""
    from effvision.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    held = [name for name in ("train_state.pt", "model.safetensors") if (out / name).exists()]
    if held and not (resume or force):
        raise UserError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue it or --force to "
                        "start over")
    if resume and force:
        raise UserError("--resume continues the run in --out and --force replaces it: pass one of them")
    if resume and not (out / "train_state.pt").exists():  # it started from scratch without a word
        raise UserError(f"--resume: there is no {out / 'train_state.pt'} to continue; drop --resume to start a run")


def _start_output_folder(out: Path, force: bool) -> None:
    """Just before training: OUT can be written (checked now, not at the first checkpoint), and with --force the
    old run's files are gone (a new run stopped before its first checkpoint left the old train_state.pt, which a
    later --resume continued)."""
    from effvision.io_utils import check_writable_folder

    check_writable_folder(out)
    if force:
        for name in ("train_state.pt", "model.safetensors"):
            (out / name).unlink(missing_ok=True)
