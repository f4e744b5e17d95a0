"""The VQGAN's colour band, seen: original | VQGAN without the band | with it | downscale + AVIF at the same size.

Every picture goes through a real ``.evc`` file (the shipped VQGAN at one quality, colour band off or on) or a real
AVIF file (the image downscaled 2-4x, AVIF at the quality whose file is closest to the banded ``.evc``, bicubic
upscale), on one crop of one photo:

    OMP_NUM_THREADS=1 python bench/vqgan_colour.py \
        /work/photo-corpus/test/plasma-workspace-wallpapers__EveningGlow.png \
        --crop 128 64 512 320 --quality 4 -o bench/results/vqgan-colour-band.png
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def main() -> None:
    from effvision.codecs.base import load_codec
    from effvision.codecs.evaluation import CLASSICAL, LearnedCodec, _ClassicalRuns, coded_learned
    from effvision.image_io import open_image, save_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--crop", type=int, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"))
    parser.add_argument("--quality", type=int, default=4, help="VQGAN quality (1-4 = K 16..1024)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    photo = open_image(args.image).convert("RGB")
    if args.crop:
        photo = photo.crop(tuple(args.crop))
    runs = _ClassicalRuns(args.image.stem, np.asarray(photo))
    banded = load_codec("vqgan", quality=args.quality, device="cpu")
    plain = copy.copy(banded)
    plain.compress_kwargs = {key: value for key, value in banded.compress_kwargs.items() if key != "colour"}
    panels = []
    for label, codec in (("without colour band", plain), ("with colour band", banded)):
        row, decoded = coded_learned(LearnedCodec("vqgan", f"q{args.quality}", codec), args.image.stem, photo,
                                     runs.reference)
        panels.append((f"VQGAN q{args.quality} {label}", row, decoded))
    target = panels[-1][1].bytes
    avif_row = runs.matched(CLASSICAL["avif-down"], target)
    factor, quality = avif_row.setting.split("x q")
    avif_pixels = runs.coded(CLASSICAL["avif-down"], int(quality), int(factor))[1]
    panels.append((f"{factor}x down + AVIF q{quality}", avif_row, Image.fromarray(avif_pixels)))

    width, height = photo.size
    caption = 28
    sheet = Image.new("RGB", (len(panels) * width + width, height + caption), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(photo, (0, caption))
    draw.text((3, 2), f"original {width}x{height}", fill="black")
    for column, (title, row, picture) in enumerate(panels, start=1):
        sheet.paste(picture, (column * width, caption))
        draw.text((column * width + 3, 2), title, fill="black")
        draw.text((column * width + 3, 15), f"{row.bytes} B, {row.bpp:.4f} bpp, {row.psnr:.2f} dB, "
                  f"MS-SSIM {row.ms_ssim:.3f}", fill="black")
        print(f"{title:32s} {row.bytes:6d} B  {row.bpp:.4f} bpp  PSNR {row.psnr:5.2f} dB  MS-SSIM {row.ms_ssim:.3f}")
    save_image(sheet, args.output, force=args.force)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
