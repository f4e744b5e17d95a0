"""Training loop for MambaIC: random crops, rate-distortion loss, aux loss, AMP, DDP, resume.

Loss (MambaIC / compressai convention): ``lambda * 255^2 * MSE + bpp`` or, with ``metric="ms-ssim"``,
``lambda * (1 - MS-SSIM) + bpp``, where bpp is the likelihood estimate. The EntropyBottleneck
quantiles get their own optimizer and ``aux_loss``. Runs on one process or under ``torchrun``
(DistributedDataParallel; gloo on CPU, nccl on CUDA): each rank draws its own crops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from effvision.codecs.mambaic.checkpoint import save_checkpoint
from effvision.codecs.mambaic.model import MambaIC
from effvision.codecs.metrics import ms_ssim_loss, psnr


@dataclass
class TrainSettings:
    """Options of :func:`train` (see ``effvision train-codec --help``)."""

    lmbda: float = 0.0130
    metric: str = "mse"
    steps: int = 1000
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-4
    aux_lr: float = 1e-3
    clip_grad: float = 1.0
    val_every: int = 200
    save_every: int = 200
    seed: int = 0
    amp: bool = True
    progress: bool = True
    max_seconds: float | None = None


def rate_distortion_loss(output: dict, target: Tensor, lmbda: float, metric: str = "mse") -> dict[str, Tensor]:
    """{"loss", "bpp", "mse"}: bpp = sum(-log2 likelihoods) / pixels; distortion per ``metric``."""
    batch, _, height, width = target.shape
    pixels = batch * height * width
    bpp = sum(torch.log(lik.float()).sum() for lik in output["likelihoods"].values()) / (-math.log(2) * pixels)
    x_hat = output["x_hat"].float()
    mse = F.mse_loss(x_hat, target)
    if metric == "mse":
        distortion = lmbda * 255**2 * mse
    elif metric == "ms-ssim":
        distortion = lmbda * ms_ssim_loss(target, x_hat.clamp(0, 1))
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'mse' or 'ms-ssim'")
    return {"loss": distortion + bpp, "bpp": bpp, "mse": mse}


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
def validate(model: MambaIC, images: Sequence[Tensor], lmbda: float, metric: str, device: str) -> dict[str, float]:
    """Mean loss / estimated bpp / PSNR over whole validation images (eval mode)."""
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "bpp": 0.0, "psnr": 0.0}
    for image in images:
        x = image[None].to(device)
        out = model(x)
        losses = rate_distortion_loss(out, x, lmbda, metric)
        totals["loss"] += float(losses["loss"])
        totals["bpp"] += float(losses["bpp"])
        totals["psnr"] += psnr(x, out["x_hat"].clamp(0, 1))
    model.train(was_training)
    return {k: v / max(1, len(images)) for k, v in totals.items()}


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizers(model: MambaIC, settings: TrainSettings):
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles") and p.requires_grad]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=settings.lr), torch.optim.Adam(aux, lr=settings.aux_lr)


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

    With ``out_dir``: writes ``train_state.pt`` (weights + optimizers + step, for ``resume``) every
    ``save_every`` steps and ``model.safetensors`` (CDFs built) at the end; rank 0 only.
    """
    import time

    from tqdm import tqdm

    started = time.monotonic()
    rank, world = _distributed()
    model.to(device).train()
    optimizer, aux_optimizer = _optimizers(model, settings)
    start = 0
    state_path = Path(out_dir) / "train_state.pt" if out_dir is not None else None
    if resume and state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        aux_optimizer.load_state_dict(state["aux_optimizer"])
        start = int(state["step"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + rank + 7919 * start)
    use_amp = settings.amp and device.startswith("cuda")
    history: list[dict[str, float]] = []
    bar = tqdm(range(start, settings.steps), disable=not settings.progress or rank != 0, desc="train-codec")
    for step in bar:
        x = random_crops(train_images, settings.batch_size, settings.crop, generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = net(x)
        losses = rate_distortion_loss(out, x, settings.lmbda, settings.metric)
        losses["loss"].backward()
        if settings.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
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
        out_of_time = settings.max_seconds is not None and time.monotonic() - started > settings.max_seconds
        if world > 1:
            # every rank must stop at the same step (DDP collectives)
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item() > 0)
        last = step + 1 == settings.steps or out_of_time
        if rank == 0 and val_images and (last or (step + 1) % settings.val_every == 0):
            metrics = validate(model, val_images, settings.lmbda, settings.metric, device)
            bar.write(
                f"step {step + 1}: val loss {metrics['loss']:.4f} bpp {metrics['bpp']:.4f} psnr {metrics['psnr']:.2f}"
            )
        if rank == 0 and state_path is not None and (last or (step + 1) % settings.save_every == 0):
            _save_state(state_path, model, optimizer, aux_optimizer, step + 1)
        if last:
            break
    if rank == 0 and out_dir is not None:
        model.update(force=True)
        save_checkpoint(model, Path(out_dir) / "model.safetensors", extra={"lambda": str(settings.lmbda)})
    return history


def _save_state(path: Path, model: MambaIC, optimizer, aux_optimizer, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "aux_optimizer": aux_optimizer.state_dict(),
            "step": step,
        },
        temp,
    )
    os.replace(temp, path)
