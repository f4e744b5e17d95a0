"""``effvision encode``: images -> ``.evc`` files.

Like gzip: every input is encoded, a failure is one line naming that input, and the exit code is 1 if
any failed. An input is read and checked (:func:`effvision.image_io.open_image`) before the codec, and
with it torch, is loaded; a codec that cannot be loaded ends the run, since no input could be encoded.
"""

from __future__ import annotations

import argparse
import sys

from effvision.commands import MAX_EFFORT, int_in

HELP = "compress images into .evc files with a learned codec"


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
    rate.add_argument("--quality", type=int, metavar="Q",
                      help="shipped quality, 1 = smallest files (MambaIC 1-5, one model per lambda, numbered as "
                      "compressai's zoo, default 4; VQGAN 1-4 = codebook of 16/64/256/1024 entries, default 1024, "
                      "plus a colour band of a few hundred bytes)")
    rate.add_argument("--checkpoint", metavar="F", help="codec weights (.safetensors or official checkpoint)")
    rate.add_argument("--pretrained", action="store_true",
                      help="the codec's official weights, downloaded (huggingface_hub) and converted once, cached")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="codec device")
    parser.add_argument(
        "--tile-size",
        type=int,
        metavar="N",
        help="code the image in N x N tiles, each on its own (default: the codec's, 1024 for the shipped ones; "
        "memory is that of one tile; at least 64 for MambaIC and 16 for VQGAN, which pad every tile to that)",
    )
    parser.add_argument(
        "--effort",
        type=int_in(0, MAX_EFFORT),
        default=0,
        metavar="N",
        help="refine what is coded for each image with N optimisation steps (MambaIC: the latents, for a better "
        "rate-distortion trade-off, measured 0.5-0.6 dB more for 1-5%% more bytes; VQGAN: the indices, for a closer "
        "picture at about the same size); "
        "encode time grows with N, decoding and the format are unchanged; default 0",
    )
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N",
        help="torch threads (default 0, automatic: 1 for images within 512x512, where more only cost, else "
        "torch's default)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _load_codec(args: argparse.Namespace):
    from effvision.codecs.base import load_codec, resolve_device

    if args.pretrained:  # fetched here (may download); the loader then finds the weights by their config id
        from effvision.codecs.pretrained import default_pretrained, fetch_pretrained

        entry = default_pretrained(args.codec)
        fetch_pretrained(entry)
        return load_codec(args.codec, config_id=entry.config_id, device=resolve_device(args.device))
    return load_codec(args.codec, quality=args.quality, checkpoint=args.checkpoint, device=resolve_device(args.device))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from effvision.cli import Batch, check_threads
    from effvision.errors import UserError
    from effvision.image_io import IMAGE_SUFFIXES, open_image, what_is_not_kept
    from effvision.io_utils import atomic_write_bytes, check_not_existing, expand_inputs, output_paths

    check_threads(args.threads)

    missing: list[str] = []
    inputs = expand_inputs(args.inputs, IMAGE_SUFFIXES, errors=missing)
    outputs = output_paths(inputs, args.output, ".evc", args.inputs)
    for destination in outputs:  # .evc bytes under an image's name would look like a broken image
        if Path(destination).suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"{destination}: encode writes .evc files, not images; name the output .evc")
    progress = tqdm(list(zip(inputs, outputs, strict=True)), desc="encode", unit="img", disable=len(inputs) < 2,
                    file=sys.stderr)
    batch = Batch(args.command, args.debug, write=lambda line: progress.write(line, file=sys.stderr))
    for message in missing:
        batch.fail(message)
    codec = None
    for source, destination in progress:
        image = None
        with batch.item(source):
            check_not_existing(destination, args.force)
            image = open_image(source)
        if image is None:
            continue
        for note in what_is_not_kept(image):
            progress.write(f"note: {source}: {note}", file=sys.stderr)
        if codec is None:
            codec = _load_codec(args)  # a failure here ends the run: no input could be encoded
            if args.effort:
                codec = codec.with_effort(args.effort)
        with batch.item(source):
            from effvision.codecs.imagefile import encode_image, set_codec_threads  # imports torch: only when needed
            from effvision.codecs.progress import show_refinement_progress

            tile = args.tile_size or codec.tile_size
            set_codec_threads(min(tile, image.width) * min(tile, image.height), args.threads)
            with show_refinement_progress(args.effort > 0):  # refinement takes minutes a photo on a CPU
                data = encode_image(codec, image, tile_size=args.tile_size, progress=len(inputs) < 2).to_bytes()
            atomic_write_bytes(destination, data, force=args.force)
            from effvision.codecs.container import Mode

            bpp = 8 * len(data) / (image.width * image.height)
            stored = Mode(data[10]).name  # the mode byte of the header: what decode gives back (as info says)
            origin = "" if stored == image.mode else f" (from {image.mode})"
            progress.write(
                f"{source} -> {destination}: {image.width}x{image.height} {stored}{origin}, {len(data)} bytes, "
                f"{bpp:.4f} bpp",
                file=sys.stderr,
            )
    return batch.exit_code
