"""Train the MambaIC base model that the shipped quality ladder is fine-tuned from (scripts/train_mambaic_ladder.py).

Trains the ``lite`` config on random crops of scikit-image's bundled photos (CPU, one thread), holding
out ``chelsea`` and ``coffee`` for evaluation, then writes the weights with their CDF tables.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/train_demo_mambaic.py

The base (the first shipped q1) is 3843 steps of the defaults: 409 steps in a 30-minute budget on a loaded 2-core CPU,
then ``--resume --threads 2 --minutes 13`` (769 more steps), then ``--resume --threads 1 --minutes 55`` (2665
more). ``--steps 3843 --minutes 1000`` replays that many steps in one run wherever the machine is faster or
slower (each resume changes the crop order, so the weights will differ a little).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TRAIN_PHOTOS = (
    "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel",
    "camera", "coins", "moon", "brick", "grass", "gravel", "cell",
)
HELD_OUT_PHOTOS = ("chelsea", "coffee")


def photo(name: str) -> torch.Tensor:
    """A scikit-image sample as a (3, H, W) float tensor in [0, 1] (grayscale replicated)."""
    from effvision.codecs.vqgan.demo_data import load_photo

    return torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div_(255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambda", dest="lmbda", type=float, default=0.0130)
    parser.add_argument("--steps", type=int, default=100000, help="upper bound; --minutes usually stops first")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out-dir", default="runs/mambaic-demo")
    parser.add_argument("--quality", type=int, default=1, help="shipped as effvision/assets/mambaic-lite-q<N>")
    parser.add_argument("--asset", default=None, help="write the result here instead of effvision/assets/")
    parser.add_argument("--resume", action="store_true", help="continue from --out-dir/train_state.pt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    from effvision.codecs.mambaic import MambaIC
    from effvision.codecs.mambaic.checkpoint import save_checkpoint
    from effvision.codecs.mambaic.train import TrainSettings, train

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_images = [photo(name) for name in TRAIN_PHOTOS]
    val_images = [photo(name) for name in HELD_OUT_PHOTOS]
    settings = TrainSettings(
        lmbda=args.lmbda, steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
        val_every=250, save_every=250, max_seconds=args.minutes * 60, progress=True,
    )
    model = MambaIC("lite")
    started = time.time()
    history = train(model, train_images, settings, out_dir=args.out_dir, val_images=val_images, resume=args.resume)
    total_steps = int(torch.load(Path(args.out_dir) / "train_state.pt", weights_only=True)["step"])
    print(f"trained {len(history)} steps in {(time.time() - started) / 60:.1f} min ({total_steps} in total)")
    default_asset = Path(__file__).resolve().parents[1] / f"effvision/assets/mambaic-lite-q{args.quality}.safetensors"
    asset = Path(args.asset or default_asset)
    save_checkpoint(model, asset, extra={"lambda": str(args.lmbda), "trained_on": ",".join(TRAIN_PHOTOS),
                                         "steps": str(total_steps)})
    print(f"wrote {asset}")


if __name__ == "__main__":
    main()
