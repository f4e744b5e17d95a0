"""Reading PyTorch checkpoints written by other projects (official releases), without running their code.

A checkpoint is a pickle, and unpickling can call any importable function. :func:`load_torch_checkpoint`
therefore never uses plain ``pickle``:

1. ``torch.load(weights_only=True)``: PyTorch's own restricted unpickler (tensors, containers,
   ``OrderedDict``, ``Counter``...). Official MambaIC releases (a dict of state dicts) load here.
2. If that refuses the file, :class:`AllowListUnpickler`, a ``pickle.Unpickler`` whose ``find_class``
   hands out only the globals in :data:`ALLOWED_GLOBALS` (tensor rebuild functions, ``OrderedDict``,
   ``Counter``, torch dtypes, numpy scalars) and inert stand-ins: ``argparse.Namespace`` becomes a
   ``types.SimpleNamespace``, and any class of a training framework (:data:`STAND_IN_PACKAGES`: PyTorch
   Lightning callbacks, ``AttributeDict`` hyper-parameters, OmegaConf configs) becomes an empty
   :class:`InertObject` subclass of the same name that only stores what it was given. Lightning
   checkpoints (e.g. taming-transformers' ``last.ckpt``, whose ``callbacks`` are keyed by the callback
   class) load here. Every other global is refused with :class:`RefusedGlobal`, before it is imported.
"""

from __future__ import annotations

import collections
import pickle
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effvision.errors import UserError, names_for_message, short_repr
from effvision.io_utils import check_regular_file, check_safetensors_file
from effvision.pickle_scan import check_pickle_cost


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global that is not on the allow list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class InertObject(dict):
    """Stand-in for a class of a training framework: keeps its constructor arguments and pickled state
    as plain data and runs none of the original code. A dict, so pickled dict subclasses
    (``AttributeDict``) fill it like the original; its class is hashable, so dicts keyed by the
    original class (Lightning 1.x ``callbacks``) load too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["arguments"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


#: top-level packages whose classes are replaced by :class:`InertObject` subclasses (never imported).
STAND_IN_PACKAGES = frozenset({"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf"})

_stand_ins: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (InertObject,), {"__module__": f"effvision.inert.{module}"})
    return _stand_ins[key]


def _numpy_global(name: str) -> Any:
    import numpy

    if name == "dtype":
        return numpy.dtype
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def _allowed_globals() -> dict[str, Any]:
    return {
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "_codecs.encode": __import__("_codecs").encode,  # how protocol-2 pickles store bytes
        "argparse.Namespace": types.SimpleNamespace,
    }


#: qualified name -> object handed to the unpickler (numpy and torch dtypes are added in ``find_class``).
ALLOWED_GLOBALS: dict[str, Any] = _allowed_globals()
_NUMPY_GLOBALS = {
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}


class AllowListUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2's name, which protocol-2 pickles keep (pickle's own find_class maps it)
            module = "builtins"
        qualified = f"{module}.{name}"
        if qualified in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[qualified]
        if qualified in _NUMPY_GLOBALS:
            return _numpy_global(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in STAND_IN_PACKAGES:
            return _stand_in(module, name)
        raise RefusedGlobal(module, name)


def _load_with_allow_list(file, **kwargs: Any) -> Any:
    return AllowListUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) needs a module-like object with ``Unpickler`` and ``load``; torch's own
# subclass of ``Unpickler`` maps storages first and defers every other global to our ``find_class``.
ALLOW_LIST_PICKLE = types.ModuleType("effvision_allow_list_pickle")
ALLOW_LIST_PICKLE.Unpickler = AllowListUnpickler
ALLOW_LIST_PICKLE.load = _load_with_allow_list


#: most records a torch.save archive may hold: it writes one per tensor storage plus a few; Python's zipfile
#: keeps about 500 bytes per record, and a 1 GB file could declare 20 million
MAX_ARCHIVE_RECORDS = 1 << 18
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickle of torch's magic number


def check_torch_archive(path: str | Path, what: str = "checkpoint") -> None:
    """Refuse, before ``torch.load`` allocates anything, a ``torch.save`` file whose layout lets a few bytes
    claim gigabytes:

    * the legacy format (before PyTorch 1.6): torch allocates each storage at the size the pickle declares and
      then reads only the storages the file lists, so a 349-byte file claimed gigabytes, and what it did not
      fill came back as the process's own heap memory;
    * anything else that is not a zip archive (torch's tar format is unchecked too);
    * a zip archive declaring more uncompressed bytes than it holds (``torch.save`` stores records
      uncompressed; a 66 kB deflated ``data.pkl`` ran the unpickler for minutes, a 4 MB record took 5 GB);
    * more than :data:`MAX_ARCHIVE_RECORDS` records;
    * a pickle whose values nest too deep or expand too far through shared references
      (:func:`effvision.pickle_scan.check_pickle_cost`): a 300 kB one crashed the process, a 993-byte one hung it.
    """
    import struct
    import zipfile

    path = Path(path)
    check_regular_file(path, what)
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(len(_LEGACY_MAGIC))
        if head.startswith(_LEGACY_MAGIC):
            raise UserError(f"{path}: a torch.save file of the legacy format (PyTorch < 1.6), which can claim memory "
                            "it does not hold; load it with a recent PyTorch where you trust it and save it again")
        if not head.startswith(b"PK\x03\x04"):  # torch.load would also try its tar format, unchecked here
            raise UserError(f"{path} is not a readable PyTorch checkpoint: torch.save writes a zip archive (since "
                            "PyTorch 1.6), and this file is none")
        file.seek(max(0, size - (1 << 16) - 22))
        tail = file.read()
        end = tail.rfind(b"PK\x05\x06")
        records = struct.unpack_from("<H", tail, end + 10)[0] if end >= 0 and end + 12 <= len(tail) else 0
        if records == 0xFFFF and end >= 20 and tail[end - 20:end - 16] == b"PK\x06\x07":  # zip64
            file.seek(struct.unpack_from("<Q", tail, end - 12)[0])
            record = file.read(56)
            records = struct.unpack_from("<Q", record, 32)[0] if record[:4] == b"PK\x06\x06" else records
    if end >= 0 and end + 22 <= len(tail):
        _check_directory_position(path, tail, end, max(0, size - (1 << 16) - 22))
    if records > MAX_ARCHIVE_RECORDS:
        raise UserError(f"{path}: an archive of {records} records (a torch.save file has one per tensor storage; "
                        f"at most {MAX_ARCHIVE_RECORDS})")
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            if declared > size:
                raise UserError(f"{path}: its records declare {declared} bytes in a file of {size} (torch.save stores "
                                "them uncompressed; a compressed record can inflate to gigabytes)")
            for info in archive.infolist():  # the pickle torch.load reads (data.pkl) and any other
                if info.filename.endswith(".pkl"):
                    with archive.open(info) as pickled:
                        check_pickle_cost(pickled, str(path))
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError) as error:
        raise UserError(f"{path}: not a readable torch.save archive ({error})") from None


def first_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s type and the first line of its message, at most ``limit`` characters (torch's messages run to
    several lines, and a crafted file can make them megabytes long)."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _check_directory_position(path: Path, tail: bytes, end: int, base: int) -> None:
    """The central directory must end where the end record (or torch's zip64 end record) begins. Python's
    zipfile reads the directory found just before the end record, torch's reader the one at the offset the end
    record states: a file with two directories showed the pickle scan a harmless ``data.pkl`` and torch a 300,000
    deep one (a segfault)."""
    import struct

    directory_size, directory_offset = struct.unpack_from("<II", tail, end + 12)
    directory_end = base + end  # the end record's position in the file
    locator = end - 20
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # zip64, as torch.save writes
        zip64_end = struct.unpack_from("<Q", tail, locator + 8)[0]
        record = tail[zip64_end - base:zip64_end - base + 56] if zip64_end >= base else b""
        if record[:4] != b"PK\x06\x06" or len(record) < 56:
            raise UserError(f"{path}: not a readable torch.save archive (a zip64 end record out of place)")
        directory_size, directory_offset = struct.unpack_from("<QQ", record, 40)
        directory_end = zip64_end
    if directory_offset + directory_size != directory_end:
        raise UserError(f"{path}: not a readable torch.save archive (its central directory is not where its end "
                        "record says; zip readers would disagree on its contents)")


def load_torch_checkpoint(path: str | Path) -> Any:
    """The object in a ``torch.save`` file, loaded on the CPU without running code from the file.

    Raises:
        UserError: the file is missing, is not a PyTorch checkpoint, or needs a global outside the allow
            list (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    check_torch_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global outside torch's list: try effvision's allow list (stand-ins for framework classes)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(error)})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=ALLOW_LIST_PICKLE)
    except RefusedGlobal as error:
        raise UserError(
            f"refusing to load {path}: it needs {error.qualified_name}, which effvision's checkpoint allow list "
            "does not contain (tensors, OrderedDict, Counter, numpy scalars, Lightning/argparse stand-ins); "
            "it may run code when unpickled"
        ) from error
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(error)})") from error


#: real checkpoints wrap their state dict in at most two containers ({"model": {"state_dict": ...}})
MAX_CONTAINER_DEPTH = 8


def tensor_state_dict(payload: Any, source: str, containers: tuple[str, ...] = ("state_dict",)) -> dict:
    """The state dict inside a loaded checkpoint: ``payload`` unwrapped through its ``containers`` keys (at most
    :data:`MAX_CONTAINER_DEPTH` deep), which must be a non-empty dict of ``str`` names to tensors.

    Raises:
        UserError: naming ``source`` and what is wrong.
    """
    for _ in range(MAX_CONTAINER_DEPTH):
        if not isinstance(payload, dict):
            break
        inner = next((payload[key] for key in containers if isinstance(payload.get(key), dict)), None)
        if inner is None:
            break
        payload = inner
    else:
        raise UserError(f"{source}: its state dict is nested more than {MAX_CONTAINER_DEPTH} containers deep")
    if not isinstance(payload, dict) or not payload:
        raise UserError(f"{source} holds no state dict (a dict of named tensors, optionally under {containers[0]!r})")
    for key, value in payload.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"{source}: its state dict maps {short_repr(key)} to a {type(value).__name__}, not a name to a tensor"
            )
        _check_tensor_backed(key, value, source)
    return payload


#: how many objects (containers and tensors) :func:`check_weights_file` walks at most
MAX_CHECKED_OBJECTS = 1 << 20


def check_weights_file(path: str | Path) -> None:
    """Refuse a weights file that another library (timm's ``pretrained_cfg_overlay=dict(file=...)`` or
    ``checkpoint_path``) is about to read for us, when reading it could hang or blow up memory there.

    It must be a regular file (``torch.load`` blocks on a FIFO). A pickled checkpoint is read as
    :func:`load_torch_checkpoint` reads one (no code runs), and every tensor in it, at most
    :data:`MAX_CONTAINER_DEPTH` containers deep, must be backed by as many stored bytes as it claims (timm's
    filters resample what a file declares: a 1.7 kB file with stride-0 views made them allocate 3 GB). A
    ``.safetensors`` file stores every tensor's bytes and safetensors checks its header, so only its kind is
    checked. The file is read twice (here, then by the library)."""
    path = Path(path)
    check_regular_file(path, "weights file")
    if path.suffix.lower() == ".safetensors":
        check_safetensors_file(path, "weights file")
        return
    pending: list[tuple[Any, str, int]] = [(load_torch_checkpoint(path), "", 0)]
    walked = 0
    while pending:
        item, key, depth = pending.pop()
        walked += 1
        if walked > MAX_CHECKED_OBJECTS or depth > MAX_CONTAINER_DEPTH:
            raise UserError(f"{path}: its containers hold more than {MAX_CHECKED_OBJECTS} objects or nest deeper "
                            f"than {MAX_CONTAINER_DEPTH}")
        if isinstance(item, torch.Tensor):
            _check_tensor_backed(key, item, str(path))
        elif isinstance(item, dict):
            pending.extend((value, str(name), depth + 1) for name, value in item.items())
        elif isinstance(item, list | tuple):
            pending.extend((value, key, depth + 1) for value in item)


def _check_tensor_backed(key: str, tensor: torch.Tensor, source: str) -> None:
    """Refuse a tensor that claims more elements than the file stores for it.

    ``torch.save`` keeps views as they are, so a file can hold one number viewed with stride 0 as a
    (32768, 65536) tensor. Anything that copies it (a checksum of its values, ``load_state_dict`` into a buffer
    the file may size) would then allocate gigabytes for a file of a few hundred bytes. Real checkpoints
    never hold such views."""
    if tensor.layout != torch.strided:
        raise UserError(f"{source}: weight {short_repr(key)} is a {tensor.layout} tensor; only dense tensors are read")
    stored = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > stored:
        raise UserError(
            f"{source}: weight {short_repr(key)} claims {tuple(tensor.shape)} elements but the file stores only "
            f"{stored} bytes for it (a crafted view)"
        )


class WeightLoads(list):
    """The results of the ``load_state_dict`` calls :func:`recorded_weight_loads` saw, and the keys of integer or
    bool tensors they copied into floating-point weights (``copy_`` casts them without a word)."""

    def __init__(self) -> None:
        super().__init__()
        self.not_floating: list[str] = []


@contextmanager
def recorded_weight_loads() -> Iterator[list]:
    """Record the result (missing and unexpected keys) of every ``load_state_dict`` call made inside.

    timm loads a model's base weights non-strictly when it adapts the model (a new class count drops the
    classifier) and only logs what it left out: a file of another architecture would leave it random."""
    loads = WeightLoads()
    original = nn.Module.load_state_dict

    def recording(module: nn.Module, state_dict, *args, **kwargs):
        own = module.state_dict()
        loads.not_floating += [key for key, value in state_dict.items() if isinstance(value, torch.Tensor)
                               and not value.is_floating_point() and key in own and own[key].is_floating_point()]
        result = original(module, state_dict, *args, **kwargs)
        loads.append(result)
        return result

    nn.Module.load_state_dict = recording
    try:
        yield loads
    finally:
        nn.Module.load_state_dict = original


def check_base_weights_loaded(model: nn.Module, loads: list, path: str | Path, name: str) -> None:
    """Refuse a weights file ``path`` that did not set every weight of the timm model ``name`` it was loaded into
    (``loads`` from :func:`recorded_weight_loads`). All that may stay random is the classifier timm drops for a
    new class count (the pretrained cfg's ``classifier``); the adapters and heads a method adds to a base
    model are built after its weights are loaded, so they are not among the missing keys. A model class
    that loads through a ``load_state_dict`` of its own without calling torch's records nothing, and passes."""
    from timm.models import get_pretrained_cfg

    # the model's own classifier, and its base's, which timm dropped when it loaded the base before a method
    # replaced the head (CLCA's classifier is head.pointwise; the base's head was the one dropped)
    registered = get_pretrained_cfg(name.split(".")[0])
    named = [(getattr(model, "pretrained_cfg", None) or {}).get("classifier"),
             registered.classifier if registered is not None else None]
    classifiers = [c for entry in named if entry for c in ((entry,) if isinstance(entry, str) else entry)]
    may_stay = {f"{classifier}.{part}" for classifier in classifiers for part in ("weight", "bias")}
    not_floating = getattr(loads, "not_floating", [])
    if not_floating:
        raise UserError(f"the weights file {path} holds integer or bool tensors where {name} has floating-point "
                        f"weights ({names_for_message(not_floating, 8)}); they would be cast, not loaded")
    missing = [key for result in loads for key in result.missing_keys if key not in may_stay]
    if missing:
        unexpected = [key for result in loads for key in result.unexpected_keys]
        raise UserError(
            f"the weights file {path} does not fit {name}: it has no weights for {len(missing)} of its tensors "
            f"({names_for_message(missing, 8)})"
            + (f", and {len(unexpected)} of its own are not in the model ({names_for_message(unexpected, 8)})"
               if unexpected else "")
            + "; they would stay random. Pass the weights of this model or of the timm model it is built on."
        )
