"""Official codec weights one flag away: ``--pretrained`` on the CLI, ``pretrained=True`` in Python.

:data:`PRETRAINED` lists the official releases effvision knows, keyed by the config id written into every
``.evc`` file encoded with them, so ``effvision decode`` finds the same weights again (and still checks
the file's weights fingerprint). :func:`fetch_pretrained` turns an entry into a verified effvision
safetensors file in effvision's cache (``$EFFVISION_CACHE``, else ``$XDG_CACHE_HOME/effvision``, default
``~/.cache/effvision``):

1. A converted file recorded in ``<cache>/<codec>/<config id>.json`` is used when its SHA-256 matches the
   record (no network, no re-conversion).
2. Otherwise the official file is taken from ``<cache>/<codec>/<file name>`` when the user placed it there
   (the offline route), else from Hugging Face with ``huggingface_hub.hf_hub_download`` (its own cache;
   ``local_files_only`` when downloading was not asked for, when ``EFFVISION_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``,
   or when the Hub's host name does not resolve: no network, so no retries).
3. The official file's SHA-256 must equal the pinned one (:attr:`PretrainedWeights.sha256`) or, when none
   is pinned, the one recorded the first time it was converted (trust on first use).
4. It is read without running code from it (:mod:`effvision.torch_checkpoint`), converted once to
   safetensors (atomic write) and recorded with both checksums.

A failure is a :class:`UserError` naming the file to download and the exact place to put it. The
repository and file of an entry can be overridden with ``EFFVISION_PRETRAINED_<CONFIG ID>_REPO`` /
``_FILENAME`` / ``_REVISION`` (config id upper-cased, non-alphanumerics as ``_``), e.g. to use a mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effvision.errors import UserError

RECORD_FORMAT = 1


@dataclass(frozen=True)
class PretrainedWeights:
    """One official release.

    Attributes:
        config_id: id written into ``.evc`` files (at most 64 ASCII characters).
        codec: the registered codec name (``"mambaic"``, ``"vqgan"``).
        description: what the weights are, for messages.
        filename: the official file's name in ``repo_id`` (its base name is also the name to place it under).
        repo_id: Hugging Face model repository; ``None`` when no mirror is known (set the ``_REPO`` variable).
        revision: branch, tag or commit in ``repo_id`` (``None``: the default branch).
        sha256: pinned SHA-256 of the official file; ``None``: trust on first use.
        architecture: the effvision config the file maps to (a config name or config object).
        official_url: where the authors publish the file.
        license: license note.
    """

    config_id: str
    codec: str
    description: str
    filename: str
    repo_id: str | None
    revision: str | None
    sha256: str | None
    architecture: Any
    official_url: str
    license: str

    @property
    def env_prefix(self) -> str:
        return "EFFVISION_PRETRAINED_" + re.sub(r"[^A-Z0-9]", "_", self.config_id.upper())

    def source(self) -> tuple[str | None, str, str | None]:
        """(repository, file name, revision) after the environment overrides."""
        prefix = self.env_prefix
        return (
            os.environ.get(f"{prefix}_REPO") or self.repo_id,
            os.environ.get(f"{prefix}_FILENAME") or self.filename,
            os.environ.get(f"{prefix}_REVISION") or self.revision,
        )


PRETRAINED: dict[str, PretrainedWeights] = {
    entry.config_id: entry
    for entry in (
        PretrainedWeights(
            config_id="paper-official-0.025",
            codec="mambaic",
            description="MambaIC official release, lambda = 0.025 (Zeng et al., CVPR 2025)",
            filename="checkpoint0.025.pth.tar",
            repo_id="AuroraZengfh/MambaIC",
            revision=None,
            sha256=None,
            architecture="paper",
            official_url="https://github.com/AuroraZengfh/MambaIC",
            license="no license file in the MambaIC repository; ask the authors before redistributing",
        ),
        PretrainedWeights(
            config_id="taming-f16-16384",
            codec="vqgan",
            description="taming-transformers ImageNet VQGAN f16, 16384 codes (Esser et al., CVPR 2021)",
            filename="vqgan_imagenet_f16_16384.ckpt",
            repo_id=None,
            revision=None,
            sha256=None,
            architecture="imagenet-f16-16384",
            official_url="https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/ (ckpts/last.ckpt)",
            license="MIT (CompVis/taming-transformers)",
        ),
    )
}


def cache_dir() -> Path:
    """effvision's cache: ``$EFFVISION_CACHE``, else ``$XDG_CACHE_HOME/effvision``, else ``~/.cache/effvision``."""
    if os.environ.get("EFFVISION_CACHE"):
        return Path(os.environ["EFFVISION_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "effvision"


def offline() -> bool:
    """Whether ``EFFVISION_OFFLINE`` or ``HF_HUB_OFFLINE`` forbids the network."""
    return any(os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}
               for name in ("EFFVISION_OFFLINE", "HF_HUB_OFFLINE"))


def find_pretrained(codec: str, config_id: str | None) -> PretrainedWeights | None:
    """The entry of ``codec`` with ``config_id``, or ``None``."""
    entry = PRETRAINED.get(config_id) if config_id is not None else None
    return entry if entry is not None and entry.codec == codec else None


def default_pretrained(codec: str) -> PretrainedWeights:
    """The official weights ``--pretrained`` means for ``codec`` (its first entry)."""
    for entry in PRETRAINED.values():
        if entry.codec == codec:
            return entry
    codecs = sorted({entry.codec for entry in PRETRAINED.values()})
    raise UserError(f"no pretrained weights are known for codec {codec!r}; known for: {', '.join(codecs)}")


def placed_path(entry: PretrainedWeights) -> Path:
    """Where a user may put the official file by hand (used before any download)."""
    return cache_dir() / entry.codec / Path(entry.source()[1]).name


def converted_path(entry: PretrainedWeights) -> Path:
    return cache_dir() / entry.codec / f"{entry.config_id}.safetensors"


def record_path(entry: PretrainedWeights) -> Path:
    return cache_dir() / entry.codec / f"{entry.config_id}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _where_to_get(entry: PretrainedWeights) -> str:
    repo, filename, revision = entry.source()
    origin = f"https://huggingface.co/{repo}" + (f" (revision {revision})" if revision else "") if repo else ""
    origins = " or ".join(part for part in (origin, entry.official_url) if part)
    return f"download {Path(filename).name} from {origins} and place it at {placed_path(entry)}"


#: largest pretrained-weights record read from the cache
MAX_RECORD_BYTES = 1 << 16


def _read_record(entry: PretrainedWeights) -> dict | None:
    path = record_path(entry)
    if not path.is_file():
        return None
    try:  # a record is a few hundred bytes; a planted one may be large or nest deeply
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        record = json.loads(path.read_text())
        if record.get("format") != RECORD_FORMAT or not isinstance(record.get("source_sha256"), str):
            raise ValueError("unknown layout")
    except (OSError, ValueError, AttributeError, RecursionError) as error:
        raise UserError(f"{path} is not an effvision pretrained-weights record ({error}); delete it") from error
    return record


def hub_unreachable() -> str | None:
    """Why the Hugging Face endpoint certainly cannot be reached: its host name does not resolve (no network).

    ``None`` when it resolves or when that cannot be told here (a proxy resolves names for us). Asked before a
    download, so that a machine without a network gets its clear error at once instead of after
    huggingface_hub's retries (about 25 s).
    """
    import socket
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    if any(getproxies().get(scheme) for scheme in ("https", "http", "all")):  # as httpx (the Hub's client) sees them
        return None

    try:
        from huggingface_hub import constants

        host = urlsplit(constants.ENDPOINT).hostname
    except (ImportError, AttributeError, ValueError):
        return None
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"{host} does not resolve ({error.strerror or error}: no network?)"
    except (OSError, UnicodeError):
        return None
    return None


def _download(entry: PretrainedWeights, download: bool) -> Path:
    """The official file: placed by the user, or from Hugging Face (only its local cache unless ``download``)."""
    placed = placed_path(entry)
    if placed.is_file():
        return placed
    repo, filename, revision = entry.source()
    if repo is None:
        raise UserError(
            f"no Hugging Face repository is known for {entry.description} ({entry.config_id}); "
            f"{_where_to_get(entry)}, or set {entry.env_prefix}_REPO (and _FILENAME) to a mirror"
        )
    local_only = not download or offline()
    unreachable = None if local_only else hub_unreachable()
    local_only = local_only or unreachable is not None  # no network: the Hub's cache only, no 25 s of retries
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise UserError(f"huggingface_hub is not installed (pip install huggingface_hub); or {_where_to_get(entry)}") \
            from error
    import logging

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its "Retrying in 8s [Retry 4/5]" lines: the error below says it once
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision, local_files_only=local_only))
    except Exception as error:  # noqa: BLE001 - network, authentication, missing-file and offline errors alike
        if not download:
            reason = "they are not in the cache and downloading was not asked for (--pretrained / pretrained=True)"
        elif offline():
            reason = "offline (EFFVISION_OFFLINE / HF_HUB_OFFLINE) and they are not in the Hugging Face cache"
        elif unreachable is not None:
            reason = f"{unreachable} and they are not in the Hugging Face cache"
        else:
            first_line = (str(error).splitlines() or [""])[0]
            reason = f"download from {repo} failed ({type(error).__name__}: {first_line})"
        message = f"cannot get {entry.description} ({entry.config_id}): {reason}; {_where_to_get(entry)}"
        raise UserError(message) from error
    finally:
        hub_logger.setLevel(level)


def _convert(entry: PretrainedWeights, source: Path, destination: Path) -> None:
    """Official file -> effvision safetensors (atomic)."""
    import torch

    if entry.codec == "mambaic":
        from effvision.codecs.mambaic.checkpoint import load_official_checkpoint, save_checkpoint

        save_checkpoint(load_official_checkpoint(source, entry.architecture), destination)
    elif entry.codec == "vqgan":
        from effvision.codecs.vqgan.config import CONFIGS
        from effvision.codecs.vqgan.model import VQGANCodec

        config = CONFIGS[entry.architecture] if isinstance(entry.architecture, str) else entry.architecture
        codec = VQGANCodec(config)
        codec.load_taming_checkpoint(source)
        codec.save(destination, dtype=torch.float32)
    else:
        raise UserError(f"effvision cannot convert official {entry.codec} weights")


def fetch_pretrained(entry: PretrainedWeights | str, download: bool = True) -> Path:
    """The verified effvision safetensors file of an official release, fetched and converted on first use.

    Args:
        entry: a :data:`PRETRAINED` entry or its config id.
        download: may ask Hugging Face over the network; without it only local copies are used.

    Raises:
        UserError: not available (the message names the file to download and where to place it), a
            checksum differs from the pinned or recorded one, or the file is not the expected checkpoint.
    """
    if isinstance(entry, str):
        if entry not in PRETRAINED:
            raise UserError(f"unknown pretrained weights {entry!r}; known: {', '.join(PRETRAINED)}")
        entry = PRETRAINED[entry]
    converted, record_file = converted_path(entry), record_path(entry)
    record = _read_record(entry)
    if record is not None and entry.sha256 is not None and record["source_sha256"] != entry.sha256:
        raise UserError(f"{record_file} records another {entry.filename} than the pinned one; delete it and "
                        f"{converted}")
    if record is not None and converted.is_file():
        if sha256_file(converted) != record.get("converted_sha256"):
            raise UserError(
                f"{converted} does not match the SHA-256 recorded in {record_file} when it was converted; "
                "delete both files to fetch and convert the weights again"
            )
        return converted
    source = _download(entry, download)
    digest = sha256_file(source)
    expected = entry.sha256 or (record["source_sha256"] if record else None)
    if expected is not None and digest != expected:
        origin = "pinned in effvision" if entry.sha256 else f"recorded at first use in {record_file}"
        raise UserError(
            f"{source} has SHA-256 {digest}, expected {expected} ({origin}); it is not the official "
            f"{entry.filename}: delete it and {_where_to_get(entry)}"
        )
    _convert(entry, source, converted)
    repo, filename, revision = entry.source()
    record = {
        "format": RECORD_FORMAT,
        "config_id": entry.config_id,
        "source": str(source) if source == placed_path(entry) else f"hf://{repo}/{filename}@{revision or 'main'}",
        "source_sha256": digest,
        "trust": "pinned" if entry.sha256 else "first-use",
        "converted_sha256": sha256_file(converted),
    }
    from effvision.io_utils import atomic_write_bytes

    atomic_write_bytes(record_file, (json.dumps(record, indent=2) + "\n").encode(), force=True)
    return converted


def select_pretrained(codec: str, config_id: str | None, pretrained: bool) -> tuple[Path, str] | None:
    """For a codec loader: (weights file, config id) when the call means official weights, else ``None``.

    ``pretrained`` without a ``config_id`` (encoding) means the codec's default release, downloaded if
    needed; a ``config_id`` of an official release (decoding) means that release, downloaded only with
    ``pretrained``, otherwise taken from the local caches.
    """
    if config_id is None:
        if not pretrained:
            return None
        entry = default_pretrained(codec)
    else:
        entry = find_pretrained(codec, config_id)
        if entry is None:
            return None
    return fetch_pretrained(entry, download=pretrained), entry.config_id


def load_pretrained_model(config_id: str, device: str = "cpu", download: bool = True):
    """The compressai model (:class:`MambaIC` or :class:`VQGANCodec`) of an official release, in eval mode."""
    path = fetch_pretrained(config_id, download=download)
    if PRETRAINED[config_id].codec == "mambaic":
        from effvision.codecs.mambaic.checkpoint import load_checkpoint

        return load_checkpoint(path, device=device)
    from effvision.codecs.vqgan.model import VQGANCodec

    return VQGANCodec.load(path).to(device).eval()


def prefetch_pretrained(codec: str, config_id: str | None) -> None:
    """Download and convert the official weights ``config_id`` names, if it names any (``decode --pretrained``)."""
    entry = find_pretrained(codec, config_id)
    if entry is not None:
        fetch_pretrained(entry, download=True)
