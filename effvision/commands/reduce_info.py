"""``effvision reduce-info MODEL``: token schedule and GMACs of a (token-reduced) timm model."""

from __future__ import annotations

import json

HELP = "show the token schedule and GMACs of a token-reduced timm model (e.g. ppt_deit_small_patch16_224)"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="registered name, e.g. ppt_deit_small_patch16_224 or tome_vit_base_patch16_224")
    parser.add_argument("--r", type=int, help="tokens removed per reduction (ppt / tome)")
    parser.add_argument("--keep-rate", type=float, help="kept fraction (topk)")
    parser.add_argument("--layers", type=int, nargs="+", help="reducing block indices (ppt / topk)")
    parser.add_argument("--threshold", type=float, help="PPT score-variance threshold")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import timm

    import effvision
    from effvision.errors import UserError

    if not timm.is_model(args.model):
        raise UserError(f"unknown model {args.model!r}; try one of: {', '.join(timm.list_models('ppt_*')[:5])} ...")
    options = {
        key: value
        for key, value in (("r", args.r), ("keep_rate", args.keep_rate), ("threshold", args.threshold),
                           ("layers", tuple(args.layers) if args.layers else None))
        if value is not None
    }
    import torch

    from effvision.bounded_config import check_timm_options
    from effvision.tokens.reduce import check_vit_class

    check_timm_options(options)
    try:  # the schedule needs the model's structure, not its weights: built on the meta device, it allocates nothing
        with torch.device("meta"):
            model = timm.create_model(args.model, **options)
        check_vit_class(model)  # a ResNet said "'ResNet' object has no attribute 'patch_embed'"
        info = effvision.reduction_info(model)
    except (ValueError, TypeError, AttributeError) as error:
        raise UserError(str(error)) from error
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}: method {info['method']}")
    print(f"tokens into each block: {info['tokens']} (after the last block: {info['tokens_after'][-1]})")
    print(f"GMACs: {info['gmacs']:.3f} vs {info['base_gmacs']:.3f} unreduced ({info['macs_ratio']:.2f}x)")
    return 0
