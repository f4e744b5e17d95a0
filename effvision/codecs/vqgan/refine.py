"""Encoder-side index refinement for the VQGAN codec (``effvision encode --effort N``).

Our extension, not in Mao et al. (DCC 2024): the encoder's nearest-codebook indices are a poor choice for a small,
briefly trained VQGAN (on scikit-image's chelsea, refinement changes ~97% of them). Starting from the encoder's
continuous latent, ``steps`` Adam steps move it to lower the decoded image's loss ``l1_weight * L1 +
msssim_weight * (1 - MS-SSIM)``, decoding the nearest codebook entries with straight-through gradients, so every
step's loss is exactly that of an index map the decoder can be sent. The best index map seen (the encoder's own
included) is kept: refinement never makes the loss worse. The decoder and the bitstream are unchanged; the index
rate is not in the loss (it stays within ~3% on the validation photos).

With ``colour=True`` the loss is taken after the colour band's correction (unquantised block means, see
:mod:`.colour_band`), so the steps go into structure rather than into colour the band corrects anyway.

Shapes: ``x`` (B, 3, H, W) in [0, 1]; returns indices (B, ceil(H/16), ceil(W/16)).

Cost: each step is a decode plus its backward pass. On this project's 2-core CPU, a 768x512 photo takes about
6 s a step, and a 1024 x 1024 tile (the shipped codec's) peaked at 5.5 GB of memory with ``steps=1``, against
about 1 GB for plain encoding. Tiles are refined one at a time, so a smaller ``--tile-size`` bounds it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from effvision.codecs.metrics import MIN_SSIM_SIDE, ms_ssim_loss
from effvision.codecs.progress import refinement_steps
from effvision.codecs.vqgan.colour_band import low_band_corrected

#: chosen on the validation photos (chelsea, coffee, astronaut, rocket; q4, 20 steps), mean MS-SSIM: 0.01 ->
#: 0.818, 0.02 -> 0.822, 0.05 -> 0.820. At 0.05 Adam's first step (about +-lr on every latent value) moved so many
#: indices at once that on one test photo (ColdRipple) no later step got back below the encoder's own map.
LEARNING_RATE = 0.02
L1_WEIGHT = 0.2
MSSSIM_WEIGHT = 1.0
#: pulls the continuous latent towards its codebook entry (as VQ-VAE's commitment term)
COMMITMENT_WEIGHT = 0.1


@contextmanager
def frozen(module: nn.Module):
    """Turn off ``requires_grad`` on every parameter of ``module`` for the block (no weight gradients)."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield module
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def refine_indices(vq: nn.Module, x: Tensor, padded: Tensor, steps: int, colour: bool = False) -> Tensor:
    """Refined index maps of ``x`` for the taming :class:`~effvision.codecs.vqgan.taming.VQModel` ``vq``.

    Args:
        vq: the VQGAN (its weights are not changed).
        x: (B, 3, H, W) images in [0, 1].
        padded: ``x`` padded to a multiple of 16 and mapped to [-1, 1] (what the encoder takes).
        steps: Adam steps (0: the encoder's own indices).
        colour: take the loss after the colour band's correction.
    """
    height, width = x.shape[-2:]
    quantizer = vq.quantize
    with torch.no_grad():
        start = vq.encode_latent(padded)
    best_indices = quantizer.nearest_indices(start)  # exactly the encoder's own indices
    if steps <= 0:
        return best_indices
    # MS-SSIM needs 3 x 3 pixels: a thinner tile (the last of a 1025 px wide image) refines on L1 alone (it
    # failed with "MS-SSIM needs at least 3x3 pixels")
    structured = min(height, width) >= MIN_SSIM_SIDE
    best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
    latent = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=LEARNING_RATE)

    def score() -> tuple[Tensor, Tensor]:
        """Loss of the index map the latent quantises to (per image), and the quantised latent; keeps the best."""
        nonlocal best_loss, best_indices
        indices = quantizer.nearest_indices(latent.detach())
        quantised = quantizer.lookup(indices)
        decoded = (vq.decode_latent(latent + (quantised - latent).detach()) + 1) / 2
        decoded = decoded[..., :height, :width]
        if colour:
            decoded = low_band_corrected(decoded, x)
        per_image = torch.stack([
            L1_WEIGHT * (image - reference).abs().mean()
            + (MSSSIM_WEIGHT * ms_ssim_loss(reference, image.clamp(0, 1)) if structured else 0.0)
            for image, reference in zip(decoded, x, strict=True)
        ])
        better = per_image.detach() < best_loss
        best_loss = torch.where(better, per_image.detach(), best_loss)
        best_indices = torch.where(better[:, None, None], indices, best_indices)
        return per_image, quantised

    with frozen(vq), torch.enable_grad():
        for _ in refinement_steps(steps, "refine indices"):
            per_image, quantised = score()
            loss = per_image.sum() + COMMITMENT_WEIGHT * (latent - quantised).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            score()  # the map after the last step
    return best_indices
