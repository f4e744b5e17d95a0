"""Start a MambaIC model from the best linear transform its convolutions can hold, then train its entropy model.

Why: after the few thousand CPU steps this project can afford, the learned ``lite`` transforms did no better than
PCA of the same width (bench/results/codec-rd-cpu.md, "Why"). So instead of learning the transforms from random
weights, this script *sets* them to a two-stage Karhunen-Loeve transform (KLT) fitted on the training photos, and
trains only the hyperprior and the channel-spatial context model on top. ``scripts/train_mambaic_ladder.py
--init <this file>`` then fine-tunes everything jointly, so the VSS blocks can learn what the linear transform
misses. The architecture is MambaIC's, unchanged; only the starting point differs (our recipe, not the paper's).

With every VSS block's output projection at zero (a residual block that adds nothing), ``g_a`` is four strided
convolutions and ``g_s`` four transposed ones. They are set so that:

* conv 5x5/2 and conv 3x3/2 rearrange each 4x4 pixel block into 48 channels (space-to-depth, exact; the mean
  colour is subtracted);
* conv 3x3/2 projects each 8x8 block (2x2 of those) on its 48 principal components (PCA of the training photos);
* conv 3x3/2 projects the 4 x 48 coefficients of each 16x16 block on their ``M`` principal components, divided
  by the quantisation step ``step`` (so rounding ``y`` is uniform quantisation with that step);
* ``g_s`` is the adjoint of ``g_a`` (the same weights in the transposed convolutions, times ``step`` in the first
  one; the mean colour added back): with orthonormal components, the least-squares reconstruction.

The step follows the rate-distortion slope of ``lambda`` (high-rate theory for uniform quantisation of an
orthonormal transform, distortion measured as ``lambda * 255^2 * MSE + bpp``): ``step = 0.02 / sqrt(lambda)``.

Stage 1 (this script) trains ``h_a``, ``h_mean_s``, ``h_scale_s``, the context model and the entropy bottleneck
on the latents of the training crops (rate only: the transforms are frozen and the latent residual prediction
starts at zero): ``g_a`` runs once and ``g_s`` not at all, so a step costs less than a joint one. The entropy
heads start at a static per-channel Gaussian (:func:`set_factorized_entropy_start`; ``--entropy-start random``
keeps them as built)::

    OMP_NUM_THREADS=1 python scripts/init_mambaic_klt.py --lambda 0.0483 --config wide --steps 2000 \\
        --out runs/klt/wide-q6-init.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
BLOCK_CHANNELS = 48  # 4x4 pixels x 3 colours: what the second convolution holds after space-to-depth


def quantisation_step(lmbda: float) -> float:
    """Uniform step (in [0, 1] pixel units) where the rate-distortion slope of an orthonormal transform coder meets
    ``lambda``: at high rate d(MSE)/d(step) per coefficient is step / 6 and each halving of the step costs one bit
    per coefficient, which gives ``step^2 = 12 * 768 / (2 ln 2 * 256 * 255^2 * lambda)`` (16x16 blocks, 3 colours)."""
    return math.sqrt(12 * 768 / (2 * math.log(2) * 256 * 255**2 * lmbda))


def _principal_rows(vectors: Tensor, count: int) -> Tensor:
    """(count, D): the top ``count`` eigenvectors of the second-moment matrix of ``vectors`` (n, D), float64."""
    moment = vectors.T.double() @ vectors.double() / vectors.shape[0]
    _, eigenvectors = torch.linalg.eigh(moment)
    return eigenvectors[:, -count:].flip(-1).T.float()


def _pairs(features: Tensor) -> Tensor:
    """(n, 4C): each 2x2 group of a (B, C, H, W) map, in the (C, 2, 2) order of a conv weight's kernel window."""
    return F.unfold(features, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, features.shape[1] * 4)


@torch.no_grad()
def set_klt_transforms(model: nn.Module, crops: Tensor, step: float) -> None:
    """Set ``model.g_a``/``model.g_s`` to the two-stage KLT described in the module docstring.

    crops: (N, 3, H, W) in [0, 1], H and W multiples of 16, the photos the components are fitted on.
    """
    cfg = model.config
    width, latent = cfg.transform_channels, cfg.latent_channels
    if width < BLOCK_CHANNELS or latent > 4 * width:
        raise ValueError(f"needs transform_channels >= {BLOCK_CHANNELS} and latent_channels <= 4 x that")
    convs = [m for m in model.g_a if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in model.g_s if isinstance(m, nn.ConvTranspose2d)][::-1]  # deconvs[i] mirrors convs[i]
    for module in (*model.g_a, *model.g_s):
        if hasattr(module, "op"):  # VSS block: the residual branch adds nothing until training moves it
            module.op.out_proj.weight.zero_()
    for layer in (*convs, *deconvs):
        layer.weight.zero_()
        layer.bias.zero_()
    mean = crops.mean(dim=(0, 2, 3))
    # 1. conv 5x5/2: pixel (2i + dy, 2j + dx) of colour c -> channel 4c + 2dy + dx at (i, j) (kernel offset 2 + d)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                convs[0].weight[4 * c + 2 * dy + dx, c, 2 + dy, 2 + dx] = 1.0
                convs[0].bias[4 * c + 2 * dy + dx] = -mean[c]
    # 2. conv 3x3/2: channel k of H/2 position (2i + a, 2j + b) -> channel 4k + 2a + b (kernel offset 1 + a)
    for k in range(12):
        for a in range(2):
            for b in range(2):
                convs[1].weight[4 * k + 2 * a + b, k, 1 + a, 1 + b] = 1.0
    deconvs[0].weight.copy_(convs[0].weight)
    deconvs[0].bias.copy_(mean)
    deconvs[1].weight.copy_(convs[1].weight)
    # 3. and 4.: principal components of 2x2 groups, fitted stage by stage on what the previous stage gives
    features = torch.cat([convs[1](convs[0](chunk)) for chunk in crops.split(32)])
    for index, count, scale in ((2, width, 1.0), (3, latent, step)):
        rows = _principal_rows(_pairs(features), count).reshape(count, width, 2, 2)
        convs[index].weight[..., 1:3, 1:3] = rows / scale
        deconvs[index].weight[..., 1:3, 1:3] = rows * scale
        features = torch.cat([convs[index](chunk) for chunk in features.split(32)])
    for context in model.slices:  # latent residual prediction starts at zero: y_hat is the rounded y
        last = context.lrp_transform[-1]
        last.weight.zero_()
        last.bias.zero_()


def gaussian_bin_mass(values: Tensor, scales: Tensor) -> Tensor:
    """Probability (float64) of integer ``values`` under zero-mean Gaussians of ``scales`` (broadcast together),
    each integrated over its unit bin: what the Gaussian conditional assigns at mean 0."""
    normal = torch.distributions.Normal(0.0, scales.double())
    return normal.cdf(values.double() + 0.5) - normal.cdf(values.double() - 0.5)


def best_gaussian_scales(latents: Tensor, candidates: int = 96) -> Tensor:
    """(M,): per channel of ``latents`` (N, M, h, w), the scale of a zero-mean Gaussian, discretised to unit bins,
    that gives the rounded values the least total code length; searched on a log grid from 0.11 (the coder's
    lower bound) to 4x the channel's RMS. (Near the RMS for wide channels; for narrow ones the rounding inflates the
    RMS, and the bin integral accounts for it.)"""
    values = latents.round().transpose(0, 1).reshape(latents.shape[1], -1).double()
    rms = values.pow(2).mean(dim=1).sqrt().clamp_min(0.11)
    best = torch.empty(values.shape[0], dtype=torch.float64)
    for channel, (row, top) in enumerate(zip(values, rms, strict=True)):
        levels, counts = row.unique(return_counts=True)
        grid = torch.logspace(math.log10(0.11), math.log10(4 * float(top)), candidates, dtype=torch.float64)
        mass = gaussian_bin_mass(levels, grid[:, None]).clamp_min(1e-12)
        best[channel] = grid[int((-(counts * mass.log2()).sum(dim=1)).argmin())]
    return best.float()


@torch.no_grad()
def set_factorized_entropy_start(model: nn.Module, latents: Tensor) -> None:
    """Start every slice's entropy parameters at a factorized Gaussian: mean 0 and, per latent channel, the scale
    that codes the rounded training latents in the fewest bits (:func:`best_gaussian_scales`), whatever the
    hyperprior and the context say.

    The last layer of each slice's mean and scale heads (the 1x1 output projection of its window-attention gate)
    gets zero weights and these values as its bias, so training starts from a static per-channel code (measured at
    lambda 0.0065: 0.61 bpp on four test photos, against 1.65 for the random heads) and learns the adaptive part (the
    zero weights receive gradients at the first step, as a zero-initialised residual branch does).
    latents: (N, M, h, w) unquantised ``g_a`` outputs of the training crops.
    """
    scales = best_gaussian_scales(latents)
    for context, slice_scales in zip(model.slices, scales.chunk(len(model.slices)), strict=True):
        for head, bias in ((context.anchor_mean_attention, torch.zeros_like(slice_scales)),
                           (context.anchor_scale_attention, slice_scales)):
            head.project_out.weight.zero_()
            head.project_out.bias.copy_(bias)


def unquantised_psnr(model: nn.Module, image: Tensor) -> float:
    """PSNR (dB) of g_s(g_a(x)) for one (3, H, W) image in [0, 1]: what the transforms hold at infinite rate."""
    height, width = image.shape[-2:]
    decoded = model.g_s(model.g_a(model.pad(image[None])))[..., :height, :width].clamp(0, 1)
    return -10 * math.log10(float(F.mse_loss(decoded, image[None])))


def entropy_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What stage 1 trains: everything but the transforms and the latent residual prediction."""
    return [
        (name, p) for name, p in model.named_parameters()
        if not name.startswith(("g_a.", "g_s.")) and ".lrp_transform." not in name
    ]


def train_entropy_model(
    model: nn.Module, latents: Tensor, steps: int, batch_size: int, crop: int, lr: float, final_lr: float,
    seed: int, max_seconds: float | None = None,
) -> list[float]:
    """Train the entropy model on random ``crop`` x ``crop`` windows of fixed latents (N, M, h, w) for the
    estimated rate; returns bpp per step."""
    from effvision.codecs.mambaic.train import rate_distortion_optimizers
    from effvision.training import TimeLimit, cosine_lr, progress_bar

    for _, parameter in model.named_parameters():
        parameter.requires_grad_(False)
    trainable = entropy_parameters(model)
    for _, parameter in trainable:
        parameter.requires_grad_(True)
    optimizer, aux_optimizer = rate_distortion_optimizers(trainable, lr, aux_lr=1e-3)
    main = optimizer.param_groups[0]["params"]
    generator = torch.Generator().manual_seed(seed)
    synthesis, model.g_s = model.g_s, nn.Identity()  # rate only: skip the (frozen) synthesis
    model.train()
    history: list[float] = []
    time_limit = TimeLimit(max_seconds)
    try:
        bar = progress_bar(range(steps), show=True, total=steps, desc="entropy model")
        for index in bar:
            picks = torch.randint(len(latents), (batch_size,), generator=generator).tolist()
            top, left = (int(torch.randint(n - crop + 1, (1,), generator=generator)) for n in latents.shape[-2:])
            y = latents[picks, :, top : top + crop, left : left + crop]
            pixels = y.shape[0] * y.shape[-2] * y.shape[-1] * 256
            out = model._forward_from_latents(y, model.h_a(y), (y.shape[-2] * 16, y.shape[-1] * 16), relaxed=True)
            bpp = sum(-torch.log2(p.clamp_min(1e-9)).sum() for p in out["likelihoods"].values()) / pixels
            optimizer.zero_grad(set_to_none=True)
            bpp.backward()
            torch.nn.utils.clip_grad_norm_(main, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(index, steps, lr, final_lr)
            optimizer.step()
            aux_optimizer.zero_grad(set_to_none=True)
            model.aux_loss().backward()
            aux_optimizer.step()
            history.append(float(bpp.detach()))
            bar.set_postfix(bpp=f"{sum(history[-50:]) / len(history[-50:]):.4f}")
            if time_limit.expired():
                break
    finally:
        model.g_s = synthesis
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambda", dest="lmbda", type=float, required=True)
    parser.add_argument("--config", default="wide", help="a MambaIC config name (transform_channels >= 48)")
    parser.add_argument("--corpus", type=Path, default=Path("/work/photo-corpus/train.npy"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latent-crop", type=int, default=8, help="latent window per sample (8 = 128 px)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--final-lr", type=float, default=5e-5)
    parser.add_argument("--minutes", type=float, default=None, help="wall-time cap of stage 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (stage 1 runs there)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--entropy-start", choices=("factorized", "random"), default="factorized",
                        help="entropy heads at a per-channel Gaussian (set_factorized_entropy_start) or as built")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue stage 1 from a file this script wrote (its transforms are kept, not refitted)")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_mambaic_ladder import EXTRA_TRAIN, VALIDATION, corpus_crops, skimage_photo

    from effvision.codecs.base import resolve_device
    from effvision.codecs.mambaic import MambaIC
    from effvision.codecs.mambaic.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from effvision.codecs.mambaic.train import validate

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    crops = torch.stack(corpus_crops(args.corpus))
    step = quantisation_step(args.lmbda)
    device = resolve_device(args.device)
    hours_key = "gpu_hours" if device.startswith("cuda") else "cpu_hours"
    earlier_steps, earlier_hours = 0, 0.0
    if args.init is None:
        model = MambaIC(args.config)
        set_klt_transforms(model, crops, step)
    else:
        model = load_checkpoint(args.init)
        _, metadata = read_checkpoint_config(args.init)
        earlier_steps = int(metadata.get("steps", "0"))
        earlier_hours = float(metadata.get(hours_key, "0"))
    val_images = [skimage_photo(name) for name in VALIDATION]
    model.eval()
    with torch.no_grad():
        ceiling = sum(unquantised_psnr(model, x) for x in val_images) / len(val_images)
        training = torch.cat([crops, crops.flip(-1)])
        latents = torch.cat([model.g_a(chunk) for chunk in training.split(32)])
        if args.init is None and args.entropy_start == "factorized":
            set_factorized_entropy_start(model, latents)
    print(f"step {step:.4f}; validation PSNR without quantisation {ceiling:.2f} dB; latents {tuple(latents.shape)}",
          flush=True)
    model.to(device)
    history = train_entropy_model(
        model, latents.to(device), args.steps, args.batch_size, args.latent_crop, args.lr, args.final_lr, args.seed,
        None if args.minutes is None else args.minutes * 60,
    )
    metrics = validate(model, val_images, args.lmbda, "mse", device)
    model.cpu()
    print(f"validation: bpp {metrics['bpp']:.4f} psnr {metrics['psnr']:.2f} loss {metrics['loss']:.4f}", flush=True)
    model.update(force=True)
    hours = earlier_hours + (time.time() - started) / 3600
    total = earlier_steps + len(history)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out, extra={
        "lambda": str(args.lmbda),
        "steps": str(total),
        "total_steps": str(total),
        hours_key: f"{hours:.2f}",
        "init": f"two-stage KLT (scripts/init_mambaic_klt.py), step {step:.5f}; entropy model {total} steps",
        "trained_on": f"photo corpus {args.corpus.name} (KLT fit and entropy model); validation "
                      f"{','.join(VALIDATION)}; {','.join(EXTRA_TRAIN)} not used in stage 1",
    })
    print(f"{args.out}: {total} entropy-model steps, {hours * 60:.1f} min in all", flush=True)


if __name__ == "__main__":
    main()
