"""Training loops for the VQGAN codec: the autoencoder (from scratch or codebook fine-tuning) and the
lost-index restorer. Progress bars, periodic checkpoints, resume and the time limit come from
:mod:`effvision.training`.

Mao et al. (DCC 2024) fine-tune the clustered codebook and the quant convs with the encoder/decoder
frozen (``mode="codebook"``) under taming's VQGAN loss. Here: L1 + codebook/commitment loss, plus an optional
hinge-loss PatchGAN term (``gan_weight``; Isola et al. 2017 / Esser et al. 2021). taming's LPIPS perceptual
term is not included: its VGG weights cannot be shipped or fetched offline. The small demo model is trained
from scratch (``mode="full"``) with L1 + codebook losses only; unused codebook entries are re-seeded from
encoder outputs so the codebook stays alive on a tiny data set (a training-time aid: the quantiser math is
unchanged). ``mode="decoder"`` (our extension) trains only the decoder side for the indices the frozen encoder
and codebook send, so index model, clustered codebooks and restorer stay valid; with ``colour_band_loss`` its
loss is taken after the colour band's correction, so the decoder spends itself on structure, not on the low
band that the band codes anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effvision.codecs.metrics import ms_ssim_loss
from effvision.codecs.vqgan.colour_band import low_band_corrected
from effvision.codecs.vqgan.restoration import IndexRestorer, random_mask
from effvision.codecs.vqgan.taming import VQModel
from effvision.training import (
    TimeLimit,
    progress_bar,
    restore_generators,
    resume_training_state,
    save_training_state,
    state_dicts,
)


class RandomCrops:
    """Random square crops (with horizontal flips) from a list of uint8 (H, W, 3) photos, as (B, 3, S, S) in
    [-1, 1]. Photos smaller than the crop are skipped."""

    def __init__(self, photos: Sequence[np.ndarray], crop: int, seed: int = 0) -> None:
        self.photos = [torch.from_numpy(np.array(p, dtype=np.uint8)).permute(2, 0, 1) for p in photos]
        self.photos = [p for p in self.photos if p.shape[1] >= crop and p.shape[2] >= crop]
        if not self.photos:
            raise ValueError(f"no training photo is at least {crop}x{crop} pixels")
        self.crop = crop
        self.generator = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self, batch: int) -> Tensor:
        crops = []
        for _ in range(batch):
            photo = self.photos[self._randint(len(self.photos))]
            top = self._randint(photo.shape[1] - self.crop + 1)
            left = self._randint(photo.shape[2] - self.crop + 1)
            crop = photo[:, top : top + self.crop, left : left + self.crop]
            if self._randint(2):
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.stack(crops).float() / 127.5 - 1.0


GAN_PARTS = ("discriminator", "discriminator_optimizer")


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    mode: str = "full"  # "full": everything; "codebook": codebook + quant convs; "decoder": decoder + post-quant conv
    checkpoint_every: int = 200
    restart_dead_every: int = 100  # 0 disables dead-code re-seeding
    max_minutes: float | None = None
    gan_weight: float = 0.0  # > 0 adds the hinge PatchGAN term
    gan_start: int = 0  # step at which the adversarial term starts
    msssim_weight: float = 0.0  # > 0 adds weight * (1 - MS-SSIM) to the L1 term (crops over 160 px)
    l1_weight: float = 1.0  # weight of the L1 term (on the model's [-1, 1] scale)
    colour_band_loss: bool = False  # take L1 and MS-SSIM after the colour band's correction (see colour_band)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam's


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with LeakyReLU -> (B, 1, h', w') real/fake logits per patch."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        current = width
        for layer in range(1, layers + 1):
            following = width * min(2**layer, 8)
            stride = 2 if layer < layers else 1
            modules += [nn.Conv2d(current, following, 4, stride, 1), nn.GroupNorm(32, following), nn.LeakyReLU(0.2)]
            current = following
        modules.append(nn.Conv2d(current, 1, 4, 1, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def _trainable_parameters(model: VQModel, mode: str) -> list[nn.Parameter]:
    if mode == "full":
        return list(model.parameters())
    if mode == "codebook":
        for module in (model.encoder, model.decoder):
            module.requires_grad_(False)
        return [*model.quantize.parameters(), *model.quant_conv.parameters(), *model.post_quant_conv.parameters()]
    if mode == "decoder":  # the indices an encoder sends stay those of the frozen encoder and codebook
        for module in (model.encoder, model.quant_conv, model.quantize):
            module.requires_grad_(False)
        return [*model.post_quant_conv.parameters(), *model.decoder.parameters()]
    raise ValueError(f"unknown training mode {mode!r}; use 'full', 'codebook' or 'decoder'")


@torch.no_grad()
def reseed_dead_codes(model: VQModel, usage: Tensor, latents: Tensor, generator: torch.Generator) -> int:
    """Replace codebook rows with zero usage by random pre-quantisation latents (B, D, h, w). Returns count."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.randint(flat.shape[0], (dead.numel(),), generator=generator)
    model.quantize.embedding.weight[dead] = flat[picks] + 0.01 * flat.std() * torch.randn(
        dead.numel(), flat.shape[1], generator=generator
    )
    return int(dead.numel())


def train_autoencoder(
    model: VQModel,
    crops: RandomCrops,
    settings: TrainSettings,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    quantizers: Sequence[nn.Module] = (),
) -> dict:
    """Train ``model`` on random crops; returns {"step", "l1", "codebook_loss", "codes_used"} of the end.

    ``quantizers`` (``mode="decoder"`` only): step ``i`` codes its crops with ``quantizers[i % len]`` instead of
    the model's own codebook, e.g. the K-means-clustered codebooks of every shipped quality (the decoder is shared
    by all of them, see :meth:`VQGANCodec.cluster`)."""
    if quantizers and settings.mode != "decoder":
        raise ValueError("quantizers other than the model's own need mode='decoder' (their codebooks stay frozen)")
    time_limit = TimeLimit(None if settings.max_minutes is None else 60 * settings.max_minutes)
    parameters = _trainable_parameters(model, settings.mode)
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, betas=settings.betas)
    parts = {"model": model, "optimizer": optimizer}
    discriminator = PatchDiscriminator() if settings.gan_weight > 0 else None
    if discriminator is not None:
        discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=(0.5, 0.9))
        parts.update(discriminator=discriminator, discriminator_optimizer=discriminator_optimizer)
    # a run that adds the GAN term to a checkpoint trained without it starts a fresh discriminator
    state = resume_training_state(checkpoint_path, parts, optional=GAN_PARTS) if resume else None
    start = int(state["step"]) if state is not None else 0
    generator = torch.Generator().manual_seed(1234 + start)
    if state is not None:  # the crops and re-seeding go on where they were (they replayed the first steps' crops)
        restore_generators(state, {"crop_rng": crops.generator, "reseed_rng": generator}, checkpoint_path)
    usage = torch.zeros(model.config.n_embed, dtype=torch.long)
    stats = {"step": start, "l1": float("nan"), "codebook_loss": float("nan"), "codes_used": 0}
    reseeding = settings.restart_dead_every and settings.mode != "decoder"  # a frozen codebook stays as it is
    model.train()
    progress = progress_bar(range(start, settings.steps), initial=start, total=settings.steps, desc="train-vqgan")
    for step in progress:
        x = crops.sample(settings.batch_size)
        latents = model.encode_latent(x)
        if quantizers:
            quantizer = quantizers[step % len(quantizers)]
            with torch.no_grad():
                indices = quantizer.nearest_indices(latents)
                quantized, codebook_loss = quantizer.lookup(indices), torch.zeros(())
        else:
            quantized, codebook_loss, indices = model.quantize(latents)
        x_hat = model.decode_latent(quantized)
        image, reference = (x_hat + 1) / 2, (x + 1) / 2
        if settings.colour_band_loss:
            image = low_band_corrected(image, reference)
        l1 = 2 * F.l1_loss(image, reference)  # on the [-1, 1] scale the model works in
        loss = settings.l1_weight * l1 + codebook_loss
        if settings.msssim_weight > 0:
            loss = loss + settings.msssim_weight * ms_ssim_loss(reference, image.clamp(0, 1))
        adversarial = discriminator is not None and step >= settings.gan_start
        if adversarial:
            discriminator.requires_grad_(False)
            loss = loss - settings.gan_weight * discriminator(x_hat).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if adversarial:
            discriminator.requires_grad_(True)
            discriminator_loss = hinge_discriminator_loss(discriminator(x), discriminator(x_hat.detach()))
            discriminator_optimizer.zero_grad(set_to_none=True)
            discriminator_loss.backward()
            discriminator_optimizer.step()
        usage += torch.bincount(indices.flatten(), minlength=usage.numel())
        stats = {"step": step + 1, "l1": l1.item(), "codebook_loss": codebook_loss.item(),
                 "codes_used": int((usage > 0).sum())}
        if reseeding and (step + 1) % settings.restart_dead_every == 0:
            if step + 1 < 0.8 * settings.steps:  # leave the end of training undisturbed
                reseed_dead_codes(model, usage, latents.detach(), generator)
            usage.zero_()
        progress.set_postfix(l1=f"{stats['l1']:.4f}", vq=f"{stats['codebook_loss']:.4f}", used=stats["codes_used"])
        last = step + 1 == settings.steps or time_limit.expired()
        if checkpoint_path is not None and ((step + 1) % settings.checkpoint_every == 0 or last):
            save_training_state(checkpoint_path, state_dicts(parts, step=step + 1, crop_rng=crops.generator.get_state(),
                                                             reseed_rng=generator.get_state()))
        if last and step + 1 < settings.steps:  # the time limit (a break stops tqdm's count one short, so the
            break  # last step ends the loop itself)
    model.eval()
    return stats


def train_restorer(
    restorer: IndexRestorer,
    index_maps: Tensor,
    codebook: Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    max_seconds: float | None = None,
    trained_for: int | None = None,
) -> dict:
    """MaskGIT-style training: mask a random fraction (cosine schedule) of each (h, w) index map of
    ``index_maps`` (N, h, w) and minimise cross-entropy on the masked positions.

    ``max_seconds``: stop after the step in progress (the checkpoint is written; ``stats["step"]`` says where).
    ``trained_for``: a tag of the codes it learns (e.g. the autoencoder's step), stored in the checkpoint; a
    ``resume`` from a checkpoint with another tag starts afresh, since it learnt other codes."""
    from effvision.training import load_training_state

    time_limit = TimeLimit(max_seconds)
    optimizer = torch.optim.AdamW(restorer.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    parts = {"model": restorer, "optimizer": optimizer, "schedule": schedule}
    state = None
    if resume and checkpoint_path is not None and os.path.lexists(checkpoint_path):
        stored = load_training_state(checkpoint_path)
        if isinstance(stored, dict) and stored.get("trained_for") != trained_for:
            print(f"{checkpoint_path}: that restorer learnt the codes of another autoencoder (step "
                  f"{stored.get('trained_for')}, now {trained_for}); training it afresh")
        else:  # the schedule was not saved before: the warm-up then starts again
            state = resume_training_state(checkpoint_path, parts, optional=("schedule",))
    start = int(state["step"]) if state is not None else 0
    generator = torch.Generator().manual_seed(seed + start)
    if state is not None:
        restore_generators(state, {"rng": generator}, checkpoint_path)
    restorer.train()
    stats = {"step": start, "loss": float("nan"), "accuracy": float("nan")}
    progress = progress_bar(range(start, steps), initial=start, total=steps, desc="train-restorer")
    for step in progress:
        picks = torch.randint(index_maps.shape[0], (batch_size,), generator=generator)
        maps = index_maps[picks]
        # the 8 flips/transposes of a square map: a few reference maps go a long way
        if torch.rand((), generator=generator) < 0.5:
            maps = maps.flip(-1)
        if torch.rand((), generator=generator) < 0.5:
            maps = maps.flip(-2)
        if maps.shape[-1] == maps.shape[-2] and torch.rand((), generator=generator) < 0.5:
            maps = maps.transpose(-1, -2)
        ratio = torch.cos(0.5 * torch.pi * torch.rand(batch_size, generator=generator))  # MaskGIT cosine
        mask = random_mask(maps.shape, ratio.clamp(min=0.05), generator)
        logits = restorer(maps, mask, codebook)
        loss = F.cross_entropy(logits[mask], maps[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = (logits[mask].argmax(-1) == maps[mask]).float().mean().item()
        stats = {"step": step + 1, "loss": loss.item(), "accuracy": accuracy}
        progress.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{accuracy:.3f}")
        last = step + 1 == steps or time_limit.expired()
        if checkpoint_path is not None and ((step + 1) % checkpoint_every == 0 or last):
            save_training_state(checkpoint_path, state_dicts(parts, step=step + 1,
                                                             rng=generator.get_state(), trained_for=trained_for))
        if last and step + 1 < steps:
            break
    restorer.eval()
    return stats
