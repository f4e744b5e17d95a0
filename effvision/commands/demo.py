"""``effvision demo``: the engine on built-in defaults, no downloads.

1. Token reduction: PPT-DeiT-S vs DeiT-S (random weights): tokens per block, GMACs, measured img/s.
2. Codecs: the shipped photo through each codec with a shipped checkpoint (bpp from real bytes, PSNR,
   times) and JPEG at about the same size; a side-by-side PNG (original / codecs / JPEG).
"""

from __future__ import annotations

import io
import statistics
import time
from importlib import resources
from pathlib import Path

HELP = "run the built-in demo: PPT-DeiT-S vs DeiT-S speed, and the shipped codecs on a built-in photo"


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per model, median reported")
    parser.add_argument("--output", "-o", type=Path, default=Path("effvision-demo.png"),
                        help="side-by-side comparison image to write (.png, .webp, ...; default effvision-demo.png)")
    parser.add_argument("--skip-codecs", action="store_true", help="only run the token-reduction part")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")


def demo_image_path() -> Path:
    return Path(str(resources.files("effvision") / "assets" / "astronaut-256.png"))


def _throughputs(models: dict, images, repeats: int) -> dict[str, float]:
    """img/s per model: median over ``repeats`` timed batches, models interleaved so that a change
    in machine load hits all of them alike."""
    import torch

    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(images)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    return {name: images.shape[0] / statistics.median(values) for name, values in times.items()}


def run_token_reduction(batch: int, repeats: int) -> None:
    import timm
    import torch

    import effvision

    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    base = timm.create_model("deit_small_patch16_224").eval()
    ppt = timm.create_model("ppt_deit_small_patch16_224").eval()
    ppt.load_state_dict(base.state_dict())
    info = effvision.reduction_info(ppt)
    print("== Token reduction: PPT-DeiT-S vs DeiT-S (random weights, CPU fp32) ==")
    print(f"tokens into blocks 0..11: {info['tokens']}  ->  {info['tokens_after'][-1]} tokens after block 11")
    print(f"GMACs: DeiT-S {info['base_gmacs']:.2f}, PPT-DeiT-S {info['gmacs']:.2f} ({info['macs_ratio']:.2f}x)")
    speed = _throughputs({"base": base, "ppt": ppt}, images, repeats)
    base_ips, ppt_ips = speed["base"], speed["ppt"]
    print(f"throughput (batch {batch}, median of {repeats}): DeiT-S {base_ips:.1f} img/s, "
          f"PPT-DeiT-S {ppt_ips:.1f} img/s  ->  {ppt_ips / base_ips:.2f}x")
    with torch.no_grad():
        agreement = (base(images).argmax(-1) == ppt(images).argmax(-1)).float().mean().item()
    print(f"top-1 agreement with the unreduced model on these inputs: {agreement:.0%}")


def _psnr(a, b) -> float:
    import math

    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _jpeg_at_bytes(image, target_bytes: int):
    """Pillow JPEG whose size is closest to ``target_bytes``: (decoded image, bytes)."""
    from PIL import Image

    best = None
    for quality in range(1, 96):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        size = buffer.tell()
        if best is None or abs(size - target_bytes) < abs(best[1] - target_bytes):
            best = (Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), size)
    return best


def run_codecs(output: Path, force: bool) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from effvision.codecs.base import load_codec
    from effvision.errors import UserError
    from effvision.image_io import open_image, save_image, to_uint8

    photo = open_image(demo_image_path()).convert("RGB")
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255.0
    pixels = x.shape[1] * x.shape[2]
    print(f"\n== Codecs on the built-in photo ({x.shape[2]}x{x.shape[1]}) ==")
    panels = [("original", photo)]
    for name in ("mambaic", "vqgan"):
        try:
            codec = load_codec(name, device="cpu")
        except UserError as error:
            print(f"{name}: no shipped checkpoint available ({error})")
            continue
        start = time.perf_counter()
        with torch.no_grad():
            sections = codec.encode(x)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            decoded = codec.decode(sections, x.shape[1], x.shape[2]).clamp(0, 1)
        decode_s = time.perf_counter() - start
        num_bytes = sum(len(section) for section in sections)
        jpeg, jpeg_bytes = _jpeg_at_bytes(photo, num_bytes)
        jpeg_x = torch.from_numpy(np.array(jpeg)).permute(2, 0, 1).float() / 255.0
        print(f"{name:8s} {8 * num_bytes / pixels:.4f} bpp  PSNR {_psnr(decoded, x):.2f} dB  "
              f"encode {encode_s:.2f}s decode {decode_s:.2f}s  | JPEG {8 * jpeg_bytes / pixels:.4f} bpp "
              f"PSNR {_psnr(jpeg_x, x):.2f} dB")
        image = Image.fromarray(to_uint8(decoded))
        panels += [(name, image), (f"JPEG@{name}", jpeg)]
    if len(panels) == 1:
        return
    width = sum(p.width for _, p in panels)
    sheet = Image.new("RGB", (width, photo.height), "white")
    left = 0
    for _, panel in panels:
        sheet.paste(panel, (left, 0))
        left += panel.width
    save_image(sheet, output, force=force)
    print(f"side-by-side ({' / '.join(label for label, _ in panels)}) written to {output}")


def run(args) -> int:
    from effvision.errors import UserError

    if args.batch < 1 or args.repeats < 1:
        raise UserError("--batch and --repeats must be >= 1")
    if not args.skip_codecs:  # fail before minutes of work, not after
        from effvision.image_io import output_format
        from effvision.io_utils import check_not_existing

        output_format(args.output)
        check_not_existing(str(args.output), args.force)
    run_token_reduction(args.batch, args.repeats)
    if not args.skip_codecs:
        run_codecs(args.output, args.force)
    return 0
