"""Training loop for MambaIC: random crops, rate-distortion loss, aux loss, AMP, DDP, resume.

Loss (MambaIC / compressai convention, :class:`compressai.losses.RateDistortionLoss`):
``lambda * 255^2 * MSE + bpp`` or, with ``metric="ms-ssim"``, ``lambda * (1 - MS-SSIM) + bpp``, where bpp is
the likelihood estimate. The EntropyBottleneck quantiles get their own optimizer and ``aux_loss``. Runs on
one process or under ``torchrun`` (:class:`effvision.training.Distributed`): each rank draws its own crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from compressai.losses import RateDistortionLoss
from torch import Tensor

from effvision.codecs.base import evaluating
from effvision.codecs.mambaic.checkpoint import save_checkpoint
from effvision.codecs.mambaic.model import MambaIC
from effvision.codecs.metrics import ms_ssim_loss, psnr
from effvision.training import (
    Distributed,
    TimeLimit,
    cosine_lr,
    progress_bar,
    resume_training_state,
    save_training_state,
    state_dicts,
)


@dataclass
class TrainSettings:
    """Options of :func:`train` (see ``effvision train-codec --help``)."""

    lmbda: float = 0.0130
    metric: str = "mse"
    steps: int = 1000
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-4
    #: cosine decay of the learning rate from ``lr`` (step 0) to ``final_lr`` (step ``steps``); None: constant.
    final_lr: float | None = None
    aux_lr: float = 1e-3
    clip_grad: float = 1.0
    val_every: int = 200
    save_every: int = 200
    seed: int = 0
    amp: bool = True
    progress: bool = True
    max_seconds: float | None = None


#: settings a resumed run must share with the run it continues (the steps, the time limit, the validation and
#: checkpoint intervals and the progress bar may change)
RESUMED_SETTINGS = ("lmbda", "metric", "batch_size", "crop", "lr", "final_lr", "aux_lr", "clip_grad", "seed")


def check_resumed_settings(state: dict, settings: TrainSettings, source) -> None:
    """:class:`UserError` when ``settings`` differ from those the state at ``source`` was trained with (a
    changed ``--lambda`` or ``--lr`` on ``--resume`` was taken, or ignored, without a word, and the model was
    labelled with the new lambda). States written before the settings were stored are not checked."""
    from effvision.errors import UserError

    stored = state.get("settings")
    if not isinstance(stored, dict):
        return
    flags = {"lmbda": "--lambda", "metric": "--metric", "batch_size": "--batch-size", "crop": "--crop", "lr": "--lr",
             "final_lr": "--final-lr", "seed": "--seed"}
    changed = [f"{flags.get(name, name)} {stored[name]!r} -> {getattr(settings, name)!r}" for name in RESUMED_SETTINGS
               if name in stored and stored[name] != getattr(settings, name)]
    if changed:
        raise UserError(f"{source} was trained with other settings ({'; '.join(changed)}): resume with the same "
                        "ones, or start a new run in another --out")


def rate_distortion_loss(output: dict, target: Tensor, lmbda: float, metric: str = "mse") -> dict[str, Tensor]:
    """{"loss", "bpp", "mse"}: bpp = sum(-log2 likelihoods) / pixels; distortion per ``metric``."""
    if metric not in ("mse", "ms-ssim"):
        raise ValueError(f"unknown metric {metric!r}; use 'mse' or 'ms-ssim'")
    # float32: under bf16 autocast the log of small likelihoods would lose most of its precision
    output = {
        "x_hat": output["x_hat"].float(),
        "likelihoods": {name: likelihoods.float() for name, likelihoods in output["likelihoods"].items()},
    }
    losses = RateDistortionLoss(lmbda=lmbda, metric="mse")(output, target)
    if metric == "mse":
        return {"loss": losses["loss"], "bpp": losses["bpp_loss"], "mse": losses["mse_loss"]}
    # compressai's ms-ssim branch is pytorch_msssim with a fixed 11-tap window over 5 scales, which rejects
    # crops of 160 px or less (the demo trains on 64 px); ms_ssim_loss narrows the window to fit.
    distortion = lmbda * ms_ssim_loss(target, output["x_hat"].clamp(0, 1))
    return {"loss": distortion + losses["bpp_loss"], "bpp": losses["bpp_loss"], "mse": losses["mse_loss"]}


def random_crops(images: Sequence[Tensor], count: int, crop: int, generator: torch.Generator) -> Tensor:
    """(count, 3, crop, crop): random crops (random image, position, horizontal flip); images smaller
    than the crop are edge-padded."""
    crops = []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=generator))]
        pad_h, pad_w = max(0, crop - image.shape[1]), max(0, crop - image.shape[2])
        if pad_h or pad_w:
            image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
        top = int(torch.randint(image.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - crop + 1, (1,), generator=generator))
        patch = image[:, top : top + crop, left : left + crop]
        if bool(torch.randint(2, (1,), generator=generator)):
            patch = patch.flip(-1)
        crops.append(patch)
    return torch.stack(crops)


@torch.no_grad()
def validate(
    model: MambaIC, images: Sequence[Tensor], lmbda: float, metric: str, device: str | torch.device
) -> dict[str, float]:
    """Mean loss / estimated bpp / PSNR over whole validation images (eval mode)."""
    totals = {"loss": 0.0, "bpp": 0.0, "psnr": 0.0}
    with evaluating(model):  # every sub-module gets its own mode back, also after an error
        for image in images:
            x = image[None].to(device)
            out = model(x)
            losses = rate_distortion_loss(out, x, lmbda, metric)
            totals["loss"] += float(losses["loss"])
            totals["bpp"] += float(losses["bpp"])
            totals["psnr"] += psnr(x, out["x_hat"].clamp(0, 1))
    return {k: v / max(1, len(images)) for k, v in totals.items()}


def rate_distortion_optimizers(
    named_parameters: Sequence[tuple[str, torch.nn.Parameter]], lr: float, aux_lr: float
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """(main, aux) Adam optimizers, compressai's split: the EntropyBottleneck ``quantiles`` train only on
    ``aux_loss`` (their own optimizer), everything else that requires a gradient on the rate-distortion loss.
    The main optimizer's parameters are ``optimizer.param_groups[0]["params"]`` (for gradient clipping)."""
    main = [p for n, p in named_parameters if not n.endswith(".quantiles") and p.requires_grad]
    aux = [p for n, p in named_parameters if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=aux_lr)


def train(
    model: MambaIC,
    train_images: Sequence[Tensor],
    settings: TrainSettings,
    out_dir: str | Path | None = None,
    val_images: Sequence[Tensor] = (),
    resume: bool = False,
    device: str = "cpu",
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-step history ({"step", "loss", "bpp", "psnr"}).

    With ``out_dir``: writes ``train_state.pt`` ("model", "optimizer", "aux_optimizer", "step"; for
    ``resume``) every ``save_every`` steps and ``model.safetensors`` (CDFs built) at the end; rank 0 only.
    Under ``torchrun`` the process group is left running for the caller.
    """
    time_limit = TimeLimit(settings.max_seconds)
    distributed = Distributed.from_environment(device)
    device = distributed.device
    model.to(device).train()
    optimizer, aux_optimizer = rate_distortion_optimizers(list(model.named_parameters()), settings.lr, settings.aux_lr)
    parts = {"model": model, "optimizer": optimizer, "aux_optimizer": aux_optimizer}
    state_path = Path(out_dir) / "train_state.pt" if out_dir is not None else None
    state = resume_training_state(state_path, parts, map_location=device) if resume else None
    if state is not None:
        check_resumed_settings(state, settings, state_path)
    start = int(state["step"]) if state is not None else 0
    stored_settings = {name: getattr(settings, name) for name in RESUMED_SETTINGS}
    net = distributed.wrap(model, find_unused_parameters=True)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + distributed.rank + 7919 * start)
    use_amp = settings.amp and device.type == "cuda"
    history: list[dict[str, float]] = []
    bar = progress_bar(
        range(start, settings.steps), show=settings.progress, initial=start, total=settings.steps, desc="train-codec"
    )
    for step in bar:
        x = random_crops(train_images, settings.batch_size, settings.crop, generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = net(x)
        losses = rate_distortion_loss(out, x, settings.lmbda, settings.metric)
        losses["loss"].backward()
        if settings.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        if settings.final_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, settings.steps, settings.lr, settings.final_lr)
        optimizer.step()
        aux_optimizer.zero_grad(set_to_none=True)
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
        record = {
            "step": step + 1,
            "loss": float(losses["loss"].detach()),
            "bpp": float(losses["bpp"].detach()),
            "psnr": -10 * math.log10(max(float(losses["mse"].detach()), 1e-10)),
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", bpp=f"{record['bpp']:.3f}", psnr=f"{record['psnr']:.2f}")
        last = step + 1 == settings.steps or distributed.any_rank(time_limit.expired())
        if distributed.main and val_images and (last or (step + 1) % settings.val_every == 0):
            metrics = validate(model, val_images, settings.lmbda, settings.metric, device)
            bar.write(
                f"step {step + 1}: val loss {metrics['loss']:.4f} bpp {metrics['bpp']:.4f} psnr {metrics['psnr']:.2f}"
            )
        if distributed.main and state_path is not None and (last or (step + 1) % settings.save_every == 0):
            save_training_state(state_path, state_dicts(parts, step=step + 1, settings=stored_settings))
        if last and step + 1 < settings.steps:  # the time limit (a break stops tqdm's count one short, so the
            break  # last step ends the loop itself)
    if distributed.main and out_dir is not None:
        model.update(force=True)
        save_checkpoint(model, Path(out_dir) / "model.safetensors", extra={"lambda": str(settings.lmbda)})
    return history
