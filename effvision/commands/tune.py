"""``effvision tune MODEL --target 1.8x``: per token-reduction method, the setting that meets a speed
target on this device with the highest fidelity to the unreduced model (see :mod:`effvision.tune`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from effvision.commands import MAX_SEED, int_in

HELP = "measure token-reduction settings on this device and pick, per method, the most faithful one meeting a target"

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="timm ViT name, e.g. deit_small_patch16_224 (unreduced base)")
    parser.add_argument("--target", required=True, help="speed-up over the unreduced model ('1.8x') or latency per "
                        "batch ('120ms', '0.5s')")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp32 (CPU default) or autocast to "
                        "bf16 / fp16 (CUDA default: bf16)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per timed batch (16 on CPU, 256 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=["ppt", "tome", "topk"], choices=["ppt", "tome", "topk"])
    parser.add_argument("--calibration", type=Path, help="folder of images for the fidelity measure (default: random "
                        "crops and flips of built-in photos)")
    parser.add_argument("--calibration-count", type=int, default=32, help="number of calibration images")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the network or "
                         "the Hugging Face cache); default: random weights (speed does not depend on them)")
    weights.add_argument("--checkpoint", type=Path, help="weights file for the model (timm's pretrained_cfg_overlay)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch / ONNX Runtime (default: "
                        "PyTorch's, one per core, or 1 when the load average already exceeds the cores)")
    parser.add_argument("--onnx", action="store_true", help="time with ONNX Runtime (CPU) instead of PyTorch")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per search step (3 CPU, 10 CUDA)")
    parser.add_argument("--final-repeats", type=int, default=None, help="rounds when re-measuring the picks "
                        "(5 CPU, 30 CUDA)")
    parser.add_argument("--max-steps", type=int, default=6, help="settings timed per method at most")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="JSON config to write (default tune-<model>-<target>.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the config's name with .png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--force", action="store_true", help="overwrite an existing config")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0,
                        help="seed of the calibration crops and flips (default 0)")


def _create_model(args):
    import timm

    from effvision.errors import UserError

    if not timm.is_model(args.model):
        raise UserError(f"unknown timm model {args.model!r}")
    kwargs: dict = {}
    if args.pretrained:
        kwargs["pretrained"] = True
    if args.checkpoint is not None:
        from effvision.torch_checkpoint import check_weights_file

        check_weights_file(args.checkpoint)  # a regular file, tensors backed by the bytes they claim
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(args.checkpoint.resolve())}}
    try:
        model = timm.create_model(args.model, **kwargs)
    except Exception as error:  # noqa: BLE001 - hub / file errors come in many types; all mean "no weights"
        from effvision.timm_models import weights_download_error

        download = weights_download_error(args.model, error) if args.pretrained else None
        if download is not None:
            raise download from error
        raise UserError(f"could not create {args.model}: {type(error).__name__}: {error}") from error
    return model, kwargs


def _threads_for_busy_cpu(device_type: str) -> int | None:
    """1 when other processes already keep every core busy, else ``None`` (PyTorch's default).

    With as many threads as cores on a busy CPU, every parallel region waits for a descheduled thread:
    measured on the 2-core machine under a load average of 5, DeiT-S with ToMe r=13 then ran slower than
    DeiT-S itself (many small ops, each a region), while with one thread it ran 1.65x faster, as when the
    machine is quiet. Speed-ups are what tune compares, so one thread gives the meaningful figure there."""
    import os

    cores = os.cpu_count() or 1
    if device_type != "cpu" or cores == 1 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load <= cores - 0.5:
        return None
    print(f"note: load average {load:.1f} on {cores} cores: other processes keep the CPU busy, so timings are "
          "noisy; timing with 1 thread to avoid oversubscription (--threads N to choose)", file=sys.stderr)
    return 1


def run(args) -> int:
    import timm
    import torch

    from effvision import tune
    from effvision.bounded_config import check_float32_fits
    from effvision.cli import check_threads
    from effvision.errors import UserError

    try:
        target = tune.Target.parse(args.target)
    except ValueError as error:
        raise UserError(str(error)) from error
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UserError(f"--device {args.device!r} is not a device (cpu, cuda or cuda:N)") from error
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    if args.onnx and cuda:
        raise UserError("--onnx times ONNX Runtime on the CPU; use it with --device cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if cuda else "fp32")])
    # 16 on the CPU: as compute-bound as 32 (same speed-ups) at half the time per round, so more rounds fit
    # an explicit 0 is an error below, not the default (`or` would take it for "not given")
    batch_size = (256 if cuda else 16) if args.batch_size is None else args.batch_size
    repeats = (10 if cuda else 3) if args.repeats is None else args.repeats
    final_repeats = (30 if cuda else 5) if args.final_repeats is None else args.final_repeats
    if batch_size < 1 or repeats < 1 or final_repeats < 1 or args.calibration_count < 1 or args.max_steps < 1:
        raise UserError("--batch-size, --repeats, --final-repeats, --calibration-count and --max-steps must be >= 1")
    output = args.output or Path(f"tune-{args.model}-{args.target.strip().replace(' ', '')}.json")
    if args.no_plot and args.plot is not None:
        raise UserError("--plot names a plot that --no-plot skips; pass one of them")
    plot_path = None if args.no_plot else args.plot or output.with_suffix(".png")
    from effvision.io_utils import check_output_file, check_outputs_distinct, figure_format

    # `-o t.png` made the default plot the config's own name: the config was replaced by the plot (with --force)
    check_outputs_distinct({"-o": output, "--plot": plot_path}, [args.checkpoint] if args.checkpoint else [])
    if plot_path is not None:
        figure_format(plot_path)
    for path in (output, plot_path):  # before the search, which takes minutes
        if path is not None:
            check_output_file(path, args.force)

    check_threads(args.threads, minimum=1)
    threads = args.threads or _threads_for_busy_cpu(device.type)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model, model_kwargs = _create_model(args)
    try:
        from effvision.tokens.reduce import check_vit_class

        check_vit_class(model)
    except ValueError as error:
        raise UserError(f"{args.model}: {error}") from error
    model = model.eval().to(device)
    data_config = timm.data.resolve_data_config({}, model=model)
    check_float32_fits((batch_size, *data_config["input_size"]), f"--batch-size {batch_size} (the timed batch)")
    images, calibration = tune.calibration_images(data_config, args.calibration_count, args.calibration, args.seed)

    runtime = "onnxruntime-cpu" if args.onnx else "pytorch"
    if not cuda:
        count = threads or torch.get_num_threads()
        runtime += f", {count} thread{'s' if count > 1 else ''}"
    print(f"tuning {args.model} for {target} on {device} ({DTYPES[args.dtype or ('bf16' if cuda else 'fp32')]}, "
          f"batch {batch_size}, {runtime}); fidelity on {calibration}", flush=True)

    def log(message: str) -> None:
        print(message, flush=True)

    def search(timer):
        try:
            return tune.tune(
                model, target, images, timer, methods=args.methods, base_model=args.model, model_kwargs=model_kwargs,
                device=str(device), dtype=dtype, batch_size=batch_size, runtime=runtime, calibration=calibration,
                repeats=repeats, final_repeats=final_repeats, max_steps=args.max_steps, log=log,
            )
        except ValueError as error:
            raise UserError(str(error)) from error

    if args.onnx:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="effvision-tune-") as workdir:
            result = search(tune.OnnxTimer(data_config["input_size"], batch_size, workdir, threads=threads))
    else:
        result = search(tune.TorchTimer(data_config["input_size"], batch_size, str(device), dtype))

    print()
    print(result.table())
    print(f"finished in {result.elapsed_seconds:.0f} s")
    if result.best is None:
        raise UserError(f"no method reached the target {target} on {device}; the table shows the fastest setting "
                        "timed per method (try a lower target or a larger batch)")

    from effvision.io_utils import atomic_write_bytes

    config = result.config()
    atomic_write_bytes(output, (json.dumps(config, indent=2) + "\n").encode(), force=args.force)
    print(f"config: {output}  (timm.create_model(cfg['model'], **cfg['kwargs']) or "
          f"effvision.tune.model_from_config(path))")
    if plot_path is not None:
        try:
            result.plot(plot_path, force=args.force)
            print(f"plot: {plot_path}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0
