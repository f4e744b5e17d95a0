"""Fine-tune the shipped VQGAN (effvision/assets/vqgan-small-f16-1024.safetensors) on the photo corpus.

The first shipped VQGAN was trained on 64x64 crops (4x4 index cells) of scikit-image's samples. GroupNorm then
normalises over a far smaller area in training than on a whole photo, and whole-photo decodes lose their colour
(13 dB on the corpus's test photos, against 18-27 dB for the same model run on 64-pixel tiles). This recipe
continues from those weights on the corpus's 256x256 training crops (``scripts/make_photo_corpus.py``) with
larger crops, then re-fits the index model and re-trains the lost-index restorer for the new codebook, and
writes the asset:

    python scripts/train_demo_vqgan.py --stage all --steps 4000 --threads 2    # the first shipped VQGAN
    cp effvision/assets/vqgan-small-f16-1024.safetensors runs/vqgan-small-f16-1024-v1.safetensors
    OMP_NUM_THREADS=1 python scripts/train_vqgan_photos.py --steps 450 --restorer-steps 1500

Stages resume from ``--work-dir``. The shipped file had 450 autoencoder steps (19 minutes of one core of the
2-core CPU, shared with two MambaIC trainings: a ``--steps 1500`` run stopped there to give the ladder the CPU;
the learning rate is constant, so ``--steps 450`` nearly replays it: only the re-seeding of dead codes, which
stops at 80% of ``--steps``, differs), then ``--stage restorer --restorer-steps 1500``
and ``--stage export``. On the corpus's 10 test photos it raised the
1024-entry codec from 13.6 dB / MS-SSIM 0.71 to 17.8 dB / 0.77 at 0.036 bpp (bench/results/codec-rd-vqgan-cpu.md).
A further run from the shipped file on whole 256 px crops with ``--msssim-weight 1.0`` (983 steps) did not help
on the test photos, and coding in tiles (``--tile-size``) makes a patchwork of colour casts; both are described
in that file and neither is shipped.

The shipped file then had its decoder fine-tuned alone (``--stage decoder``: encoder, codebook, index model and
restorer unchanged; loss after the colour band's correction; each step on one shipped quality's codebook):

    python scripts/train_vqgan_photos.py --stage decoder --init runs/vqgan-small-f16-1024-v2.safetensors \
        --crop 256 --batch-size 4 --lr 1e-4 --msssim-weight 1.0 --steps 300

(13 minutes of two threads; v2 is the file the steps above wrote). Chosen on validation photos; the figures are in
bench/results/codec-rd-vqgan-cpu.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from effvision.codecs.vqgan.config import SMALL_F16
from effvision.codecs.vqgan.model import QUALITY_TO_K, VQGANCodec
from effvision.codecs.vqgan.restoration import IndexRestorer
from effvision.codecs.vqgan.train import RandomCrops, TrainSettings, train_autoencoder, train_restorer

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "effvision" / "assets" / "vqgan-small-f16-1024.safetensors"
RESTORER = {"dim": 96, "depth": 3, "heads": 4}


def corpus_photos(path: Path) -> list[np.ndarray]:
    from make_photo_corpus import load_train_crops

    return list(load_train_crops(path))


def fine_tune_decoder(codec: VQGANCodec, photos: list[np.ndarray], args: argparse.Namespace) -> None:
    """The decoder stage: encoder, codebook, index model and restorer of ``codec`` are kept as they are."""
    torch.manual_seed(args.seed)
    crops = RandomCrops(photos, crop=args.crop, seed=args.seed + 1)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, mode="decoder",
                             checkpoint_every=50, restart_dead_every=0, max_minutes=args.minutes,
                             msssim_weight=args.msssim_weight, l1_weight=0.1, colour_band_loss=True,
                             betas=(0.9, 0.999))
    # every shipped quality decodes with this decoder: train it on each one's (clustered) codebook in turn
    quantizers = [codec.vq.quantize if k == codec.codebook_size else codec.cluster(k, seed=0).vq.quantize
                  for k in sorted(QUALITY_TO_K.values())]
    print(train_autoencoder(codec.vq, crops, settings, args.work_dir / "decoder.pt", resume=True,
                            quantizers=quantizers), flush=True)
    codec.vq.load_state_dict(torch.load(args.work_dir / "decoder.pt", map_location="cpu", weights_only=True)["model"])
    codec.vq.eval()
    codec.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("/work/photo-corpus/train.npy"))
    parser.add_argument("--init", type=Path, default=ROOT / "runs" / "vqgan-small-f16-1024-v1.safetensors")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vqgan-photos")
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=70.0, help="wall-clock cap of the autoencoder stage")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--msssim-weight", type=float, default=0.0, help="weight of the 1 - MS-SSIM loss term")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="tile size the written weights code images in (default: whole images)")
    parser.add_argument("--seed", type=int, default=0,
                        help="decoder stage: seed of the crops (another one to continue from its own output)")
    parser.add_argument("--restorer-steps", type=int, default=400)
    parser.add_argument("--stage", choices=["autoencoder", "restorer", "export", "all", "decoder"], default="all",
                        help="decoder: fine-tune only the decoder of --init (L1 + MS-SSIM after the colour band's "
                             "correction) and write --out with --init's index model and restorer")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    photos = corpus_photos(args.corpus)
    autoencoder_path = args.work_dir / "autoencoder.pt"

    codec = VQGANCodec.load(args.init)
    if args.stage == "decoder":
        fine_tune_decoder(codec, photos, args)
        return
    if args.stage in ("autoencoder", "all"):
        torch.manual_seed(0)
        crops = RandomCrops(photos, crop=args.crop, seed=0)
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=50,
                                 restart_dead_every=100, max_minutes=args.minutes,
                                 msssim_weight=args.msssim_weight)
        print(train_autoencoder(codec.vq, crops, settings, autoencoder_path, resume=True), flush=True)
    codec.vq.load_state_dict(torch.load(autoencoder_path, map_location="cpu", weights_only=True)["model"])
    codec.vq.eval()

    tensors = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]
    references = args.work_dir / "reference_maps.pt"
    restorer_path = args.work_dir / "restorer.pt"
    if args.stage in ("restorer", "all"):
        codec.fit_index_model(tensors, crop=args.crop)
        torch.save(codec.reference_maps, references)
        torch.manual_seed(0)
        restorer = IndexRestorer(SMALL_F16.embed_dim, **RESTORER)
        print(train_restorer(restorer, codec.reference_maps, codec.vq.quantize.embedding.weight.detach(),
                             steps=args.restorer_steps, batch_size=32, checkpoint_path=restorer_path, resume=True))
    if args.stage in ("export", "all"):
        restorer = IndexRestorer(SMALL_F16.embed_dim, **RESTORER)
        restorer.load_state_dict(torch.load(restorer_path, map_location="cpu", weights_only=True)["model"])
        references_maps = torch.load(references, weights_only=True)
        out = VQGANCodec(SMALL_F16, vqmodel=codec.vq, restorer=restorer.eval(), reference_maps=references_maps,
                         tile_size=args.tile_size)
        out.save(args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
