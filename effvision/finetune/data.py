"""ImageFolder train/val data for fine-tuning, checked up front so mistakes are clear errors.

Images are read through :func:`effvision.image_io.open_image` (size checked from the header before decoding,
EXIF orientation, clear errors for corrupt files) and :func:`effvision.image_io.rgb_image`. An unreadable
*training* image is skipped with a warning naming it (the next readable image of the folder takes its place, as
in timm's datasets), up to :data:`MAX_UNREADABLE_IN_A_ROW` in a row; an unreadable *validation* image is an
error naming it, so that top-1 is always measured on the whole split.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn
from torchvision.datasets import ImageFolder

from effvision.errors import UserError, names_for_message

#: consecutive unreadable training images after which the run stops (a folder of non-images, not a stray file)
MAX_UNREADABLE_IN_A_ROW = 20
#: how a :class:`UserError` raised in a DataLoader worker process names its type in the message it comes back with
_WORKER_ERROR_LINE = "effvision.errors.UserError: "


class UnreadableImageWarning(UserWarning):
    """A training image could not be read and was skipped."""


def model_image_size(model: nn.Module) -> tuple[int, int]:
    """The image size the model is built for: its patch embedding's (ViTs), else its pretrained config's input
    size (any other timm model, e.g. ``resnet18``, which has no ``patch_embed``)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:])
    return (size, size) if isinstance(size, int) else tuple(size)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the base weights were trained with (timm's pretrained config; ImageNet defaults)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def build_transforms(model: nn.Module, train: bool):
    """Train: resize, random crop, horizontal flip; val: resize (crop ratio 0.875), center crop."""
    from torchvision import transforms

    height, width = model_image_size(model)
    mean, std = normalization(model)
    resize = (round(height / 0.875), round(width / 0.875))
    steps = [transforms.Resize(resize)]
    if train:
        steps += [transforms.RandomCrop((height, width)), transforms.RandomHorizontalFlip()]
    else:
        steps += [transforms.CenterCrop((height, width))]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise UserError(
            f"dataset folder {split_dir} does not exist (expected DATA/train/<class>/<image> and DATA/val/...)"
        )
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"dataset folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    return classes


def check_splits(data_dir: str | Path) -> list[str]:
    """Class names shared by ``data_dir/train`` and ``data_dir/val``; a :class:`UserError` otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"dataset folder {data_dir} does not exist")
    train, val = class_names(data_dir / "train"), class_names(data_dir / "val")
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise UserError(
            f"train and val classes differ: only in train {names_for_message(only_train)}, "
            f"only in val {names_for_message(only_val)}"
        )
    return train


def load_rgb(path: str):
    """ImageFolder's loader: the image at ``path`` as an RGB Pillow image (:class:`UserError` if unreadable)."""
    from effvision.image_io import open_image, rgb_image

    return rgb_image(open_image(path))


class CheckedImageFolder(ImageFolder):
    """ImageFolder through :func:`load_rgb`; ``skip_unreadable`` replaces an unreadable image by the next readable
    one (with an :class:`UnreadableImageWarning`). Samples are (transformed image, class index)."""

    def __init__(self, root: str, transform, skip_unreadable: bool) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skip_unreadable = skip_unreadable
        self.warned: set[str] = set()  # files already reported as unreadable (per process)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's :func:`~torchvision.datasets.folder.make_dataset` (same samples, same order), except that
        each real directory of a class is walked once: its walk follows symlinks, so a link back up the tree
        (``ln -s .. loop``) repeated every image and two of them made the walk exponential (5 GB, minutes)."""
        import os

        from torchvision.datasets.folder import has_file_allowed_extension

        if (extensions is None) == (is_valid_file is None):
            raise ValueError("Both extensions and is_valid_file cannot be None or not None at the same time")
        if is_valid_file is None:
            def is_valid_file(path: str) -> bool:
                return has_file_allowed_extension(path, extensions)

        instances: list[tuple[str, int]] = []
        found: set[str] = set()
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(os.path.expanduser(directory), target_class)
            if not os.path.isdir(target_dir):
                continue
            walked: list[tuple[str, list[str]]] = []
            visited: set[tuple[int, int]] = set()
            for root, dirs, files in os.walk(target_dir, followlinks=True):
                status = os.stat(root)
                if (status.st_dev, status.st_ino) in visited:
                    dirs[:] = []  # reached again through a link: its files are listed already
                    continue
                visited.add((status.st_dev, status.st_ino))
                walked.append((root, files))
            for root, files in sorted(walked):
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if is_valid_file(path):
                        instances.append((path, class_to_idx[target_class]))
                        found.add(target_class)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:
            names = extensions if isinstance(extensions, str) else ", ".join(extensions or ())
            supported = f"; supported extensions: {names}" if extensions is not None else ""
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}{supported}")
        return instances

    def __getitem__(self, index: int):
        if not self.skip_unreadable:
            return super().__getitem__(index)
        for attempt in range(MAX_UNREADABLE_IN_A_ROW):
            try:
                return super().__getitem__((index + attempt) % len(self.samples))
            except UserError as error:
                path = self.samples[(index + attempt) % len(self.samples)][0]
                if path not in self.warned:  # once per file (a folder of three bad files printed forty lines)
                    self.warned.add(path)
                    warnings.warn(f"skipped an unreadable training image: {error}", UnreadableImageWarning,
                                  stacklevel=2)
        raise UserError(
            f"{MAX_UNREADABLE_IN_A_ROW} training images in a row could not be read, from "
            f"{self.samples[index % len(self.samples)][0]} on (the warnings above name each one)"
        )


def image_folder(split_dir: str | Path, transform, expected_classes: list[str] | None = None,
                 skip_unreadable: bool = False):
    """``torchvision.datasets.ImageFolder`` reading through :func:`load_rgb`, with clear errors for empty folders
    and class mismatches; ``skip_unreadable`` for training splits (module docstring)."""
    try:
        dataset = CheckedImageFolder(str(split_dir), transform, skip_unreadable)
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"cannot read images from {split_dir}: {error}") from error
    if expected_classes is not None and dataset.classes != list(expected_classes):
        raise UserError(
            f"classes of {split_dir} {names_for_message(dataset.classes)} differ from the run's classes "
            f"{names_for_message(list(expected_classes))}"
        )
    return dataset


def loader_error(error: UserError) -> UserError:
    """``error`` as the user should see it: a :class:`UserError` raised in a DataLoader worker process comes back
    with the worker's whole traceback in its message; only the original message is kept."""
    text = str(error)
    if text.startswith("Caught UserError in DataLoader worker") and _WORKER_ERROR_LINE in text:
        return UserError(text.rsplit(_WORKER_ERROR_LINE, 1)[1].strip())
    return error
