"""Train the first VQGAN demo weights, the starting point of the shipped ones (scripts/train_vqgan_photos.py).

Three stages, each resumable from its checkpoint under --work-dir:
1. ``autoencoder``: the SMALL_F16 VQGAN trained from scratch on random 64x64 crops of scikit-image's bundled
   photos (astronaut and chelsea held out for evaluation), L1 + codebook/commitment loss, batch 16.
   The shipped model: 1000 steps with 1 thread on a shared CPU (~17 min), then resumed to 4000 steps with
   ``--steps 4000 --threads 2`` (~18 min on the idle 2-core CPU); --minutes caps the wall time.
2. ``restorer``: encode the training photos (scales 1, 3/4, 1/2, each mirrored) into 8x8-index tiles (the reference maps
   that fit the empirical index model) and train the MaskGIT-style lost-index restorer on them.
3. ``export``: write the safetensors asset (fp16 weights, reference maps, configs).

Run: ``python scripts/train_demo_vqgan.py --stage all --steps 4000 --threads 2`` (the shipped file was made in two
autoencoder runs, 1000 steps then resumed to 4000, see above).
The result matches the shipped file statistically, not bit for bit (thread timing, BLAS, a --minutes cap).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from effvision.codecs.vqgan.config import SMALL_F16
from effvision.codecs.vqgan.demo_data import held_out_photos, training_photos
from effvision.codecs.vqgan.restoration import IndexRestorer
from effvision.codecs.vqgan.taming import VQModel
from effvision.codecs.vqgan.train import RandomCrops, TrainSettings, train_autoencoder, train_restorer

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "effvision" / "assets" / "vqgan-small-f16-1024.safetensors"
RESTORER = {"dim": 96, "depth": 3, "heads": 4}


def stage_autoencoder(work: Path, minutes: float, steps: int) -> None:
    torch.manual_seed(0)
    model = VQModel(SMALL_F16)
    crops = RandomCrops(training_photos(), crop=64, seed=0)
    settings = TrainSettings(steps=steps, batch_size=16, lr=4e-4, checkpoint_every=100,
                             restart_dead_every=100, max_minutes=minutes)
    print(train_autoencoder(model, crops, settings, work / "autoencoder.pt", resume=True))


def load_autoencoder(work: Path) -> VQModel:
    model = VQModel(SMALL_F16)
    model.load_state_dict(torch.load(work / "autoencoder.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


def training_tensors() -> list[torch.Tensor]:
    """The training photos at scales 1, 3/4 and 1/2, each also mirrored: more index statistics for the
    empirical index model and the restorer than the 13 photos alone give."""
    tensors = []
    for photo in training_photos():
        x = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
        for scale in (1.0, 0.75, 0.5):
            scaled = x if scale == 1.0 else torch.nn.functional.interpolate(x[None], scale_factor=scale, mode="area")[0]
            tensors += [scaled, scaled.flip(-1)]
    return tensors


def stage_restorer(work: Path, steps: int) -> None:
    """Fit the index model (reference maps = 8x8-index tiles of the photos) and train the restorer on them."""
    from effvision.codecs.vqgan.model import VQGANCodec

    codec = VQGANCodec(SMALL_F16, vqmodel=load_autoencoder(work))
    references = work / "reference_maps.pt"
    if references.exists():
        codec.reference_maps = torch.load(references, weights_only=True)
    else:
        codec.fit_index_model(training_tensors(), crop=128)
        torch.save(codec.reference_maps, references)
    torch.manual_seed(0)
    restorer = IndexRestorer(SMALL_F16.embed_dim, **RESTORER)
    stats = train_restorer(restorer, codec.reference_maps, codec.vq.quantize.embedding.weight.detach(), steps=steps,
                           batch_size=32, checkpoint_path=work / "restorer.pt", resume=True)
    print(stats)


def stage_export(work: Path) -> None:
    from effvision.codecs.vqgan.model import VQGANCodec

    restorer = IndexRestorer(SMALL_F16.embed_dim, **RESTORER)
    restorer.load_state_dict(torch.load(work / "restorer.pt", map_location="cpu", weights_only=True)["model"])
    references = torch.load(work / "reference_maps.pt", weights_only=True)
    codec = VQGANCodec(SMALL_F16, vqmodel=load_autoencoder(work), restorer=restorer.eval(), reference_maps=references)
    codec.save(ASSET)
    print(f"wrote {ASSET} ({ASSET.stat().st_size / 1e6:.2f} MB); held out: {[n for n, _ in held_out_photos()]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["autoencoder", "restorer", "export", "all"], default="all")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vqgan-demo")
    parser.add_argument("--minutes", type=float, default=36.0, help="wall-clock cap of the autoencoder stage")
    parser.add_argument("--steps", type=int, default=1000, help="autoencoder steps (resumes from --work-dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--restorer-steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("autoencoder", "all"):
        stage_autoencoder(args.work_dir, args.minutes, args.steps)
    if args.stage in ("restorer", "all"):
        stage_restorer(args.work_dir, args.restorer_steps)
    if args.stage in ("export", "all"):
        stage_export(args.work_dir)


if __name__ == "__main__":
    main()
