"""File handling shared by the CLI commands: atomic writes, ``-`` for stdin/stdout, input expansion.

Atomic write (:func:`atomic_path`, the one mechanism; :func:`atomic_write` and :func:`atomic_write_bytes`
are built on it): the data goes to a temporary file in the destination's directory, is fsync'ed, then
moved into place in one step (``os.link`` when the destination must not be clobbered, ``os.replace``
with ``force``). A failure at any point removes the temporary file, so the destination is either
untouched or complete, and an operating-system error becomes a :class:`UserError` that names the
destination, never the temporary file. The files get the permissions a plain ``open`` would give
(0666 minus the umask), not ``mkstemp``'s owner-only 0600.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from effvision.errors import UserError

STDIO = "-"


class SubfoldersNotSearched(UserWarning):
    """A folder given as input has subfolders, which :func:`expand_inputs` does not search."""


def _write_error(path: Path, error: OSError) -> UserError:
    # strerror, not str(error), when there is one: str() of an OSError with errno names the temporary file.
    return UserError(f"cannot write {path}: {error.strerror or error}")


def _ordinary_mode() -> int:
    """The permissions ``open`` gives a new file: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _new_temp_file(directory: Path, name: str) -> str:
    """An empty temporary file beside the destination ``name`` (mkstemp's 0600 until it is moved into place)."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(descriptor)
    return temp_name


@contextmanager
def atomic_path(path: str | Path, force: bool = True) -> Iterator[str]:
    """Yield a temporary file name in ``path``'s folder (created if missing) for the block to write;
    when the block ends normally the file is fsync'ed and moved to ``path`` in one step, on any
    exception it is removed.

    Args:
        path: destination.
        force: replace an existing destination; without it an existing file (checked again at the move,
            so a file that appears meanwhile is not clobbered) is a :class:`UserError`.

    Raises:
        UserError: the destination exists (without ``force``) or an ``OSError`` while creating, writing
            (in the block), syncing or moving the file; the message names ``path``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temp_name = _new_temp_file(directory, path.name)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        try:
            yield temp_name
            # set after the writes: writers that replace the file (safetensors does) would drop an earlier chmod
            os.chmod(temp_name, _ordinary_mode())
            _fsync_file(temp_name)
            _move_into_place(temp_name, path, force)
        except OSError as error:
            raise _write_error(path, error) from error
    finally:
        Path(temp_name).unlink(missing_ok=True)
    _fsync_directory(directory)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], force: bool = False) -> None:
    """Call ``write(file)`` on a temporary file and move it to ``path`` atomically (:func:`atomic_path`).

    Args:
        path: destination, or ``"-"`` for standard output (written directly, not atomic); its folder must exist.
        write: fills the open binary file.
        force: replace an existing destination; without it an existing file is a :class:`UserError`.
    """
    if str(path) == STDIO:
        write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory")
    if path.exists() and not force:
        raise UserError(f"{path} exists (use --force to overwrite)")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"directory {directory} does not exist")
    with atomic_path(path, force=force) as temp_name, open(temp_name, "wb") as handle:
        write(handle)


def atomic_write_bytes(path: str | Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data), force=force)


def check_replaceable(path: str | Path) -> None:
    """A :class:`UserError` when ``path`` exists as something other than a regular file or a symbolic link (a
    device, pipe or socket): moving a file into place replaces the entry itself, so ``-o /dev/null --force``
    run as root turned the null device into a plain file for every process on the machine."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # missing (or unreadable: the write itself then says why)
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory; name the file to write")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise UserError(
            f"{path} is not a regular file (a device, pipe or socket) and is never replaced; write to a file, "
            f"or to {STDIO} (standard output) where the command offers it"
        )


def _move_into_place(temp_name: str, path: Path, force: bool) -> None:
    if force:
        check_replaceable(path)
        os.replace(temp_name, path)
        return
    try:
        # link() fails if the destination appeared meanwhile, so a concurrent writer is never clobbered.
        os.link(temp_name, path)
    except FileExistsError as error:
        raise UserError(f"{path} exists (use --force to overwrite)") from error
    except OSError:
        # no hard links on this file system: check, then replace (a small race instead of none)
        if path.exists():
            raise UserError(f"{path} exists (use --force to overwrite)") from None
        os.replace(temp_name, path)
        return
    os.unlink(temp_name)


def _fsync_file(name: str) -> None:
    descriptor = os.open(name, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def check_regular_file(path: str | Path, what: str = "file") -> None:
    """A :class:`UserError` unless ``path`` is a regular file: a FIFO makes every reader (``safe_open``,
    ``torch.load``) block forever, and a device may never end."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist or is not a regular file")


#: largest safetensors header (the JSON that lists the tensors) read: a real one takes about 150 bytes a tensor;
#: safetensors turns each entry into Python objects, about 20 times its bytes (1.5 million entries, 2 GB, 18 s)
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20


def check_safetensors_file(path: str | Path, what: str = "weights file") -> None:
    """A regular file (:func:`check_regular_file`) whose safetensors header is at most
    :data:`MAX_SAFETENSORS_HEADER_BYTES`; what else the header says, safetensors checks itself."""
    check_regular_file(path, what)
    with Path(path).open("rb") as handle:
        prefix = handle.read(8)
    if prefix.startswith(b"PK\x03\x04"):  # a torch.save zip: its first bytes read as a header of 10^17 bytes
        raise UserError(f"{what} {path} is a PyTorch checkpoint (torch.save), not a safetensors file; this reader "
                        "takes .safetensors files (official releases load through --pretrained, docs/pretrained.md)")
    if len(prefix) == 8 and int.from_bytes(prefix, "little") > MAX_SAFETENSORS_HEADER_BYTES:
        raise UserError(f"{what} {path} is not a safetensors file we read: it declares a header of "
                        f"{int.from_bytes(prefix, 'little')} bytes (at most {MAX_SAFETENSORS_HEADER_BYTES}; a real "
                        "one takes about 150 bytes a tensor)")


def read_bytes(path: str | Path, max_bytes: int) -> bytes:
    """Read a whole file (or stdin for ``"-"``), refusing anything larger than ``max_bytes``."""
    if str(path) == STDIO:
        data = sys.stdin.buffer.read(max_bytes + 1)
    else:
        path = Path(path)
        if not path.is_file():
            # a device, FIFO or directory may block or never end: only regular files are read
            raise UserError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
        try:
            if path.stat().st_size > max_bytes:
                raise UserError(f"{path}: larger than {max_bytes} bytes")
            with path.open("rb") as handle:
                data = handle.read(max_bytes + 1)
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error.__class__.__name__})") from error
    if len(data) > max_bytes:
        raise UserError(f"{path}: larger than {max_bytes} bytes")
    return data


def expand_inputs(patterns: Iterable[str], suffixes: Iterable[str], errors: list[str] | None = None) -> list[str]:
    """Expand files, directories (their files with one of ``suffixes``, sorted) and glob patterns.

    ``"-"`` (stdin) is passed through; duplicates are dropped. A pattern that matches nothing is a
    :class:`UserError`, or, when an ``errors`` list is given, its message is appended there and the other
    patterns are still expanded (a batch reports it and goes on, as gzip does).
    """
    suffixes = tuple(s.lower() for s in suffixes)
    found: list[str] = []
    for pattern in patterns:
        if pattern == STDIO:
            found.append(pattern)
            continue
        if Path(pattern).is_dir():
            entries = list(Path(pattern).iterdir())
            matches = sorted(str(p) for p in entries if p.is_file() and p.suffix.lower() in suffixes)
            problem = f"{pattern}: no {'/'.join(suffixes)} files in this directory"
            # named like an input but no file to read (a broken or looping link, a pipe): skipped without a word
            unreadable = sorted(str(p) for p in entries if p.suffix.lower() in suffixes and not p.is_file()
                                and not p.is_dir())
            for name in unreadable:
                message = f"{name}: not a regular file (a broken or looping link, a pipe or a device)"
                if errors is None:
                    raise UserError(message)
                errors.append(message)
            folders = sum(p.is_dir() for p in entries)
            if folders:  # they were skipped without a word (eval-codec --data searches them)
                import warnings

                warnings.warn(f"{pattern}: its {folders} subfolder(s) are not searched (name them, or use a pattern "
                              f"such as '{Path(pattern) / '**' / '*'}{next(iter(suffixes), '')}')",
                              SubfoldersNotSearched, stacklevel=2)
        elif Path(pattern).exists():
            matches, problem = [pattern], ""
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            problem = f"{pattern}: no such file" + (" (the pattern matches nothing)" if glob.has_magic(pattern) else "")
        if not matches:
            if errors is None:
                raise UserError(problem)
            errors.append(problem)
        found.extend(matches)
    if found.count(STDIO) > 1:
        raise UserError("'-' (stdin) can be given only once")
    unique: dict[object, str] = {}
    for name in found:  # the same file by two names (rgb.png ./rgb.png, a link) is one input
        unique.setdefault(_file_identity(name) or name, name)
    return list(unique.values())


def output_paths(inputs: list[str], output: str | None, suffix: str, patterns: Iterable[str] = ()) -> list[str]:
    """Destination for each input.

    One input file: ``output`` itself (a file, ``"-"``, or an existing directory to write into). Several
    inputs, several ``patterns`` (the arguments the user gave, some may have matched nothing) or any
    directory/glob among them: ``output`` is a directory (created if missing). Without ``output``: beside
    each input. Names are the input stem + ``suffix``; two inputs mapping to one name is a :class:`UserError`.
    """
    if not inputs:  # every argument failed to expand (reported by the caller): nothing to write
        return []
    if output == STDIO and len(inputs) > 1:
        raise UserError("'-' (stdout) takes a single input")
    patterns = list(patterns)
    many = len(inputs) > 1 or len(patterns) > 1 or any(Path(p).is_dir() or glob.has_magic(p) for p in patterns)
    if output is not None and (many or Path(output).is_dir() or output.endswith(("/", os.sep))):
        directory = Path(output)
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{directory} is not a directory (several inputs need an output directory)")
        if not directory.exists() and directory.suffix.lower() == suffix:
            raise UserError(f"several inputs need an output directory; {directory} is named like one output file")
        if STDIO in inputs:
            raise UserError("'-' (stdin) needs an output file, not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create directory {directory}: {error.strerror}") from error
        destinations = [str(directory / (Path(p).stem + suffix)) for p in inputs]
    elif output is not None:
        destinations = [output]
    else:
        if STDIO in inputs:
            raise UserError("'-' (stdin) needs -o/--output")
        destinations = [str(Path(p).with_suffix(suffix)) for p in inputs]
    duplicates = {d for d in destinations if destinations.count(d) > 1}
    if duplicates:
        raise UserError(f"several inputs would write {sorted(duplicates)[0]}; use separate output folders")
    for source, destination in zip(inputs, destinations, strict=True):
        if STDIO not in (source, destination) and _same_file(source, destination):
            raise UserError(f"{destination} is the input {source} itself (even with --force it is not replaced)")
    return destinations


def _file_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, links followed; ``None`` for one that does not exist (yet) and for
    ``-`` (standard input/output). Two names with one identity are one file."""
    if str(path) == STDIO:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _same_file(first: str | Path, second: str | Path) -> bool:
    identity = _file_identity(first)
    return identity is not None and identity == _file_identity(second)


def check_outputs_distinct(outputs: dict[str, str | Path | None], inputs: Iterable[str | Path] = ()) -> None:
    """Before any work: a :class:`UserError` when two outputs (option -> path) name one file (the second write
    failed after minutes of work, or with ``--force`` replaced the first), or when an output is one of the
    ``inputs`` (replaced even with ``--force``, which is for outputs)."""
    named = [(option, Path(path)) for option, path in outputs.items() if path is not None and str(path) != STDIO]
    for index, (first_option, first) in enumerate(named):
        for second_option, second in named[index + 1 :]:
            if os.path.abspath(first) == os.path.abspath(second) or _same_file(first, second):
                raise UserError(f"{first_option} and {second_option} name the same file ({first})")
    # outputs not there yet cannot be an input
    existing = {identity: (option, path) for option, path in named if (identity := _file_identity(path))}
    if not existing:
        return
    for source in inputs:
        hit = existing.get(_file_identity(source))
        if hit is not None:
            raise UserError(f"{hit[0]} {hit[1]} is one of the inputs ({source}); it is never overwritten")


#: figure formats written by suffix (matplotlib's, without a backend beyond Agg)
FIGURE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def figure_format(path: str | Path) -> str:
    """The matplotlib format of a plot file by its suffix (a ``.svg`` name got PNG bytes); a
    :class:`UserError` for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise UserError(f"{path}: plots are written as {', '.join(FIGURE_FORMATS)}; name the file with one of them")
    return FIGURE_FORMATS[suffix]


def check_not_existing(path: str, force: bool) -> None:
    """Fail before any work when the output ``path`` exists and ``force`` is off (the write re-checks
    atomically)."""
    if path == STDIO:
        return
    check_replaceable(path)
    if not force and Path(path).exists():
        raise UserError(f"{path} exists (use --force to overwrite)")


def check_writable_folder(folder: str | Path) -> None:
    """Create ``folder`` (and its parents) if missing and write and remove a temporary file in it: a
    :class:`UserError` before hours of training, not at its first checkpoint (``--out /proc/x`` trained, then
    failed with "cannot write")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.remove(_new_temp_file(folder, "write-check"))
    except OSError as error:
        raise _write_error(folder, error) from None


def check_output_file(path: str | Path, force: bool) -> None:
    """Fail before any work unless ``path`` can be written as one file: not a directory, in a folder that exists,
    and not an existing file unless ``force`` (:func:`check_not_existing`; the write re-checks atomically)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; name the file to write")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: its folder does not exist ({path.parent})")
    check_not_existing(str(path), force)
