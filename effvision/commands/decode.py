"""``effvision decode``: ``.evc`` files -> images."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from tqdm import tqdm

HELP = "decompress .evc files back to images"
FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="EVC", help=".evc files, directories, globs; - = stdin")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT|DIR",
        help="output image (one input), directory, or - for stdout (default: beside each input, .png)",
    )
    parser.add_argument("--checkpoint", metavar="F", help="codec weights the files were encoded with")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="codec device")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _format_for(destination: str) -> str:
    from effvision.errors import UserError

    if destination == "-":
        return "PNG"
    suffix = Path(destination).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{destination}: unsupported output format (use one of {', '.join(FORMATS)})")
    return FORMATS[suffix]


def run(args: argparse.Namespace) -> int:
    from effvision.codecs.base import load_codec, resolve_device
    from effvision.codecs.container import MAX_FILE_BYTES, parse
    from effvision.codecs.imagefile import decode_image
    from effvision.errors import UserError
    from effvision.io_utils import atomic_write_bytes, check_not_existing, expand_inputs, output_paths, read_bytes

    inputs = expand_inputs(args.inputs, (".evc",))
    outputs = output_paths(inputs, args.output, ".png", args.inputs)
    check_not_existing(outputs, args.force)
    formats = [_format_for(destination) for destination in outputs]
    device = resolve_device(args.device)
    codecs = {}
    progress = tqdm(
        list(zip(inputs, outputs, formats, strict=True)),
        desc="decode",
        unit="img",
        disable=len(inputs) < 2,
        file=sys.stderr,
    )
    for source, destination, image_format in progress:
        try:
            container = parse(read_bytes(source, MAX_FILE_BYTES))
        except UserError as error:
            raise UserError(f"{source}: {error}") from error
        key = (container.codec, container.config_id)
        if key not in codecs:
            codecs[key] = load_codec(
                container.codec, checkpoint=args.checkpoint, device=device, config_id=container.config_id
            )
        try:
            image = decode_image(container, codecs[key])
        except UserError as error:
            raise UserError(f"{source}: {error}") from error
        if image_format in ("PPM", "BMP") and image.mode in ("RGBA", "LA"):
            image = image.convert(image.mode[:-1])  # these formats have no alpha channel
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        atomic_write_bytes(destination, buffer.getvalue(), force=args.force)
        progress.write(f"{source} -> {destination}: {image.width}x{image.height} {image.mode}", file=sys.stderr)
    return 0
