"""The ``effvision`` command line.

Every sub-command lives in its own module under :mod:`effvision.commands`. Only the module of the
command being run is imported (``effvision --help`` imports them all, for their one-line help), and
command modules import nothing heavy at module level, so help, usage errors and missing files answer
without torch. A command module provides:

* ``HELP``: one line for the command list,
* ``add_arguments(parser)``: its argparse options,
* ``run(args) -> int``: the work; raises :class:`effvision.errors.UserError` for mistakes a user can fix.

Exit codes: 0 success, 1 error, 2 usage error (argparse). A ``UserError`` prints one clear line;
``--debug`` shows the full traceback for any error. Commands that take many inputs work like gzip
(:class:`Batch`): every input is processed, each failure is one line naming the input, the exit code is 1
if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command``, only that command's module is imported and its options added."""
    parser = argparse.ArgumentParser(
        prog="effvision",
        description="Efficient vision: token-reduced ViTs, learned image codecs, ONNX export.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if command is not None and name != command:
            sub.add_parser(name)  # never parsed in this run: the command named on the line is `command`
            continue
        module = _load(name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        # also after the command (`effvision encode ... --debug`), as the error lines suggest it
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help="show full tracebacks on errors")
        command_parser.set_defaults(_module=module)
    return parser


def _command_named(argv: Sequence[str]) -> str | None:
    """The sub-command on the line, when it can be told before parsing (the top level takes only flags)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def one_line(message: object) -> str:
    """``message`` with control characters written escaped (``\\n``, ``\\x1b``): a file name holding a newline
    split an error line, and one holding a terminal escape sequence would have reached the terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(message))


def print_error(command: str, message: str) -> None:
    """The one-line error format of every command: ``effvision COMMAND: error: MESSAGE``."""
    print(f"effvision {command}: error: {one_line(message)}", file=sys.stderr)


#: the most threads ``--threads`` may ask for: more than any machine's cores (libgomp aborts with "out of
#: memory" far above it, and torch overflows at 2**31)
MAX_THREADS = 1024


def check_threads(threads: int | None, minimum: int = 0) -> None:
    """A :class:`UserError` unless ``--threads`` is ``None`` or within [``minimum``, :data:`MAX_THREADS`]."""
    if threads is not None and not minimum <= threads <= MAX_THREADS:
        automatic = " (automatic, the default)" if minimum == 0 else ""
        raise UserError(f"--threads must be from {minimum}{automatic} to {MAX_THREADS}, got {threads}")


def _describe(error: Exception) -> str:
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error} (run with --debug for details)"


class Batch:
    """gzip-like handling of many inputs: ``with batch.item(name): ...`` runs the work for one input; an
    exception (other than ``KeyboardInterrupt``/``SystemExit``) is reported as one line naming the input
    and the loop goes on. :attr:`exit_code` is 1 if any item failed.

    Args:
        command: the sub-command, for the error lines.
        debug: also print the traceback of each failure.
        write: prints one line to standard error (e.g. a progress bar's ``write``, so lines and bar do not mix).
    """

    def __init__(self, command: str, debug: bool = False, write: Callable[[str], None] | None = None) -> None:
        self.command = command
        self.debug = debug
        self.write = write or (lambda line: print(line, file=sys.stderr))
        self.failures = 0

    def fail(self, message: str) -> None:
        """Report a failure that is already a message (e.g. an input pattern that matched nothing)."""
        self.failures += 1
        self.write(f"effvision {self.command}: error: {one_line(message)}")

    @contextmanager
    def item(self, name: str) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise  # the reader went away (e.g. `| head`): nothing more can be written, for any input
        except Exception as error:  # noqa: BLE001 - one bad input must not stop the others
            if self.debug:
                traceback.print_exc()
            message = _describe(error)
            self.fail(message if message.startswith(f"{name}:") else f"{name}: {message}")

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) raised in the main thread, so that it unwinds like
    Ctrl-C: temporary files are removed and training loops stop as they do on Ctrl-C. Python's default for
    SIGTERM ends the process at once and left half-written temporary files behind."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def raise_terminated(signum, frame) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line_for_our_warnings(command: str, format_warning):
    """``warnings.formatwarning`` that writes effvision's own warnings as one ``effvision COMMAND: warning: ...``
    line; Python's format added the source line of the caller (torch's DataLoader code for a skipped image)."""

    def formatwarning(message, category, filename, lineno, line=None):
        if category.__module__.startswith("effvision"):
            return f"effvision {command}: warning: {one_line(message)}\n"
        return format_warning(message, category, filename, lineno, line)

    return formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_named(argv))
    args = parser.parse_args(argv)
    try:
        with _terminate_as_interrupt(), warnings.catch_warnings():
            # compressai calls torch.jit.script when imported; that deprecation is not the user's concern.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
            format_warning = warnings.formatwarning  # catch_warnings does not restore this one
            warnings.formatwarning = _one_line_for_our_warnings(args.command, format_warning)
            try:
                return int(args._module.run(args) or 0)
            finally:
                warnings.formatwarning = format_warning
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print_error(args.command, str(error))
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # like other Unix tools when the reader closes the pipe: stop quietly (and keep Python's exit-time
        # flush of stdout from raising again)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:  # stdout without a file descriptor (e.g. captured): nothing left to flush there
            pass
        return 141
    except Exception as error:  # noqa: BLE001 - last line of defence for the CLI
        if args.debug:
            traceback.print_exc()
        else:
            print_error(args.command, _describe(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
