"""The fine-tuning loop: AdamW on the trainable parameters, cosine schedule, AMP on CUDA, DDP.

One process: ``run_finetune(config, output)``. Several (GPUs or nodes): launch the same command with
``torchrun``; each process trains on its shard (``DistributedSampler``) through
``DistributedDataParallel`` (:class:`effvision.training.Distributed`: NCCL on CUDA, gloo on CPU) and rank 0
writes the run folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from effvision.bounded_config import Limit, check_timm_model, checked_fields, read_json_object
from effvision.errors import UserError, names_for_message, short_repr
from effvision.finetune import checkpoint
from effvision.finetune.data import build_transforms, check_splits, image_folder, loader_error
from effvision.io_utils import read_bytes
from effvision.torch_checkpoint import check_base_weights_loaded, recorded_weight_loads
from effvision.training import (
    Distributed,
    TimeLimit,
    cosine_factor,
    load_training_state,
    progress_bar,
    restore_checked,
    save_training_state,
    state_dicts,
)

# config fields that may differ when a run is resumed (they do not change what is trained)
RESUMABLE_CHANGES = ("workers", "device")
#: data-loading processes a run may ask for
MAX_WORKERS = 64
#: a run folder's config.json: ImageNet-21k's 21841 class names take about 0.3 MB
MAX_RUN_CONFIG_BYTES = 8 * 2**20
#: what a run's config.json may ask for (its model, data folder and classes are checked where they are used)
RUN_CONFIG_LIMITS: dict[str, Limit] = {
    "data": Limit(1, 4096, "str"),
    "model": Limit(1, 256, "str"),
    "checkpoint": Limit(1, 4096, "str"),
    "epochs": Limit(1, 10**6),
    "batch_size": Limit(1, 2**16),
    "lr": Limit(1e-12, 10, "float"),
    "weight_decay": Limit(0, 10, "float"),
    "warmup_epochs": Limit(0, 10**6, "float"),
    "seed": Limit(0, 2**63 - 1),
    "workers": Limit(0, MAX_WORKERS),
    "device": Limit(1, 64, "str"),
}


@dataclass
class FinetuneConfig:
    """Everything that defines a run (saved as ``config.json``)."""

    data: str
    model: str
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    classes: list[str] = field(default_factory=list)


def read_run_config(path: Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` saved in a run folder's ``config.json``, which may be crafted: a bounded JSON
    object, each field of its type and within :data:`RUN_CONFIG_LIMITS` (fields this version does not know are
    ignored). The model options are checked when the model is built
    (:func:`effvision.bounded_config.check_timm_model`).

    Raises:
        UserError: naming ``path`` and the field.
    """
    try:
        text = read_bytes(path, MAX_RUN_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: cannot read a run's config ({error})") from error
    values = read_json_object(text, str(path), "run config", MAX_RUN_CONFIG_BYTES)
    given = {key: value for key, value in values.items() if value is not None}  # null: the default (no checkpoint)
    fields = checked_fields(given, RUN_CONFIG_LIMITS, str(path), "run config")
    try:
        for key in ("data", "model"):
            if key not in fields:
                raise ValueError(f"{key} is missing")
        if not isinstance(values.get("pretrained", False), bool):
            raise ValueError(f"pretrained must be true or false, got {short_repr(values['pretrained'])}")
        fields["pretrained"] = values.get("pretrained", False)
        kwargs = values.get("model_kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"model_kwargs must be a JSON object, got {type(kwargs).__name__}")
        fields["model_kwargs"] = kwargs
        classes = values.get("classes", [])
        if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
            raise ValueError("classes must be a non-empty list of folder names")
        fields["classes"] = classes
    except ValueError as error:
        raise UserError(f"{path}: bad run config: {error}") from error
    return FinetuneConfig(**fields)


def create_model(config: FinetuneConfig) -> nn.Module:
    """Build ``config.model`` with its kwargs, the run's class count and base weights.

    Frozen weights come from the base weights (``pretrained``: timm's hub weights; ``checkpoint``: a
    local file); with neither, from a random init seeded by ``config.seed`` (so a saved run reloads).
    """
    import timm

    import effvision  # noqa: F401 - registers the effvision model names with timm

    if not timm.is_model(config.model):
        raise UserError(f"unknown model {config.model!r} (any timm or effvision registered name)")
    kwargs = dict(config.model_kwargs)
    kwargs["num_classes"] = len(config.classes)
    check_timm_model(config.model, kwargs)
    pretrained = config.pretrained
    if config.checkpoint is not None:
        from effvision.torch_checkpoint import check_weights_file

        try:  # a regular file, no code run, tensors backed by the bytes they claim
            check_weights_file(config.checkpoint)
        except UserError as error:
            raise UserError(f"cannot load the base checkpoint {config.checkpoint}: {error}") from error
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(config.checkpoint).resolve()))
    torch.manual_seed(config.seed)
    try:
        with recorded_weight_loads() as loads:
            model = timm.create_model(config.model, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"cannot build {config.model} with {config.model_kwargs}: {error}") from error
    except Exception as error:  # noqa: BLE001 - the model built on the meta device, so loading its weights failed
        if config.checkpoint is None:
            from effvision.timm_models import weights_download_error

            download = weights_download_error(config.model, error) if pretrained else None
            if download is None:
                raise
            raise download from error
        raise UserError(
            f"cannot load the base checkpoint {config.checkpoint} into {config.model} "
            f"({type(error).__name__}: {str(error)[:500]})"
        ) from error
    if config.checkpoint is not None:
        check_base_weights_loaded(model, loads, config.checkpoint, config.model)
        from effvision.bounded_config import check_finite

        check_finite(model.state_dict(), str(config.checkpoint))  # NaN base weights trained to a NaN loss, saved
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # "gpu": torch's "Expected one of cpu, cuda, ..." traceback
        raise UserError(f"--device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return device


def autocast(device: torch.device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, distributed: Distributed, show: bool = False) -> float:
    """Top-1 accuracy (%) over the loader's images, summed over all processes."""
    model.eval()
    correct = count = 0
    for images, labels in progress_bar(loader, show=show, desc="val", leave=False):
        images, labels = images.to(device), labels.to(device)
        with autocast(device):
            logits = model(images)
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        count += labels.numel()
    correct, count = distributed.sum([correct, count])
    return 100.0 * correct / max(count, 1)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, epoch: int, show: bool,
                    stop: Callable[[], bool] | None = None) -> dict:
    """One pass over ``loader``; returns this process's loss sum, correct count, images seen and seconds, and
    ``stopped``: whether ``stop()`` (asked after every step, e.g. a time limit) ended the pass early."""
    model.train()
    loss_sum = correct = seen = 0.0
    start = time.perf_counter()
    progress = progress_bar(loader, show=show, desc=f"epoch {epoch + 1}", leave=False)
    for images, labels in progress:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        batch = labels.numel()
        loss_sum += loss.item() * batch
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        seen += batch
        elapsed = time.perf_counter() - start
        progress.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                             img_s=f"{seen / max(elapsed, 1e-9):.1f}")
        if stop is not None and stop():
            progress.close()
            return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": elapsed, "stopped": True}
    elapsed = time.perf_counter() - start
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": elapsed, "stopped": False}


#: config fields that name files: the same file spelt another way (relative, absolute) is no difference
PATH_FIELDS = ("data", "checkpoint")


def _same_path(saved, current, run_folder: Path) -> bool:
    """Whether two config values name one file or folder (earlier runs stored paths as typed, relative to the
    folder they were started from: such a path is also tried relative to the run folder's parent)."""
    if not isinstance(saved, str) or not isinstance(current, str):
        return False
    here = Path(current).resolve()
    candidates = [Path(saved), run_folder.parent / saved]
    return any(Path(candidate).resolve() == here for candidate in candidates)


def prepare_output(config: FinetuneConfig, output: Path, resume: bool) -> dict | None:
    """Check the run folder; returns the training state to resume from (None: fresh run)."""
    if output.exists() and not output.is_dir():  # it said "cannot write OUT/config.json: File exists"
        raise UserError(f"--output {output} exists and is not a folder")
    config_path = output / checkpoint.CONFIG
    if not resume:
        trained = any((output / name).exists() for name in (checkpoint.STATE, checkpoint.WEIGHTS))
        if config_path.exists() and trained:
            raise UserError(f"{output} already holds a run: pass --resume to continue it, or choose another --output")
        return None  # a config.json alone is a run that failed before its first epoch ended: it is replaced
    if not config_path.exists():
        raise UserError(f"nothing to resume: {config_path} does not exist")
    saved = json.loads(json.dumps(asdict(read_run_config(config_path))))
    current = json.loads(json.dumps(asdict(config)))  # as saved: tuples become lists
    differences = [key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]
                   and not (key in PATH_FIELDS and _same_path(saved.get(key), current[key], config_path.parent))]
    if differences:
        details = ", ".join(f"{key}: run {short_repr(saved.get(key), 200)}, now {short_repr(current[key], 200)}"
                            for key in differences)
        raise UserError(f"cannot resume {output} with a different config ({details})")
    state_path = output / checkpoint.STATE
    if not state_path.exists() and (output / checkpoint.WEIGHTS).exists():  # it would train from scratch over them
        raise UserError(f"cannot resume {output}: it holds trained weights but no {checkpoint.STATE} (their optimizer "
                        "and epoch); start a new run in another folder")
    return load_training_state(state_path) if state_path.exists() else None


def restore_run_state(state: dict, parts: dict, config: FinetuneConfig, source: Path) -> tuple[list, int]:
    """Load a resumed run's training state into ``parts`` (optimizer, scheduler, scaler); returns (history, epochs
    done). A run folder may be crafted: a state this loop did not write is a :class:`UserError` naming the file, and
    so are epochs outside [0, ``config.epochs``] and learning rates that are not finite and >= 0 (a NaN one trained
    NaN weights and reported success)."""
    import math

    restore_checked(state, parts, source)  # the optimizer's learning rates and betas are checked there
    try:
        history, epochs_done = list(state["history"]), state["epochs_done"]
    except (KeyError, TypeError) as error:
        raise UserError(f"{source} is not a training state of this run ({type(error).__name__}: "
                        f"{str(error)[:200]})") from error
    if isinstance(epochs_done, bool) or not isinstance(epochs_done, int) or not 0 <= epochs_done <= config.epochs:
        raise UserError(f"{source}: {short_repr(epochs_done, 40)} epochs done, outside [0, {config.epochs}]")
    rates = parts["scheduler"].base_lrs  # the schedule restarts from these
    if not all(isinstance(rate, float | int) and math.isfinite(rate) and rate >= 0 for rate in rates):
        raise UserError(f"{source}: learning rates {short_repr(rates)} are not all finite and >= 0")
    return history, epochs_done


def run_finetune(config: FinetuneConfig, output: str | Path, resume: bool = False, show: bool = True,
                 max_minutes: float | None = None) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` into the run folder ``output``.

    ``max_minutes`` is a wall-clock budget, asked after every step (on every process alike): when it runs out
    the run stops, keeping the checkpoint of its last complete epoch (``resume=True`` continues from there; the
    unfinished epoch is trained again). It is not part of the run's config, so a resumed run may change it.

    Returns {"val_top1" (of the last complete epoch; None if none), "history" (per epoch), "trainable", "total",
    "stopped" (the time limit ended the run)}.
    """
    if max_minutes is not None and not max_minutes > 0:
        raise UserError(f"--minutes (the time limit) must be positive, got {max_minutes}")
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    from effvision.peft.sparse_tuning import trainable_parameter_report

    for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "workers"):
        try:  # the limits a saved run's config.json is held to (NaN passed "lr <= 0" and reached AdamW)
            RUN_CONFIG_LIMITS[name].check(f"--{name.replace('_', '-')}", getattr(config, name))  # as typed
        except ValueError as error:
            raise UserError(str(error)) from None
    output = Path(output)
    config.classes = check_splits(config.data)
    resumed = prepare_output(config, output, resume)
    distributed = Distributed.from_environment(resolve_device(config.device))
    device = distributed.device
    try:
        model = create_model(config).to(device)
        if resumed is not None:
            checkpoint.load_weights(model, output / checkpoint.WEIGHTS)
        report = trainable_parameter_report(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError(f"{config.model} has no trainable parameters")

        data = Path(config.data)
        train_set = image_folder(data / "train", build_transforms(model, train=True), config.classes,
                                 skip_unreadable=True)
        val_set = image_folder(data / "val", build_transforms(model, train=False), config.classes)
        if len(train_set) == 0 or len(val_set) == 0:
            raise UserError(f"{data} has an empty train or val split")
        sampler = DistributedSampler(train_set, seed=config.seed) if distributed.enabled else None
        generator = torch.Generator().manual_seed(config.seed)
        shard_size = len(sampler) if sampler is not None else len(train_set)  # keep >= 1 step per epoch
        batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        if batch_norm and min(shard_size, config.batch_size) < 2:  # every training batch is full but a lone one
            raise UserError(
                f"{config.model} has BatchNorm layers (e.g. CLCA's aggregation head), which need at least 2 images "
                f"in every training batch: use --batch-size 2 or more (and 2 or more training images per process)"
            )
        train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                                  num_workers=config.workers, drop_last=shard_size > config.batch_size,
                                  generator=generator, pin_memory=device.type == "cuda")
        val_shard = Subset(val_set, range(distributed.rank, len(val_set), distributed.world_size))  # no padding
        val_loader = DataLoader(val_shard, batch_size=config.batch_size, num_workers=config.workers)

        trained = distributed.wrap(model)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = len(train_loader)
        total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total, warmup))
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
        parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        history, first_epoch = [], 0
        time_limit = TimeLimit(None if max_minutes is None else 60 * max_minutes)
        stop = (lambda: distributed.any_rank(time_limit.expired())) if max_minutes is not None else None
        stopped = False
        if resumed is not None:
            history, first_epoch = restore_run_state(resumed, parts, config, output / checkpoint.STATE)
        if distributed.main:
            checkpoint.save_json(output / checkpoint.CONFIG, asdict(config))

        for epoch in range(first_epoch, config.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            generator.manual_seed(config.seed + epoch)  # same order whether or not the run was resumed
            # augmentation in this process (--workers 0) draws from torch's global generator: seeded per epoch
            # too, or a resumed run drew other crops and flips than an uninterrupted one
            torch.manual_seed(config.seed + epoch + distributed.rank * 1_000_003)
            stats = train_one_epoch(trained, train_loader, optimizer, scheduler, scaler, device, epoch, show, stop)
            if stats["stopped"]:
                stopped = True
                if distributed.main and show:
                    print(f"time limit of {max_minutes:g} min reached in epoch {epoch + 1}: {epoch} of "
                          f"{config.epochs} epochs saved in {output}; continue with --resume", flush=True)
                break
            loss_sum, correct, seen = distributed.sum([stats["loss_sum"], stats["correct"], stats["seen"]])
            top1 = evaluate(model, val_loader, device, distributed, show)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                      "val_top1": top1, "img_per_s": seen / max(stats["seconds"], 1e-9)}
            history.append(record)
            if distributed.main:
                checkpoint.save_weights(model, output / checkpoint.WEIGHTS)
                save_training_state(output / checkpoint.STATE,
                                    state_dicts(parts, epochs_done=epoch + 1, history=history))
                checkpoint.save_json(output / checkpoint.METRICS, history)
                if show:
                    print(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f} "
                          f"train acc {record['train_acc']:.1f}% val top-1 {top1:.2f}% "
                          f"({record['img_per_s']:.1f} img/s)", flush=True)
        if history:
            final = history[-1]["val_top1"]
        else:  # no epoch to train (all done before a resume), or stopped in the first: None, nothing was saved
            final = None if stopped else evaluate(model, val_loader, device, distributed)
        return {"val_top1": final, "history": history, "trainable": report["trainable"], "total": report["total"],
                "stopped": stopped}
    except UserError as error:
        raise loader_error(error) from None
    finally:
        distributed.close()


def evaluate_run(run_dir: str | Path, data: str | None = None, batch_size: int | None = None,
                 device: str = "auto", show: bool = True) -> float:
    """Top-1 (%) of a saved run on ``data/val`` (default: the run's own data folder)."""
    from torch.utils.data import DataLoader

    from effvision.training import MAX_BATCH_SIZE

    if batch_size is not None and not 1 <= batch_size <= MAX_BATCH_SIZE:  # 0 meant the run's, -3 a raw ValueError
        raise UserError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")

    run_dir = Path(run_dir)
    config_path, weights = run_dir / checkpoint.CONFIG, run_dir / checkpoint.WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise UserError(f"{run_dir} is not a fine-tuning run with a finished epoch (no {checkpoint.WEIGHTS})")
    config = read_run_config(config_path)
    data = Path(data or config.data)
    classes = check_splits(data) if (data / "train").is_dir() else None
    if classes is not None and classes != config.classes:
        raise UserError(f"classes of {data} {names_for_message(classes)} differ from the run's classes "
                        f"{names_for_message(config.classes)}")
    target = resolve_device(device)
    model = create_model(config)
    checkpoint.load_weights(model, weights)
    model.to(target)
    val_set = image_folder(data / "val", build_transforms(model, train=False), config.classes)
    loader = DataLoader(val_set, batch_size=batch_size or config.batch_size, num_workers=config.workers)
    try:
        return evaluate(model, loader, target, Distributed(device=target), show)
    except UserError as error:
        raise loader_error(error) from None
