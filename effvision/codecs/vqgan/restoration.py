"""Lost-index restoration: a bidirectional transformer over the index map that predicts masked indices.

MaskGIT (Chang et al., CVPR 2022) training and iterative confidence-ordered filling, used as in Mao et al.
(DCC 2024) to restore images whose index streams lost up to ~20% of their indices.

The restorer is codebook-agnostic: a token is a projection of its codebook *vector*, and the logits of a
position are dot products between its output state and projected codebook vectors. A restorer trained on
the full codebook therefore also serves every K-means-clustered codebook derived from it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effvision.bounded_config import Limit


def random_mask(
    shape: torch.Size | tuple[int, ...], ratio: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Bool mask (B, h, w) with exactly ``round(ratio[b] * h * w)`` (at least one) True entries per sample."""
    b, h, w = shape
    ratio = torch.as_tensor(ratio, dtype=torch.float32).expand(b)
    counts = (ratio * h * w).round().clamp(min=1, max=h * w).long()
    ranks = torch.rand(b, h * w, generator=generator).argsort(1).argsort(1)
    return (ranks < counts[:, None]).reshape(b, h, w)


def sinusoidal_positions(h: int, w: int, dim: int) -> Tensor:
    """2-D sine/cosine position code (h*w, dim): half the channels encode the row, half the column."""
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter) / max(quarter, 1))
    rows = torch.arange(h, dtype=torch.float32)[:, None] * frequencies
    cols = torch.arange(w, dtype=torch.float32)[:, None] * frequencies
    row_code = torch.cat([rows.sin(), rows.cos()], 1)[:, None, :].expand(h, w, 2 * quarter)
    col_code = torch.cat([cols.sin(), cols.cos()], 1)[None, :, :].expand(h, w, 2 * quarter)
    code = torch.cat([row_code, col_code], -1).reshape(h * w, 4 * quarter)
    return nn.functional.pad(code, (0, dim - 4 * quarter))


#: what a codec file's ``restorer_config`` may ask for (read_config_fields)
RESTORER_LIMITS: dict[str, Limit] = {
    "code_dim": Limit(1, 4096),
    "dim": Limit(1, 4096),
    "depth": Limit(0, 64),
    "heads": Limit(1, 256),
}


class IndexRestorer(nn.Module):
    """Bidirectional transformer: (indices (B, h, w), mask (B, h, w), codebook (K, D)) -> logits (B, h, w, K).

    Args:
        code_dim: codebook vector dimension D.
        dim / depth / heads: transformer width, number of layers and attention heads.
    """

    def __init__(self, code_dim: int, dim: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.config = {"code_dim": code_dim, "dim": dim, "depth": depth, "heads": heads}
        self.code_norm = nn.LayerNorm(code_dim)
        self.token_in = nn.Linear(code_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(dim)
        self.query_out = nn.Linear(dim, dim)
        self.key_out = nn.Linear(code_dim, dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, indices: Tensor, mask: Tensor, codebook: Tensor) -> Tensor:
        b, h, w = indices.shape
        codes = self.code_norm(codebook)
        tokens = self.token_in(codes)[indices.masked_fill(mask, 0)]
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens.reshape(b, h * w, -1) + sinusoidal_positions(h, w, tokens.shape[-1]).to(tokens)
        states = self.norm_out(self.blocks(tokens))
        logits = self.query_out(states) @ self.key_out(codes).t() / math.sqrt(states.shape[-1])
        return logits.reshape(b, h, w, -1)

    @torch.no_grad()
    def restore(
        self,
        indices: Tensor,
        lost: Tensor,
        codebook: Tensor,
        iterations: int = 4,
        decision: str = "mmse",
        window: int = 32,
        margin: int = 8,
    ) -> Tensor:
        """Fill the ``lost`` (B, h, w) positions of ``indices`` (B, h, w); known indices are never changed.

        Maps larger than ``window`` x ``window`` are restored window by window in raster order, each window
        seen with ``margin`` cells of context around it (already-restored cells included), so attention
        memory is bounded by (window + 2 * margin)**2 tokens whatever the image size; the result is
        deterministic. A map that fits in one window is restored in one piece, exactly as before.
        """
        h, w = indices.shape[-2:]
        if h <= window and w <= window:
            return self._restore_window(indices, lost, codebook, iterations, decision)
        indices = indices.clone()
        for top in range(0, h, window):
            for left in range(0, w, window):
                bottom, right = min(top + window, h), min(left + window, w)
                if not lost[:, top:bottom, left:right].any():
                    continue
                rows = slice(max(0, top - margin), min(h, bottom + margin))
                cols = slice(max(0, left - margin), min(w, right + margin))
                crop_lost = lost[:, rows, cols]
                restored = self._restore_window(indices[:, rows, cols], crop_lost, codebook, iterations, decision)
                core_rows = slice(top - rows.start, bottom - rows.start)
                core_cols = slice(left - cols.start, right - cols.start)
                indices[:, top:bottom, left:right] = restored[:, core_rows, core_cols]
                lost = lost.clone()
                lost[:, top:bottom, left:right] = False
        return indices

    def _restore_window(
        self, indices: Tensor, lost: Tensor, codebook: Tensor, iterations: int, decision: str
    ) -> Tensor:
        """MaskGIT filling of one map (B, h, w).

        Each iteration predicts every still-missing index and commits the most confident share of them
        (MaskGIT's schedule: a cosine-decaying number stays masked after each round). ``decision="argmax"``
        commits the most probable index; ``"mmse"`` commits the index nearest to the posterior mean codebook
        vector sum_k p_k e_k, which minimises the expected squared latent error (the better choice when the
        prediction is uncertain).
        """
        if decision not in ("mmse", "argmax"):
            raise ValueError(f"decision must be 'mmse' or 'argmax', got {decision!r}")
        indices = indices.clone()
        remaining = lost.clone()
        total = remaining.flatten(1).sum(1)
        for iteration in range(iterations):
            if not remaining.any():
                break
            probabilities = self.forward(indices, remaining, codebook).softmax(-1)
            confidence, guess = probabilities.max(-1)
            if decision == "mmse":
                mean = probabilities @ codebook  # (B, h, w, D)
                distances = mean.pow(2).sum(-1, keepdim=True) - 2 * mean @ codebook.t() + codebook.pow(2).sum(1)
                guess = distances.argmin(-1)
            still_masked = (total.float() * math.cos(0.5 * math.pi * (iteration + 1) / iterations)).floor().long()
            confidence = confidence.masked_fill(~remaining, -1.0).flatten(1)
            order = confidence.argsort(1, descending=True).argsort(1).reshape(remaining.shape)
            missing_now = remaining.flatten(1).sum(1)
            commit = remaining & (order < (missing_now - still_masked)[:, None, None])
            indices = torch.where(commit, guess, indices)
            remaining = remaining & ~commit
        return indices
