"""ImageFolder train/val data for fine-tuning, checked up front so mistakes are clear errors."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from effvision.errors import UserError


def model_image_size(model: nn.Module) -> tuple[int, int]:
    size = model.patch_embed.img_size
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
            f"train and val classes differ: only in train {only_train}, only in val {only_val}"
        )
    return train


def image_folder(split_dir: str | Path, transform, expected_classes: list[str] | None = None):
    """``torchvision.datasets.ImageFolder`` with clear errors for empty folders and class mismatches."""
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(split_dir), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"cannot read images from {split_dir}: {error}") from error
    if expected_classes is not None and dataset.classes != list(expected_classes):
        raise UserError(
            f"classes of {split_dir} {dataset.classes} differ from the run's classes {list(expected_classes)}"
        )
    return dataset
