"""Reproduce the shipped VQGAN demo weights (effvision/assets/vqgan-small-f16-1024.safetensors).

Three stages, each resumable from its checkpoint under --work-dir:
1. ``autoencoder``: the SMALL_F16 VQGAN trained from scratch on random 64x64 crops of scikit-image's bundled
   photos (astronaut and chelsea held out for evaluation), L1 + codebook/commitment loss, CPU, ~35 min.
2. ``restorer``: the MaskGIT-style lost-index restorer trained on index maps of 256x256 crops.
3. ``export``: fit the empirical index model on the training photos, write the safetensors asset.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python scripts/train_demo_vqgan.py --stage all``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from effvision.codecs.vqgan.config import SMALL_F16
from effvision.codecs.vqgan.demo_data import held_out_photos, training_photos
from effvision.codecs.vqgan.restoration import IndexRestorer
from effvision.codecs.vqgan.taming import VQModel
from effvision.codecs.vqgan.train import RandomCrops, TrainSettings, train_autoencoder, train_restorer

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "effvision" / "assets" / "vqgan-small-f16-1024.safetensors"


def stage_autoencoder(work: Path, minutes: float) -> None:
    torch.manual_seed(0)
    model = VQModel(SMALL_F16)
    crops = RandomCrops(training_photos(), crop=64, seed=0)
    settings = TrainSettings(steps=2200, batch_size=16, lr=4e-4, checkpoint_every=100,
                             restart_dead_every=100, max_minutes=minutes)
    print(train_autoencoder(model, crops, settings, work / "autoencoder.pt", resume=True))


def load_autoencoder(work: Path) -> VQModel:
    model = VQModel(SMALL_F16)
    model.load_state_dict(torch.load(work / "autoencoder.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


@torch.no_grad()
def index_maps_of_crops(model: VQModel, photos: list[np.ndarray], count: int, crop: int, seed: int) -> torch.Tensor:
    crops = RandomCrops(photos, crop=crop, seed=seed)
    return torch.cat([model.encode_indices(crops.sample(16)) for _ in range(count // 16)])


def stage_restorer(work: Path, steps: int) -> None:
    model = load_autoencoder(work)
    maps_path = work / "index_maps.pt"
    if maps_path.exists():
        maps = torch.load(maps_path, weights_only=True)
    else:
        maps = index_maps_of_crops(model, training_photos(), count=1024, crop=256, seed=1)
        torch.save(maps, maps_path)
    torch.manual_seed(0)
    restorer = IndexRestorer(SMALL_F16.embed_dim, dim=96, depth=3, heads=4)
    stats = train_restorer(restorer, maps, model.quantize.embedding.weight.detach(), steps=steps, batch_size=32,
                           checkpoint_path=work / "restorer.pt", resume=True)
    print(stats)


def stage_export(work: Path) -> None:
    from effvision.codecs.vqgan.model import VQGANCodec

    model = load_autoencoder(work)
    restorer = IndexRestorer(SMALL_F16.embed_dim, dim=96, depth=3, heads=4)
    restorer.load_state_dict(torch.load(work / "restorer.pt", map_location="cpu", weights_only=True)["model"])
    codec = VQGANCodec(SMALL_F16, vqmodel=model, restorer=restorer.eval())
    codec.fit_index_model([torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in training_photos()])
    codec.save(ASSET)
    print(f"wrote {ASSET} ({ASSET.stat().st_size / 1e6:.2f} MB); held out: {[n for n, _ in held_out_photos()]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["autoencoder", "restorer", "export", "all"], default="all")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vqgan-demo")
    parser.add_argument("--minutes", type=float, default=36.0, help="wall-clock cap of the autoencoder stage")
    parser.add_argument("--restorer-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("autoencoder", "all"):
        stage_autoencoder(args.work_dir, args.minutes)
    if args.stage in ("restorer", "all"):
        stage_restorer(args.work_dir, args.restorer_steps)
    if args.stage in ("export", "all"):
        stage_export(args.work_dir)


if __name__ == "__main__":
    main()
