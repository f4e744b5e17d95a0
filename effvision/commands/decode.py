"""``effvision decode``: ``.evc`` files -> images.

Like gzip: every input is decoded, a failure is one line naming that input, and the exit code is 1 if
any failed. The cheap checks (output format, output exists, missing or malformed file, image size) run
before torch and the codec are imported, so they answer fast.
"""

from __future__ import annotations

import argparse
import sys

HELP = "decompress .evc files back to images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from effvision.image_io import MAX_PIXELS, OUTPUT_FORMATS

    parser.add_argument("inputs", nargs="+", metavar="EVC", help=".evc files, directories, globs; - = stdin")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT|DIR",
        help=f"output image ({', '.join(OUTPUT_FORMATS)}, all lossless; BMP and PPM drop alpha; one input), "
        "directory, or - for stdout (default: beside each input, .png)",
    )
    parser.add_argument("--checkpoint", metavar="F", help="codec weights the files were encoded with")
    parser.add_argument("--pretrained", action="store_true",
                        help="download the official weights of files encoded with --pretrained if not cached")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="codec device")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help=f"refuse files declaring a larger (padded) image, before any work (default {MAX_PIXELS} = 8192x8192)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N",
        help="torch threads (default 0, automatic: 1 for images within 512x512, where more only cost, else "
        "torch's default)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


class _Codecs:
    """The codecs of one run, loaded on first use (the first load imports torch and the codec), one per
    (codec, config); a load that failed fails again for the next file without retrying."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded: dict[tuple[str, str], object] = {}

    def get(self, container):
        from effvision.codecs.base import load_codec, resolve_device

        key = (container.codec, container.config_id)
        if key not in self.loaded:
            try:
                device = resolve_device(self.args.device)
                if self.args.pretrained and self.args.checkpoint is None:
                    from effvision.codecs.pretrained import prefetch_pretrained

                    prefetch_pretrained(container.codec, container.config_id)
                self.loaded[key] = load_codec(
                    container.codec, checkpoint=self.args.checkpoint, device=device, config_id=container.config_id
                )
            except Exception as error:  # noqa: BLE001 - remembered, re-raised for every file that needs it
                self.loaded[key] = error
        if isinstance(self.loaded[key], Exception):
            raise self.loaded[key]
        return self.loaded[key]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from effvision.cli import Batch, check_threads
    from effvision.codecs.container import MAX_FILE_BYTES, parse
    from effvision.image_io import check_pixels, output_format, save_image
    from effvision.io_utils import check_not_existing, expand_inputs, output_paths, read_bytes

    check_threads(args.threads)
    if args.max_pixels < 1:
        from effvision.errors import UserError

        raise UserError(f"--max-pixels must be 1 or more, got {args.max_pixels}")

    missing: list[str] = []
    inputs = expand_inputs(args.inputs, (".evc",), errors=missing)
    outputs = output_paths(inputs, args.output, ".png", args.inputs)
    for destination in outputs:
        output_format(destination)  # a bad -o suffix is the user's command, not one input: stop before any work
    progress = tqdm(list(zip(inputs, outputs, strict=True)), desc="decode", unit="img", disable=len(inputs) < 2,
                    file=sys.stderr)
    batch = Batch(args.command, args.debug, write=lambda line: progress.write(line, file=sys.stderr))
    for message in missing:
        batch.fail(message)
    codecs = _Codecs(args)
    for source, destination in progress:
        with batch.item(source):
            check_not_existing(destination, args.force)
            container = parse(read_bytes(source, MAX_FILE_BYTES))
            # the limit applies to the padded image the codec decodes, as in decode_image
            check_pixels(container.height + container.pad_bottom, container.width + container.pad_right,
                         args.max_pixels)
            codec = codecs.get(container)
            from effvision.codecs.imagefile import decode_image, set_codec_threads  # imports torch: only when needed

            set_codec_threads(max(tile.height * tile.width for tile in container.tiles), args.threads)
            image = decode_image(container, codec, max_pixels=args.max_pixels, progress=len(inputs) < 2)
            mode = save_image(image, destination, force=args.force)  # BMP and PPM drop alpha
            progress.write(f"{source} -> {destination}: {image.width}x{image.height} {mode}", file=sys.stderr)
    return batch.exit_code

