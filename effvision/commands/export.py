"""``effvision export``: a timm / effvision model or a codec transform -> ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effvision.errors import UserError

HELP = ("export a model (timm or token-reduced name, a fine-tuning run folder, or CODEC:TRANSFORM) to ONNX, "
        "optionally checked")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="timm name (e.g. ppt_deit_small_patch16_224), a run folder written by `effvision finetune` (its "
             "model, base weights and trained weights), or codec transform (e.g. mambaic:g_a, mambaic:g_s)",
    )
    parser.add_argument("output", metavar="OUT.onnx", help="destination file")
    parser.add_argument("--checkpoint", metavar="F", help="weights (.safetensors or .pth) for the model/codec")
    parser.add_argument("--pretrained", action="store_true",
                        help="download the official weights (timm's hub weights, or the codec's release)")
    parser.add_argument("--quality", type=int, metavar="Q", help="codec transforms: shipped quality preset")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="timm models: classifier outputs (e.g. those of a --checkpoint fine-tuned to N "
                             "classes; 0: no classifier, the pooled features)")
    parser.add_argument("--img-size", type=int, default=None, metavar="N", help="input size (default: model's)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                        help="torch.onnx exporter (default torchscript). dynamo: opset 18 or later, token counts of "
                             "reduced models as constants (for static-shape runtimes); torchscript: any opset, token "
                             "counts computed from shapes at run time")
    parser.add_argument("--check", action="store_true",
                        help="compare with onnxruntime: random batches of 1 and 5, plus 3 real photos (or a batch "
                        "of 2 at another size for a dynamic-size export)")
    parser.add_argument("--atol", type=float, default=1e-4, help="--check fails above this max abs diff (default 1e-4)")

    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def _load_state_dict(path: str) -> dict:
    from effvision.torch_checkpoint import load_torch_checkpoint, tensor_state_dict

    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint (or not a regular file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        from effvision.io_utils import check_safetensors_file

        check_safetensors_file(path, "checkpoint")  # a huge header costs gigabytes in safetensors
        try:
            state = load_file(path)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is the user's file problem
            raise UserError(f"{path}: cannot read checkpoint ({error})") from error
    else:  # no code runs; a dict of named tensors (under "state_dict"/"model"), each backed by the bytes it claims
        state = tensor_state_dict(load_torch_checkpoint(path), path, ("state_dict", "model"))
    from effvision.bounded_config import check_finite

    check_finite(state, path)  # an ONNX file of NaN weights was written without a word
    return state


#: the largest --num-classes (timm's largest heads have 21843 outputs)
MAX_NUM_CLASSES = 100_000


def _is_run_folder(name: str) -> bool:
    from effvision.finetune import checkpoint

    return (Path(name) / checkpoint.CONFIG).is_file()


def _run_model(args: argparse.Namespace):
    """The model a fine-tuning run trained: its config's model and base weights plus its trained weights."""
    import timm

    import effvision  # noqa: F401 - registers the token-reduced timm names
    from effvision.finetune import checkpoint
    from effvision.finetune.loop import create_model, read_run_config

    if timm.is_model(args.model):
        raise UserError(f"{args.model} is both a timm model name and a fine-tuning run folder here; write "
                        f"./{args.model} for the folder, or run from another folder for the model")
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--pretrained", args.pretrained),
                                      ("--num-classes", args.num_classes), ("--img-size", args.img_size))
             if value not in (None, False)]
    if given:
        raise UserError(f"{args.model} is a fine-tuning run: its config fixes the model, weights, classes and input "
                        f"size ({', '.join(given)} not taken)")
    run_dir = Path(args.model)
    weights = run_dir / checkpoint.WEIGHTS
    if not weights.is_file():
        raise UserError(f"{run_dir} is a fine-tuning run without a finished epoch (no {checkpoint.WEIGHTS})")
    config = read_run_config(run_dir / checkpoint.CONFIG)
    model = create_model(config)
    checkpoint.load_weights(model, weights)
    channels = model.pretrained_cfg.get("input_size", (3, 224, 224))[0]
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the size the run built it at
    height, width = built if built else model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    print(f"{run_dir}: {config.model}, {len(config.classes)} classes, {height}x{width} input", file=sys.stderr)
    return model.eval(), (channels, height, width), False


def _timm_model(args: argparse.Namespace):
    import timm

    import effvision  # noqa: F401 - registers the token-reduced timm names
    from effvision.bounded_config import check_timm_model

    if not timm.is_model(args.model):
        if Path(args.model).is_dir():
            raise UserError(f"{args.model} is a folder but not a fine-tuning run (no config.json)")
        raise UserError(f"unknown model {args.model!r} (a timm name, a fine-tuning run folder, or CODEC:TRANSFORM "
                        "such as mambaic:g_a)")
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    check_timm_model(args.model, kwargs)  # e.g. --img-size 8192 at patch 16: 262144 tokens, hours to trace
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except TypeError as error:
        raise UserError(f"{args.model}: {error}") from error
    except Exception as error:
        from effvision.timm_models import weights_download_error

        download = weights_download_error(args.model, error) if args.pretrained else None
        if download is None:
            raise
        raise download from error
    if args.checkpoint:
        try:
            state = _load_state_dict(args.checkpoint)
            from effvision.bounded_config import check_floating_where_expected

            check_floating_where_expected(state, model.state_dict(), args.checkpoint)
            model.load_state_dict(state)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()][:8]  # missing, unexpected,
            details = "; ".join(line if len(line) <= 300 else line[:300] + " ..." for line in lines)  # mismatches
            classifiers = model.pretrained_cfg.get("classifier") or "head"
            classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
            head_mismatch = any(f"size mismatch for {name}." in str(error) for name in classifiers)
            hint = ("; a head fine-tuned to another class count: pass --num-classes"
                    if head_mismatch and args.num_classes is None else "")
            raise UserError(f"{args.checkpoint} does not fit {args.model}: {details or error}{hint}") from error
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    image_size = args.img_size or size[-1]
    return model.eval(), (size[0], image_size, image_size), False


def _codec_transform(args: argparse.Namespace):
    """The named sub-module of a registered codec's model, and the input shape it sees."""
    import torch

    from effvision.codecs.base import load_codec

    codec_name, _, transform = args.model.partition(":")
    codec = load_codec(codec_name, quality=args.quality, checkpoint=args.checkpoint, pretrained=args.pretrained)
    network = getattr(codec, "model", None)
    if network is None:
        raise UserError(f"codec {codec_name!r} has no torch model to export")
    try:
        module = network.get_submodule(transform)
    except AttributeError:
        children = [name for name, _ in network.named_modules() if name and name.count(".") < 2]
        raise UserError(
            f"codec {codec_name!r} has no transform {transform!r}; try one of {', '.join(children)}"
        ) from None
    size = args.img_size or 4 * codec.alignment
    size = -(-size // codec.alignment) * codec.alignment
    if size > codec.tile_size:  # the codec itself never runs on more than one tile at once
        raise UserError(f"--img-size {size} is larger than {codec_name}'s tile size ({codec.tile_size} px)")
    seen: list[tuple] = []
    handle = module.register_forward_hook(lambda _, inputs, output: seen.append((inputs, output)))
    with torch.no_grad():
        network.eval()(torch.rand(1, 3, size, size, device=codec.device))
    handle.remove()
    if not seen:
        raise UserError(f"{transform} is not used by {codec_name}'s forward pass; cannot infer its input shape")
    inputs, output = seen[0]
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        raise UserError(f"{transform} is not a one-tensor-in, one-tensor-out transform; pick a sub-module")
    print(f"{transform} takes a {tuple(inputs[0].shape[1:])} input for a {size}x{size} image (the codec pads "
          "images itself)", file=sys.stderr)
    return module.to("cpu").eval(), tuple(inputs[0].shape[1:]), True


def _other_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, H, W) -> (C, 2H, 3W): a second size, another height, another width and another aspect ratio, to
    check dynamic height/width on (only the height changed: a width baked into the graph passed)."""
    return (shape[0], 2 * shape[1], 3 * shape[2])


def _dynamic_size_works(model, path: Path, shape: tuple[int, ...], atol: float) -> bool:
    """Does the exported graph also run, and agree, at another height/width than the traced one?"""
    import onnxruntime
    import torch

    from effvision.export.onnx import check_onnx

    onnxruntime.set_default_logger_severity(4)  # the expected failure is not worth an ORT error log
    try:
        result = check_onnx(model, path, torch.randn(1, *_other_size(shape)))
    except Exception:  # noqa: BLE001 - onnxruntime raises its own error types for baked-in shapes
        return False
    finally:
        onnxruntime.set_default_logger_severity(2)
    return result["max_abs_diff"] <= atol


def _real_images(shape: tuple[int, ...], model) -> list:
    """A few real photos (scikit-image) at ``shape``, normalised like the model's pretrained config."""
    import torch
    import torch.nn.functional as F

    try:
        from skimage import data
    except ImportError:
        return []
    photos = [
        torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float() / 255
        for name in ("astronaut", "coffee", "chelsea")
    ]
    batch = torch.stack([F.interpolate(p[None], size=shape[-2:], mode="bilinear", antialias=True)[0] for p in photos])
    config = getattr(model, "pretrained_cfg", {})
    mean = torch.tensor(config.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
    return [(batch - mean) / std]


def run(args: argparse.Namespace) -> int:
    from effvision.io_utils import atomic_path, check_output_file

    if args.img_size is not None and not 1 <= args.img_size <= 8192:
        raise UserError(f"--img-size must be between 1 and 8192 pixels, got {args.img_size}")
    if not 0 <= args.atol < float("inf"):  # also refuses NaN, which no difference would ever exceed
        raise UserError(f"--atol must be a finite number >= 0, got {args.atol}")
    if not 7 <= args.opset <= 30:
        raise UserError(f"--opset must be an ONNX opset number (7-30; default 18), got {args.opset}")
    from effvision.export.onnx import MIN_DYNAMO_OPSET

    if args.exporter == "dynamo" and args.opset < MIN_DYNAMO_OPSET:
        raise UserError(f"--exporter dynamo writes opset {MIN_DYNAMO_OPSET} or later, not {args.opset}; use "
                        "--exporter torchscript for an earlier opset")
    if args.output == "-":
        raise UserError("export writes an ONNX file; name it (standard output, -, is not offered)")
    output = Path(args.output)
    check_output_file(output, args.force)
    if args.num_classes is not None and not 0 <= args.num_classes <= MAX_NUM_CLASSES:
        raise UserError(f"--num-classes must be between 0 and {MAX_NUM_CLASSES}, got {args.num_classes}")
    is_run = _is_run_folder(args.model)
    is_codec = ":" in args.model and not is_run
    if not is_codec and args.quality is not None:
        raise UserError("--quality picks a codec's shipped weights (MODEL = CODEC:TRANSFORM); not for timm models")
    if is_codec and args.num_classes is not None:
        raise UserError("--num-classes sets a timm model's classifier; a codec transform has none")
    if is_codec and sum((args.quality is not None, args.checkpoint is not None, args.pretrained)) > 1:
        raise UserError("a codec's weights come from one of --quality, --checkpoint or --pretrained")
    if is_run:
        model, shape, dynamic_hw = _run_model(args)
    else:
        model, shape, dynamic_hw = _codec_transform(args) if is_codec else _timm_model(args)
    print(f"exporting {args.model} with input (batch, {', '.join(map(str, shape))})", file=sys.stderr)
    # written and checked beside the output, moved into place only when the check passes: a failed check left
    # its file behind, and with --force replaced a good one
    with atomic_path(output, force=args.force) as temp:
        temp = Path(temp)
        fixed = not dynamic_hw
        if dynamic_hw:
            try:
                _export(args, model, temp, shape, dynamic_hw)
                fixed = not _dynamic_size_works(model, temp, shape, args.atol)
            except UserError as error:  # e.g. the dynamo exporter refuses the dynamic shapes
                fixed = True
                print(f"note: {error}", file=sys.stderr)
        if fixed:
            if dynamic_hw:
                # Some transforms (e.g. MambaIC's window attention / selective scan) trace size-specific reshapes.
                print(f"note: {args.model} does not export with a dynamic height/width; fixed at {shape[1:]}",
                      file=sys.stderr)
            dynamic_hw = False
            _export(args, model, temp, shape, dynamic_hw)
        size = temp.stat().st_size
        if args.check:
            _check_export(args, model, temp, shape, dynamic_hw)
    print(f"wrote {output} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace, model, path: Path, shape: tuple, dynamic_hw: bool) -> None:
    """:func:`export_onnx`; a model that cannot run at this size, or an operator the opset lacks, is a
    :class:`UserError` naming the model, size, opset and exporter (torch raises ``RuntimeError`` for both)."""
    from effvision.export.onnx import export_onnx

    try:
        export_onnx(model, path, (1, *shape), opset=args.opset, dynamic_hw=dynamic_hw, exporter=args.exporter)
    except Exception as error:  # noqa: BLE001 - the exporters raise RuntimeError, IndexError, ... of the model
        other = "dynamo" if args.exporter == "torchscript" else "torchscript"
        raise UserError(
            f"cannot export {args.model} with input (batch, {', '.join(map(str, shape))}) at opset {args.opset} "
            f"({args.exporter} exporter): {_export_failure(error)} (--exporter {other} may export it)"
        ) from error


def _export_failure(error: BaseException) -> str:
    """One line for what made the export fail: the exception torch's message is about (the dynamo exporter
    wraps it in a report of several lines, with terminal colour codes), its first line, at most 400 chars."""
    import re

    cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else ""
    if not isinstance(cause, RuntimeError) or not reason:  # e.g. IndexError: list index out of range
        reason = f"{type(cause).__name__}: {reason}" if reason else type(cause).__name__
    return reason if len(reason) <= 400 else reason[:400] + " ..."


def _check_export(args: argparse.Namespace, model, path: Path, shape: tuple, dynamic_hw: bool) -> None:
    """``--check``: the exported file in onnxruntime against the model; a :class:`UserError` when they differ."""
    import torch

    from effvision.export.onnx import check_onnx

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, *shape, generator=generator) for b in (1, 5)]
    if dynamic_hw:
        # another spatial size than the one traced: the dynamic height/width must really be dynamic
        batches.append(torch.randn(2, *_other_size(shape), generator=generator))
    elif shape[0] == 3:
        batches += _real_images(shape, model)
    result = check_onnx(model, path, batches)
    for batch in result["batches"]:
        print(f"check input {tuple(batch['shape'])}: max abs diff {batch['max_abs_diff']:.3g}")
    agreement = result["top1_agreement"]
    agreement_text = "" if agreement is None else f", top-1 agreement {agreement:.3f} over {result['images']} images"
    print(f"max abs diff {result['max_abs_diff']:.3g}{agreement_text}")
    if not result["finite"]:
        raise UserError(f"{args.model} gives NaN or infinite outputs (its weights?): the check compares nothing")
    if result["max_abs_diff"] > args.atol:
        raise UserError(f"onnxruntime output differs by {result['max_abs_diff']:.3g} > --atol {args.atol}")
