"""``effvision demo``: the engine on built-in defaults, no downloads.

1. Token reduction: PPT-DeiT-S vs DeiT-S (random weights): tokens per block, GMACs, measured img/s.
2. Codecs: the shipped photo through every shipped quality of each codec (bpp from real ``.evc`` bytes,
   PSNR, times) and JPEG at about the same size; the ladder picture (original; each quality above, JPEG at
   the same size below).
"""

from __future__ import annotations

import statistics
import time
from importlib import resources
from pathlib import Path

from effvision.commands import int_in

HELP = "run the built-in demo: PPT-DeiT-S vs DeiT-S speed, and the shipped codecs on a built-in photo"


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch (default 8)")
    parser.add_argument("--repeats", type=int_in(1, 1000), default=5, help="timed batches per model, median reported")
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


def run_codecs(output: Path, force: bool) -> None:
    from effvision.codecs.evaluation import ladder_panels, ladder_picture, learned_ladder
    from effvision.errors import UserError
    from effvision.image_io import open_image, rgb_image, save_image

    photo = rgb_image(open_image(demo_image_path()))
    print(f"\n== Codecs on the built-in photo ({photo.width}x{photo.height}; scikit-image's astronaut, which the "
          "shipped MambaIC qualities saw in training) ==")
    print("each shipped quality through a real .evc file, beside the JPEG of the closest file size")
    panels = []
    for name in ("mambaic", "vqgan"):
        try:
            ladder = learned_ladder(name, note=lambda line: None)
        except UserError as error:
            print(f"{name}: no shipped checkpoint available ({error})")
            continue
        for panel in ladder_panels(photo, ladder, name="astronaut"):
            learned, jpeg = panel.learned, panel.jpeg
            smallest = " (JPEG's smallest file)" if panel.jpeg_is_smallest else ""
            print(f"{name:8s} {panel.label:3s} {learned.bpp:.3f} bpp  PSNR {learned.psnr:5.2f} dB  "
                  f"encode {learned.encode_s:.2f}s decode {learned.decode_s:.2f}s  | JPEG q{jpeg.setting:<2s} "
                  f"{jpeg.bpp:.3f} bpp  PSNR {jpeg.psnr:5.2f} dB  ({learned.psnr - jpeg.psnr:+.2f} dB){smallest}")
            panels.append(panel)
    if not panels:
        return
    save_image(ladder_picture(photo, panels), output, force=force)
    print(f"ladder picture (original; each quality above, JPEG at the same size below) written to {output}")


def run(args) -> int:
    from effvision.errors import UserError

    if args.batch < 1 or args.repeats < 1:
        raise UserError("--batch and --repeats must be >= 1")
    from effvision.bounded_config import check_float32_fits

    # a batch's input (3 x 224 x 224) and one block's attention maps (6 x 197 x 197) take about 8 planes of 224 x 224
    check_float32_fits((args.batch, 8, 224, 224), f"a batch of {args.batch} images (input and attention maps)")
    if not args.skip_codecs:  # fail before minutes of work, not after
        from effvision.image_io import output_format
        from effvision.io_utils import check_output_file

        output_format(args.output)
        check_output_file(args.output, args.force)
    run_token_reduction(args.batch, args.repeats)
    if not args.skip_codecs:
        run_codecs(args.output, args.force)
    return 0
