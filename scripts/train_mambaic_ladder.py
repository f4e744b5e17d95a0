"""Train the shipped MambaIC quality ladder (effvision/assets/mambaic-lite-q<N>.safetensors) on the photo corpus.

Each quality is fine-tuned from the one before it in its chain (compressai's usual recipe: one model, then a
short fine-tune per lambda), so two chains can run side by side on two cores. Qualities are numbered as in
compressai's zoo (q1..q6 = lambda 0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483). The chains start from the base
model of ``scripts/train_demo_mambaic.py`` (3843 steps on scikit-image photos):

    python scripts/make_photo_corpus.py --out /work/photo-corpus --work /work/photo-corpus-packages
    python scripts/train_demo_mambaic.py --steps 3843 --minutes 1000 --asset runs/mambaic-lite-base.safetensors
    OMP_NUM_THREADS=1 python scripts/train_mambaic_ladder.py --chain 3:0.0067:900 2:0.0035:700 1:0.0018:700 &
    OMP_NUM_THREADS=1 python scripts/train_mambaic_ladder.py --chain 4:0.013:900 5:0.025:700 6:0.0483:1000

The shipped files were trained in that order, in two sessions: the first two stages of each chain, then the
third from the shipped file with ``--init``. q1-q5 were trained under an earlier numbering, one less, and each
stage's seed is its Q, so to replay them bit for bit pass Q-1 and rename the files. q6 was trained (1000 steps)
but is not shipped: on the corpus's test photos it loses to JPEG at the same size by 1.28 dB, on 8 of the 9
photos where JPEG can make a file that size (bench/results/codec-rd-cpu.md). All five shipped qualities then had
their entropy models alone fine-tuned on whole 16x16 latents (scripts/init_mambaic_klt.py --config lite --init ...
--latent-crop 16; the recipe is in each file's metadata and in bench/results/codec-rd-cpu.md), and then one more
joint stage on whole 256 px crops, from each shipped file: ``--chain Q:LAMBDA:700 --init <shipped qQ> --crop 256
--batch-size 4 --lr 1e-4 --final-lr 1e-5``, saved with float16 parameters.

``--config wide`` trains the upper rungs in the ``wide`` config (100 latent channels; a ``lite`` ``--init`` is
widened first, :func:`widened`), written as ``mambaic-wide-q<N>.safetensors``. None ships yet: 1753 steps of q6
on one CPU core were far from enough (bench/results/codec-rd-cpu.md); bench/gpu_codec_ladder.sh trains them on a GPU.

``--chain Q:LAMBDA:STEPS ...``: quality Q is trained for STEPS steps at LAMBDA (Adam, cosine from ``--lr`` to
``--final-lr`` over STEPS), starting from the previous entry's result (the first entry from ``--init``).
Training data: the corpus's 256x256 training crops (``train.npy``, random 128 px crops with flips) plus
scikit-image's ``astronaut`` and ``rocket``; validation: ``chelsea`` and ``coffee`` (never the corpus's test
photos). Each written asset records its lambda, its own and its ancestry's steps, and CPU hours.
Every stage is resumable (``--resume``: each stage's state lives in ``--work-dir/q<N>/``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "effvision" / "assets"
EXTRA_TRAIN = ("astronaut", "rocket")
VALIDATION = ("chelsea", "coffee")
CODER_TABLES = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")


def skimage_photo(name: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1] (grayscale photos repeated to three channels)."""
    from effvision.codecs.vqgan.demo_data import load_photo

    return torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div_(255.0)


def corpus_crops(path: Path) -> list[torch.Tensor]:
    from make_photo_corpus import load_train_crops

    tensor = torch.from_numpy(load_train_crops(path)).permute(0, 3, 1, 2).float().div_(255.0)
    return list(tensor.unbind(0))


def widened(narrow: torch.nn.Module, config) -> torch.nn.Module:
    """A ``config`` MambaIC (more latent channels, same transforms) that starts from a trained narrower one.

    The transform and hyperprior bodies are copied. Latent channel j of slice i goes to channel j of the new
    slice i; the new channels enter the synthesis and hyper analysis with zero weight, so the widened model
    reconstructs exactly as the narrow one until training uses them. The per-slice context model depends on
    the slice width and starts from scratch.
    """
    from effvision.codecs.mambaic import MambaIC

    wide = MambaIC(config)
    old_cfg, new_cfg = narrow.config, wide.config
    if new_cfg.num_slices != old_cfg.num_slices or new_cfg.latent_channels < old_cfg.latent_channels:
        raise ValueError("can only widen to more latent channels with the same number of slices")
    old_m, new_m, slices = old_cfg.latent_channels, new_cfg.latent_channels, old_cfg.num_slices
    index = torch.tensor([(c // (old_m // slices)) * (new_m // slices) + c % (old_m // slices) for c in range(old_m)])
    # parameter -> the dimension indexed by latent channel ("zero": new channels get zero weight)
    latent_dims = {"g_a.5.weight": 0, "g_a.5.bias": 0, "h_a.0.weight": 1, "h_mean_s.2.weight": 1,
                   "h_mean_s.2.bias": 0, "h_scale_s.2.weight": 1, "h_scale_s.2.bias": 0, "g_s.0.weight": 0}
    zero_new = {"h_a.0.weight", "g_s.0.weight"}
    old_state, state = narrow.state_dict(), wide.state_dict()
    for key, value in state.items():
        if key.startswith("slices.") or key not in old_state or key.rsplit(".", 1)[-1] in CODER_TABLES:
            continue  # the coder's tables are rebuilt by update()
        source = old_state[key]
        if key in latent_dims:
            dim = latent_dims[key]
            target = torch.zeros_like(value) if key in zero_new else value.clone()
            target.index_copy_(dim, index, source)
            state[key] = target
        elif source.shape == value.shape:
            state[key] = source.clone()
        else:
            raise ValueError(f"cannot widen {key}: {tuple(source.shape)} -> {tuple(value.shape)}")
    wide.load_state_dict(state)
    return wide


def parse_stage(text: str) -> tuple[int, float, int]:
    try:
        quality, lmbda, steps = text.split(":")
        return int(quality), float(lmbda), int(steps)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected QUALITY:LAMBDA:STEPS, got {text!r}") from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", nargs="+", type=parse_stage, required=True, metavar="Q:LAMBDA:STEPS")
    parser.add_argument("--corpus", type=Path, default=Path("/work/photo-corpus/train.npy"))
    parser.add_argument("--init", type=Path, default=ROOT / "runs" / "mambaic-lite-base.safetensors")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/mambaic-ladder"))
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where the finished qualities are written")
    parser.add_argument("--config", choices=("lite", "wide", "wide160"), default="lite",
                        help="config of the trained qualities; a narrower --init is widened (widened())")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--final-lr", type=float, default=3e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage-minutes", type=float, default=None,
                        help="wall-time cap per stage (the cosine schedule still spans STEPS)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (bfloat16 autocast on CUDA)")
    parser.add_argument("--scan-backend", choices=("auto", "torch", "triton"), default="auto",
                        help="selective-scan backend of the VSS blocks (auto: Triton on CUDA)")
    args = parser.parse_args()

    from effvision.codecs.base import resolve_device
    from effvision.codecs.mambaic import CONFIGS
    from effvision.codecs.mambaic.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from effvision.codecs.mambaic.train import TrainSettings, train

    torch.set_num_threads(args.threads)
    train_images = corpus_crops(args.corpus) + [skimage_photo(name) for name in EXTRA_TRAIN]
    val_images = [skimage_photo(name) for name in VALIDATION]
    source = args.init
    _, metadata = read_checkpoint_config(source)
    ancestry_steps = int(metadata.get("total_steps", metadata.get("steps", "0")))
    ancestry_hours = float(metadata.get("cpu_hours", "0"))
    ancestry_gpu_hours = float(metadata.get("gpu_hours", "0"))
    device = resolve_device(args.device)
    for quality, lmbda, steps in args.chain:
        work = args.work_dir / f"q{quality}"
        model = load_checkpoint(source)
        if model.config.name != args.config:
            model = widened(model, CONFIGS[args.config])
        for module in model.modules():
            if hasattr(module, "scan_backend"):
                module.scan_backend = args.scan_backend
        settings = TrainSettings(
            lmbda=lmbda, steps=steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
            final_lr=args.final_lr, val_every=100, save_every=50, progress=True, seed=quality,
            max_seconds=None if args.stage_minutes is None else args.stage_minutes * 60,
        )
        started = time.time()
        train(model, train_images, settings, out_dir=work, val_images=val_images, resume=args.resume, device=device)
        model.cpu()
        hours = (time.time() - started) / 3600
        steps = int(torch.load(work / "train_state.pt", weights_only=True, map_location="cpu")["step"])
        ancestry_steps += steps
        if device == "cuda":
            ancestry_gpu_hours += hours
        else:
            ancestry_hours += hours
        asset = args.assets / f"mambaic-{args.config}-q{quality}.safetensors"
        save_checkpoint(model, asset, extra={
            "lambda": str(lmbda),
            "steps": str(steps),
            "total_steps": str(ancestry_steps),
            "cpu_hours": f"{ancestry_hours:.2f}",
            "gpu_hours": f"{ancestry_gpu_hours:.3f}",
            "trained_on_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "fine_tuned_from": source.name,
            "trained_on": f"photo corpus {args.corpus.name} + skimage {','.join(EXTRA_TRAIN)}",
            "recipe": json.dumps({"crop": args.crop, "batch": args.batch_size, "lr": args.lr,
                                  "final_lr": args.final_lr}),
        })
        print(f"q{quality}: lambda {lmbda}, {steps} steps in {hours * 60:.1f} min -> {asset}", flush=True)
        source = asset


if __name__ == "__main__":
    main()
