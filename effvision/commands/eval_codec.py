"""``effvision eval-codec``: a learned codec's quality ladder vs JPEG, WebP, AVIF, JPEG XL on real files.

The work is :mod:`effvision.codecs.evaluation`; this command picks the ladder and the classical codecs,
reads the images and writes the report (markdown on stdout, ``--json``, ``--markdown``, ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from effvision.commands import MAX_EFFORT, int_in

HELP = "rate-distortion of a learned codec's qualities vs JPEG/WebP/AVIF/JPEG XL: matched bytes, BD-rate, RD plot"

DEFAULT_CLASSICAL = ("jpeg", "webp", "avif", "jxl")
EXTREME_CLASSICAL = ("avif-down", "webp-down")  # added by default for the extreme-rate codec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="folder of images, subfolders included (e.g. 768x512 test photos)")
    parser.add_argument("--codec", nargs="+", default=["mambaic"], metavar="NAME",
                        help="learned codec(s): mambaic, vqgan (default mambaic)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--quality", nargs="+", type=int, metavar="Q",
                      help="shipped qualities to evaluate (default: every shipped quality)")
    rate.add_argument("--checkpoint", nargs="+", type=Path, default=[], metavar="F",
                      help="weights files, one ladder point each (one --codec)")
    parser.add_argument("--pretrained", action="store_true",
                        help="also evaluate the official release (downloaded and converted once, cached)")
    parser.add_argument("--classical", nargs="+", metavar="NAME",
                        help="classical codecs: jpeg webp avif jxl avif-down webp-down (default: jpeg webp avif "
                             "jxl, plus avif-down webp-down with vqgan), at careful settings: JPEG with optimised "
                             "Huffman tables 4:2:0, WebP method 6, AVIF speed 6 4:2:0, JPEG XL effort 7")
    parser.add_argument("--effort", nargs="+", type=int_in(0, MAX_EFFORT), default=[0], metavar="N",
                        help="encoder-side refinement steps to evaluate (MambaIC latents, VQGAN indices; each "
                        "N > 0 is its own curve NAME-effortN; default 0)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    parser.add_argument("--json", type=Path, metavar="F", help="write the full evaluation (every row) as JSON")
    parser.add_argument("--markdown", type=Path, metavar="F", help="write the tables as markdown")
    parser.add_argument("--plot", type=Path, metavar="F.png",
                        help="RD plot (PSNR and MS-SSIM vs bpp; .png, .svg or .pdf)")
    parser.add_argument("--force", action="store_true", help="replace existing --json/--markdown/--plot files")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="learned codec device")


def _classical_names(args: argparse.Namespace) -> list[str]:
    if args.classical:
        return list(args.classical)
    extra = EXTREME_CLASSICAL if "vqgan" in args.codec else ()
    return [*DEFAULT_CLASSICAL, *extra]


def run(args: argparse.Namespace) -> int:
    from effvision.errors import UserError

    if (args.quality or args.checkpoint) and len(args.codec) > 1:
        raise UserError("--quality/--checkpoint apply to one codec; pass a single --codec")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    from effvision.io_utils import STDIO, check_output_file, check_outputs_distinct, figure_format

    outputs = {"--json": args.json, "--markdown": args.markdown, "--plot": args.plot}
    for option, path in outputs.items():
        if path is not None and str(path) == STDIO:
            raise UserError(f"{option} writes a file (the report itself goes to standard output); name the file")
        if path is not None:  # before the evaluation, which takes minutes
            check_output_file(path, args.force)
    if args.plot is not None:
        figure_format(args.plot)
    # the same value twice was evaluated twice and counted as two images' worth of rows
    args.quality = None if args.quality is None else list(dict.fromkeys(args.quality))
    args.effort = list(dict.fromkeys(args.effort))
    args.checkpoint = list({str(path.resolve()): path for path in args.checkpoint}.values())

    from effvision.bounded_config import physical_memory_bytes
    from effvision.image_io import list_images, open_image, rgb_image

    paths = list_images(args.data)[: args.limit]
    check_outputs_distinct(outputs, paths)
    images, held, budget, transparent = [], 0, physical_memory_bytes() // 4, 0
    for count, path in enumerate(paths, start=1):  # all are held for the evaluation: bound their decoded size
        opened = open_image(path)
        transparent += opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
        image = rgb_image(opened)  # what is measured: 16-bit scaled, alpha onto white, as training sees
        held += image.width * image.height * 4  # Pillow keeps RGB in 4 bytes a pixel
        if held > budget:
            raise UserError(f"the images of {args.data} take more than a quarter of this machine's memory decoded "
                            f"({budget / 2**30:.1f} GiB, passed at image {count} of {len(paths)}); evaluate fewer "
                            "(--limit) or smaller images")
        images.append((path.relative_to(args.data).as_posix(), image))  # a/x.png and b/x.png are two images
    from effvision.codecs.metrics import MIN_SSIM_SIDE, REDUCED_MS_SSIM_SIDE, SINGLE_SCALE_SIDE

    for path, (_, image) in zip(paths, images, strict=True):
        if min(image.size) < MIN_SSIM_SIDE:
            raise UserError(f"{path}: {image.width}x{image.height} pixels; eval-codec measures MS-SSIM, which needs "
                            f"at least {MIN_SSIM_SIDE}x{MIN_SSIM_SIDE}")
    small = [path for path, (_, image) in zip(paths, images, strict=True) if min(image.size) <= REDUCED_MS_SSIM_SIDE]

    from effvision.codecs import evaluation
    from effvision.codecs.base import available_codecs, load_codec, resolve_device
    from effvision.io_utils import atomic_write_bytes

    unknown = [name for name in args.codec if name not in available_codecs()]
    if unknown:
        raise UserError(f"unknown codec {', '.join(unknown)}; available: {', '.join(available_codecs())}")
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        print(line, file=sys.stderr)

    if transparent:  # the classical codecs code no alpha; encode adds a lossless alpha section to the .evc
        note(f"note: {transparent} of {len(paths)} images have transparency; they are measured composited onto "
             "white (what JPEG codes), while `effvision encode` keeps their alpha in an extra lossless section, so "
             "their .evc files are larger than counted here")
    if small:
        note(f"note: {len(small)} of {len(paths)} images have a side of {REDUCED_MS_SSIM_SIDE} px or less: their "
             f"MS-SSIM uses a smaller window than the standard 11 px, and at {SINGLE_SCALE_SIDE} px or less it is "
             "single-scale SSIM (not comparable with MS-SSIM figures of larger images)")
    classical = evaluation.classical_codecs(_classical_names(args), note)
    device = resolve_device(args.device)
    ladders = []
    for name in args.codec:
        ladders += evaluation.learned_ladder(name, args.quality, args.checkpoint, device, note)
        if args.pretrained:
            from effvision.codecs.pretrained import default_pretrained, fetch_pretrained

            entry = default_pretrained(name)
            fetch_pretrained(entry)
            codec = load_codec(name, config_id=entry.config_id, device=device)
            ladders.append(evaluation.LearnedCodec(f"{name}-official", entry.config_id, codec))
    ladders = [
        point if effort == 0 else evaluation.LearnedCodec(f"{point.name}-effort{effort}", point.label,
                                                           point.codec.with_effort(effort))
        for effort in args.effort
        for point in ladders
    ]
    print(f"{len(images)} images; learned: {', '.join(f'{p.name}:{p.label}' for p in ladders)}; "
          f"classical: {', '.join(c.name for c in classical)}", file=sys.stderr)

    result = evaluation.evaluate(ladders, images, classical)
    result.notes = notes
    report = evaluation.markdown_report(result)
    print(report)
    if args.json:
        document = {"command": shlex.join(["effvision", *sys.argv[1:]]), "machine": evaluation.machine_description(),
                    **result.as_dict()}
        text = json.dumps(evaluation.json_safe(document), indent=1, allow_nan=False)  # strict JSON: "inf" strings
        atomic_write_bytes(args.json, (text + "\n").encode(), force=args.force)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        atomic_write_bytes(args.markdown, report.encode(), force=args.force)
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        evaluation.rd_plot(result, args.plot, force=args.force)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
