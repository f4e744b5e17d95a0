"""What every effvision training loop shares: processes, a time limit, resumable state, progress, schedule.

* :class:`Distributed`: one process, or one of several launched by ``torchrun`` (``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK``; gloo on CPU, NCCL on CUDA, one GPU per local rank). Collectives that keep
  the ranks in step: :meth:`Distributed.any_rank` (stop together), :meth:`Distributed.sum` (metrics).
* :class:`TimeLimit`: a wall-clock budget; ``distributed.any_rank(limit.expired())`` stops every rank at
  the same step (DistributedDataParallel hangs when one rank leaves early).
* :func:`save_training_state` / :func:`load_training_state`: a ``torch.save`` dict written atomically (temp
  file in the destination's folder, then ``os.replace``: a reader or a resume sees the old file or the
  new one, never half of one) and read with ``weights_only=True`` (tensors and plain Python values only).
  :func:`state_dicts` / :func:`restore` / :func:`resume_training_state` map named parts (model,
  optimizers, schedulers) to and from such a dict, and :func:`restore_generators` the random generators saved in
  it (so that a resumed run draws what an uninterrupted one would).
* :func:`progress_bar`: tqdm, shown on rank 0 only.
* :func:`cosine_factor` / :func:`cosine_lr`: linear warmup then half-cosine decay.
* :func:`check_training_options` / :func:`load_image_folder`: clear errors on options no loop can run, and a
  folder of training images held in memory only up to a quarter of this machine's.

Nothing here imports the CLI; the codec and fine-tuning loops import this module.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from effvision.io_utils import atomic_path


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict``: modules, optimizers, schedulers, grad scalers."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, /) -> Any: ...


@dataclass
class Distributed:
    """This process's place among the training processes (a single process by default).

    Attributes:
        rank: global rank, 0 on the process that writes files and shows progress.
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        device: where this process trains; collectives put their tensors there.
        owns_group: :meth:`from_environment` started the process group, so :meth:`close` ends it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu") -> Distributed:
        """Join the process group ``torchrun`` describes in the environment (or use one already started).

        With several processes a plain ``cuda`` device becomes ``cuda:LOCAL_RANK`` (and the current device);
        the backend is NCCL for CUDA, gloo otherwise. Without ``WORLD_SIZE`` > 1 nothing is started.
        """
        device = torch.device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index is None and world_size > 1:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns_group = True
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group)
        return cls(device=device)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """True on the process that writes checkpoints and shows progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module, **ddp_options) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself."""
        if not self.enabled:
            return model
        return nn.parallel.DistributedDataParallel(model, **ddp_options)

    def any_rank(self, flag: bool) -> bool:
        """``flag`` OR-ed over every process: the same answer on all ranks (e.g. to stop at the same step)."""
        if not self.enabled:
            return bool(flag)
        total = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(total)
        return bool(total.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over every process (float64)."""
        if not self.enabled:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def close(self) -> None:
        """End the process group if :meth:`from_environment` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class TimeLimit:
    """A wall-clock budget that starts now; ``seconds=None`` never expires.

    Args:
        seconds: the budget.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


def save_training_state(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically: a temp file beside it, fsync'ed, then ``os.replace``.

    If writing fails the temp file is removed and an existing ``path`` is left as it was. The folder is
    created when missing.
    """
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A dict written by :func:`save_training_state`, loaded with ``weights_only=True`` (a :class:`UserError`
    if ``path`` is not a regular file: ``torch.load`` would block on a FIFO)."""
    from effvision.torch_checkpoint import check_torch_archive

    check_torch_archive(path, "training state")  # a regular file, no legacy format, no compressed records
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a crafted or foreign file: torch's six lines advise weights_only=False
        from effvision.errors import UserError
        from effvision.torch_checkpoint import first_line

        raise UserError(f"{path} is not a readable training state ({first_line(error)})") from None


def state_dicts(parts: Mapping[str, Stateful], **values) -> dict:
    """``{name: part.state_dict()}`` for every part, plus plain ``values`` (e.g. ``step=...``)."""
    return {**{name: part.state_dict() for name, part in parts.items()}, **values}


def restore(state: Mapping, parts: Mapping[str, Stateful], optional: Iterable[str] = ()) -> None:
    """Load ``state[name]`` into every part; a name in ``optional`` that ``state`` lacks is skipped (the
    part keeps its fresh state), any other missing name is a ``KeyError``."""
    optional = set(optional)
    for name, part in parts.items():
        if name in state or name not in optional:
            part.load_state_dict(state[name])


def resume_training_state(
    path: str | os.PathLike | None,
    parts: Mapping[str, Stateful],
    map_location: str | torch.device = "cpu",
    optional: Iterable[str] = (),
) -> dict | None:
    """Load the state at ``path`` into ``parts`` (see :func:`restore`) and return it (for its step and other
    values); None, with the parts untouched, when ``path`` is None or no such file exists (anything else there,
    a FIFO or a folder, is a :class:`UserError` from :func:`load_training_state`)."""
    if path is None or not os.path.lexists(path):
        return None
    from effvision.errors import UserError, short_repr

    state = load_training_state(path, map_location)
    restore_checked(state, parts, path, optional)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{path}: its step {short_repr(step, 40)} is not an integer >= 0")
    return state


def restore_generators(state: Mapping, generators: Mapping[str, torch.Generator], source) -> None:
    """Set each generator to its state saved under its name in ``state`` (states written before they were saved
    have none: those generators keep their seeds); a saved state that is not a generator's is a UserError."""
    from effvision.errors import UserError

    for name, generator in generators.items():
        if name in state:
            try:
                generator.set_state(state[name])
            except (TypeError, RuntimeError, ValueError) as error:
                raise UserError(f"{source}: its {name} is not a random generator's state ({error})") from None


def restore_checked(state: Any, parts: Mapping[str, Stateful], source, optional: Iterable[str] = ()) -> None:
    """:func:`restore` of a state read from ``source``, which may be crafted or another run's: a state that is no
    dict or whose parts do not load is one :class:`UserError` naming the file (cut short: a strict load lists
    every key), and so are restored numbers that are not finite (:func:`_check_restored_numbers`)."""
    from effvision.errors import UserError

    try:
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a dict")
        restore(state, parts, optional)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise UserError(f"{source} is not a training state of this run ({type(error).__name__}: "
                        f"{str(error)[:300]})") from error
    _check_restored_numbers(parts, source)


def _check_restored_numbers(parts: Mapping[str, Stateful], source) -> None:
    """:class:`UserError` unless every restored learning rate and beta is a finite number >= 0 and every
    floating weight is finite: a NaN there trained every step and failed only when the model was saved."""
    from effvision.errors import UserError, short_repr

    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            for group in part.param_groups:
                numbers = [group.get("lr"), *group.get("betas", ())]
                if not all(isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                           for v in numbers):
                    raise UserError(f"{source}: {name}'s learning rate / betas {short_repr(numbers)} are not all "
                                    "finite and >= 0")
        elif isinstance(part, torch.nn.Module):
            for key, tensor in part.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise UserError(f"{source}: {name} weight {key} is not finite")


def process_rank() -> int:
    """This process's rank among torchrun's processes (0 when alone)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def progress_bar(iterable: Iterable | None = None, show: bool = True, **tqdm_options):
    """A tqdm bar over ``iterable``, shown only when ``show`` and this is rank 0 (or the only process). When
    stderr is no terminal (a log file, a scheduler), it is written at most every 30 s, not at every step."""
    import sys

    from tqdm import tqdm

    if not sys.stderr.isatty():
        tqdm_options.setdefault("mininterval", 30.0)
    return tqdm(iterable, disable=not show or process_rank() != 0, **tqdm_options)


def cosine_factor(step: int, total: int, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``step`` (from 0) of ``total``: ``(step + 1) / warmup`` for the first
    ``warmup`` steps, then a half cosine from 1 (step ``warmup``) to 0 (step ``total`` and later)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_lr(step: int, total: int, start: float, end: float) -> float:
    """Learning rate at ``step`` of ``total`` on a half cosine from ``start`` (step 0) down to ``end``."""
    return end + (start - end) * cosine_factor(step, total)


#: largest batch and crop a training command accepts (the batch's input alone is also held to a quarter of
#: this machine's memory by :func:`check_training_options`)
MAX_BATCH_SIZE = 4096
MAX_CROP = 8192


def check_training_options(
    *, steps: int, batch_size: int, lr: float, crop: int | None = None, minutes: float | None = None,
    min_steps: int = 1,
) -> None:
    """:class:`UserError` for options a training loop cannot run (before any image is read): steps below
    ``min_steps``, a batch of 1..:data:`MAX_BATCH_SIZE`, a crop of 1..:data:`MAX_CROP` px whose float32 batch
    fits in a quarter of memory, a finite positive learning rate and time limit. (NaN passed ``lr <= 0``
    checks and reached the optimizer.)"""
    from effvision.bounded_config import check_float32_fits
    from effvision.errors import UserError

    if steps < min_steps:
        raise UserError(f"--steps must be at least {min_steps}, got {steps}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {lr}")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a finite number > 0, got {minutes}")
    if crop is not None:
        if not 1 <= crop <= MAX_CROP:
            raise UserError(f"--crop must be between 1 and {MAX_CROP} pixels, got {crop}")
        check_float32_fits((batch_size, 3, crop, crop), f"a batch of {batch_size} crops of {crop} px (before any "
                           "activation)")


def load_image_folder(
    directory: str | os.PathLike, *, minimum_side: int = 1, uint8: bool = False, budget_bytes: int | None = None
) -> list:
    """Every image under ``directory`` (:func:`effvision.image_io.list_images`) at least ``minimum_side`` px on
    each side, read through :mod:`effvision.image_io` (pixel limit, EXIF orientation, alpha onto white): (3, H,
    W) float32 tensors in [0, 1], or (H, W, 3) uint8 arrays with ``uint8``. Training holds them all in memory, so
    their decoded size is held to ``budget_bytes`` (default: a quarter of this machine's memory): past it, a
    :class:`UserError` says after how many images (each is at most :data:`~effvision.image_io.MAX_PIXELS`).
    """
    from effvision.bounded_config import physical_memory_bytes
    from effvision.errors import UserError
    from effvision.image_io import list_images, load_image, to_uint8

    budget = physical_memory_bytes() // 4 if budget_bytes is None else budget_bytes
    images, used = [], 0
    paths = list_images(directory)
    for path in paths:
        image = load_image(path)
        if min(image.shape[1:]) < minimum_side:
            continue
        image = to_uint8(image) if uint8 else image
        used += image.nbytes
        if used > budget:
            raise UserError(
                f"the images in {directory} take more than {budget / 2**30:.1f} GiB decoded (a quarter of this "
                f"machine's memory) after {len(images) + 1} of {len(paths)}; train on fewer or smaller images"
            )
        images.append(image)
    if not images:
        raise UserError(f"no image of at least {minimum_side}x{minimum_side} pixels found in {directory}")
    return images
