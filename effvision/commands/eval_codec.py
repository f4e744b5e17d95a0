"""``effvision eval-codec``: real-bitstream rate/quality of MambaIC checkpoints vs JPEG and WebP."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "evaluate MambaIC checkpoints on a folder of images (real bpp, PSNR, MS-SSIM, times) vs JPEG/WebP"


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder of images")
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path, help="one or more .safetensors")
    parser.add_argument("--config", help="refuse checkpoints of another config (lite, paper)")
    parser.add_argument("--json", type=Path, help="write all rows as JSON here")
    parser.add_argument("--plot", type=Path, help="RD plot PNG (default OUT.png next to --json when >1 checkpoint)")
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    import torch

    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.mambaic.evaluate import evaluate, markdown_table, rd_plot, results_as_dicts
    from effvision.errors import UserError
    from effvision.image_io import list_images, load_image
    from effvision.io_utils import atomic_write_bytes

    if args.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"device {args.device!r} requested but CUDA is not available")
    images = [(path.name, load_image(path)) for path in list_images(args.data)]
    models = {path.stem: load_checkpoint(path, expected_config=args.config, device=args.device)
              for path in args.checkpoint}
    results = evaluate(models, images)
    print(markdown_table(results))
    if args.json:
        atomic_write_bytes(args.json, json.dumps(results_as_dicts(results), indent=2).encode(), force=True)
    plot = args.plot or (args.json.with_suffix(".png") if args.json and len(models) > 1 else None)
    if plot:
        rd_plot(results, plot)
        print(f"wrote {plot}")
    return 0
