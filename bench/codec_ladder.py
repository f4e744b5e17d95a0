"""The ladder picture of the README: a held-out photo through every shipped quality, JPEG at the same size below.

Each learned panel is a real ``.evc`` file of the crop (encode -> bytes -> parse -> decode); each JPEG is
Pillow's file whose size is closest to it. Captions give bpp and PSNR of that crop.

    python bench/codec_ladder.py --image /work/photo-corpus/test/plasma-workspace-wallpapers__BytheWater.png \
        --crop 256 128 384 256 --out bench/results/codec-ladder.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a photo no shipped model was trained on")
    parser.add_argument("--crop", type=int, nargs=4, metavar=("LEFT", "TOP", "WIDTH", "HEIGHT"),
                        help="region of the photo to show (default: the whole photo)")
    parser.add_argument("--codec", nargs="+", default=["mambaic"], help="codecs whose shipped ladders to show")
    parser.add_argument("--out", type=Path, default=Path("bench/results/codec-ladder.png"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from effvision.codecs.evaluation import ladder_panels, ladder_picture, learned_ladder
    from effvision.image_io import open_image, save_image

    torch.set_num_threads(args.threads)
    photo = open_image(args.image).convert("RGB")
    if args.crop:
        left, top, width, height = args.crop
        photo = photo.crop((left, top, left + width, top + height))
    panels = []
    for name in args.codec:
        panels += ladder_panels(photo, learned_ladder(name), name=args.image.name)
    for panel in panels:
        learned, jpeg = panel.learned, panel.jpeg
        print(f"{learned.codec} {panel.label}: {learned.bytes} B {learned.bpp:.3f} bpp {learned.psnr:.2f} dB | "
              f"JPEG q{jpeg.setting}: {jpeg.bytes} B {jpeg.bpp:.3f} bpp {jpeg.psnr:.2f} dB")
    title = f"{args.image.name} {photo.width}x{photo.height} (held out)"
    save_image(ladder_picture(photo, panels, title=title), args.out, force=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
