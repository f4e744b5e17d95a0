"""``effvision train-vqgan``: train or fine-tune a VQGAN codec, optionally with a K-means-clustered codebook.

Examples::

    # Mao et al. (DCC 2024): cluster a taming f16-16384 checkpoint to K=256 and fine-tune codebook + quant convs
    effvision train-vqgan photos/ --init vqgan_imagenet_f16_16384.ckpt --config imagenet-f16-16384 \\
        --k 256 -o k256.safetensors
    # train the small config from scratch
    effvision train-vqgan photos/ --config small-f16-1024 --mode full --steps 2000 -o small.safetensors
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

from effvision.commands import MAX_SEED, int_in
from effvision.errors import UserError

HELP = "train or fine-tune a VQGAN codec (K-means codebook clustering, index model, lost-index restorer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="directory of training images (searched recursively)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output codec (.safetensors)")
    parser.add_argument("--init", type=Path, help="start from a taming .ckpt or an effvision VQGAN .safetensors")
    parser.add_argument("--config", default="small-f16-1024", help="architecture (imagenet-f16-16384, small-f16-1024)")
    parser.add_argument("--k", type=int, help="K-means the codebook into K entries before training")
    parser.add_argument("--mode", choices=["full", "codebook"],
                        help="train everything, or only codebook + quant convs (default: codebook with --init)")
    parser.add_argument("--steps", type=int, default=1000, help="autoencoder steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="crops a step (default 8)")
    parser.add_argument("--crop", type=int, default=256,
                        help="random crop size in pixels (multiple of 16; default 256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--minutes", type=float, help="stop after this many minutes (a checkpoint is written)")
    parser.add_argument("--gan-weight", type=float, default=0.0,
                        help="weight of the hinge PatchGAN loss (taming uses 0.8 with LPIPS; none by default)")
    parser.add_argument("--gan-start", type=int, default=0, help="step at which the GAN loss starts")
    parser.add_argument("--restorer-steps", type=int, default=0, help="also train the lost-index restorer")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint (default: OUTPUT.train.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT (--resume replaces it too)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)


def _initial_codec(args: argparse.Namespace):
    from effvision.codecs.vqgan.config import CONFIGS
    from effvision.codecs.vqgan.model import VQGANCodec

    if args.init is not None and args.init.suffix == ".safetensors":
        return VQGANCodec.load(args.init)
    if args.config not in CONFIGS:
        raise UserError(f"unknown VQGAN config {args.config!r}; choose one of {', '.join(CONFIGS)}")
    codec = VQGANCodec(CONFIGS[args.config])
    if args.init is not None:
        if not args.init.is_file():
            raise UserError(f"checkpoint {args.init} does not exist")
        codec.load_taming_checkpoint(args.init)
    return codec


def run(args: argparse.Namespace) -> int:
    import torch

    from effvision.codecs.vqgan.restoration import IndexRestorer
    from effvision.codecs.vqgan.train import RandomCrops, TrainSettings, train_autoencoder, train_restorer
    from effvision.training import TimeLimit, check_training_options, load_image_folder

    if args.crop < 16 or args.crop % 16:
        raise UserError(f"--crop must be a positive multiple of 16, got {args.crop}")
    check_training_options(steps=args.steps, batch_size=args.batch_size, lr=args.lr, crop=args.crop,
                           minutes=args.minutes, min_steps=0)
    if not (math.isfinite(args.gan_weight) and args.gan_weight >= 0):
        raise UserError(f"--gan-weight must be a finite number >= 0, got {args.gan_weight}")
    for name in ("gan_start", "restorer_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    import os

    from effvision.io_utils import check_output_file, check_writable_folder

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank trained the same copy and raced on the same files
        raise UserError("train-vqgan trains in one process; run it without torchrun (train-codec and finetune "
                        "train under torchrun)")
    check_output_file(args.output, args.force or args.resume)  # before the training, which takes hours
    checkpoint = args.checkpoint or args.output.with_suffix(".train.pt")
    restorer_checkpoint = checkpoint.with_suffix(".restorer.pt")
    _check_training_checkpoints(checkpoint, restorer_checkpoint, args)
    torch.manual_seed(args.seed)
    codec = _initial_codec(args)  # before the images are read: a bad config or checkpoint fails at once
    images = load_image_folder(args.data, minimum_side=args.crop, uint8=True)
    if args.k is not None:
        codec = codec.cluster(args.k, seed=args.seed)
        codec.vq = copy.deepcopy(codec.vq)  # fine-tuning must not touch the shared transforms of the source
    mode = args.mode or ("codebook" if args.init is not None or args.k is not None else "full")
    for folder in {args.output.parent, checkpoint.parent}:  # now, not at the first checkpoint or the end
        check_writable_folder(folder)
    if args.force and not args.resume:  # a new run: the old one's states must not be continued by a later --resume
        checkpoint.unlink(missing_ok=True)
        restorer_checkpoint.unlink(missing_ok=True)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mode=mode,
                             restart_dead_every=100 if mode == "full" else 0, max_minutes=args.minutes,
                             gan_weight=args.gan_weight, gan_start=args.gan_start)
    crops = RandomCrops(images, args.crop, seed=args.seed)
    time_limit = TimeLimit(None if args.minutes is None else 60 * args.minutes)
    autoencoder_step = 0
    if args.steps:
        stats = train_autoencoder(codec.vq, crops, settings, checkpoint, resume=args.resume)
        autoencoder_step = stats["step"]
        print(f"autoencoder: step {stats['step']}, L1 {stats['l1']:.4f}, codes used {stats['codes_used']}")
        if stats["step"] < args.steps:
            print(f"stopped by --minutes at autoencoder step {stats['step']} of {args.steps}; continue with --resume")
    tensors = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images]
    codec.fit_index_model(tensors, crop=min(args.crop, 256))
    if args.restorer_steps and autoencoder_step < args.steps:  # it would learn codes that the resumed run changes
        print("the lost-index restorer is trained once the autoencoder has finished (--resume)")
    elif args.restorer_steps:
        if codec.restorer is None:
            codec.restorer = IndexRestorer(codec.config.embed_dim)
        left = None if args.minutes is None else max(0.0, 60 * args.minutes - time_limit.elapsed())
        restored = train_restorer(codec.restorer, codec.reference_maps, codec.vq.quantize.embedding.weight.detach(),
                                  steps=args.restorer_steps, seed=args.seed, checkpoint_path=restorer_checkpoint,
                                  resume=args.resume, max_seconds=left, trained_for=autoencoder_step)
        if restored["step"] < args.restorer_steps:
            print(f"stopped by --minutes at restorer step {restored['step']} of {args.restorer_steps}; continue "
                  "with --resume")
    codec.save(args.output, force=args.force or args.resume)
    print(f"wrote {args.output} (K={codec.codebook_size})")
    return 0


def _check_training_checkpoints(checkpoint: Path, restorer_checkpoint: Path, args: argparse.Namespace) -> None:
    """--resume needs a state to continue (it started from scratch without a word), and a new run does not start
    over another run's states unless --force (a later --resume would have continued the old run)."""
    held = [path for path in (checkpoint, restorer_checkpoint) if path.exists()]
    if args.resume and not held:
        raise UserError(f"--resume: there is no {checkpoint} (nor {restorer_checkpoint.name}) to continue; drop "
                        "--resume to start a run")
    if held and not (args.resume or args.force):
        raise UserError(f"{held[0]} holds a training run: pass --resume to continue it or --force to start over")
