"""The ``effvision`` command line.

Every sub-command lives in its own module under :mod:`effvision.commands` and is imported only when
it runs, so ``effvision --help`` stays fast and light. A command module provides:

* ``HELP``: one line for the command list,
* ``add_arguments(parser)``: its argparse options,
* ``run(args) -> int``: the work; raises :class:`effvision.errors.UserError` for mistakes a user can fix.

Exit codes: 0 success, 1 error, 2 usage error (argparse). A ``UserError`` prints one clear line;
``--debug`` shows the full traceback for any error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings
from collections.abc import Sequence

from effvision.errors import UserError

# name -> module under effvision.commands; the order is the order of `effvision --help`.
COMMANDS: dict[str, str] = {
    "encode": "encode",
    "decode": "decode",
    "info": "info",
    "export": "export",
    "demo": "demo",
    "reduce-info": "reduce_info",
    "tune": "tune",
    "finetune": "finetune",
    "evaluate": "evaluate",
    "train-vqgan": "train_vqgan",
    "train-codec": "train_codec",
    "eval-codec": "eval_codec",
}


def _load(name: str):
    return importlib.import_module(f"effvision.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effvision",
        description="Efficient vision: token-reduced ViTs, learned image codecs, ONNX export.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = _load(name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # compressai calls torch.jit.script when imported; that deprecation is not the user's concern.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            return int(args._module.run(args) or 0)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"effvision {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - last line of defence for the CLI
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"effvision {args.command}: error: {type(error).__name__}: {error} (run with --debug for details)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
