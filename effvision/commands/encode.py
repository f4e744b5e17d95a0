"""``effvision encode``: images -> ``.evc`` files."""

from __future__ import annotations

import argparse
import io
import sys

from tqdm import tqdm

from effvision.errors import UserError

HELP = "compress images into .evc files with a learned codec"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
MAX_INPUT_BYTES = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMG", help="images, directories, globs; - = stdin")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT|DIR",
        help="output file (one input), directory, or - for stdout (default: beside each input, .evc)",
    )
    parser.add_argument("--codec", default="mambaic", help="codec name (mambaic, vqgan; default mambaic)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--quality", type=int, metavar="Q", help="shipped quality preset of the codec")
    rate.add_argument("--checkpoint", metavar="F", help="codec weights (.safetensors or official checkpoint)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="codec device")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _open_image(path: str):
    """Read an image file (or stdin), upright: an EXIF orientation tag is applied to the pixels, since
    the .evc container keeps no metadata and the decoded image should look as the original is shown."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from effvision.io_utils import read_bytes

    try:
        image = Image.open(io.BytesIO(read_bytes(path, MAX_INPUT_BYTES)))
        image.load()
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read image ({error})") from error
    return image


def run(args: argparse.Namespace) -> int:
    from effvision.codecs.base import load_codec, resolve_device
    from effvision.codecs.imagefile import encode_image
    from effvision.io_utils import atomic_write_bytes, check_not_existing, expand_inputs, output_paths

    inputs = expand_inputs(args.inputs, IMAGE_SUFFIXES)
    outputs = output_paths(inputs, args.output, ".evc", args.inputs)
    check_not_existing(outputs, args.force)
    codec = load_codec(args.codec, quality=args.quality, checkpoint=args.checkpoint, device=resolve_device(args.device))
    progress = tqdm(
        list(zip(inputs, outputs, strict=True)),
        desc="encode",
        unit="img",
        disable=len(inputs) < 2,
        file=sys.stderr,
    )
    for source, destination in progress:
        image = _open_image(source)
        data = encode_image(codec, image).to_bytes()
        atomic_write_bytes(destination, data, force=args.force)
        bpp = 8 * len(data) / (image.width * image.height)
        progress.write(
            f"{source} -> {destination}: {image.width}x{image.height} {image.mode}, {len(data)} bytes, {bpp:.4f} bpp",
            file=sys.stderr,
        )
    return 0
