"""K-means clustering of a VQGAN codebook into K entries (Mao et al., DCC 2024, arXiv 2307.08265, Sec. 3).

Lloyd iterations in torch with k-means++ seeding (Arthur & Vassilvitskii, 2007) from a seeded generator,
so the same codebook, K and seed always give the same centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KMeansResult:
    """centroids (K, D); assignment (N,) maps every original codebook row to its centroid; inertia: the
    (weighted) sum of squared distances of the rows to their centroids."""

    centroids: Tensor
    assignment: Tensor
    inertia: float


def _squared_distances(points: Tensor, centroids: Tensor) -> Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances (clamped at 0 against rounding)."""
    return (points.pow(2).sum(1, keepdim=True) - 2 * points @ centroids.t() + centroids.pow(2).sum(1)).clamp_min(0)


def kmeans_plus_plus(points: Tensor, k: int, weights: Tensor, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre is drawn with probability proportional to weight * D(x)^2."""
    first = torch.multinomial(weights, 1, generator=generator)
    centres = [points[first[0]]]
    closest = _squared_distances(points, centres[0][None]).squeeze(1)
    for _ in range(1, k):
        scores = weights * closest
        if scores.sum() <= 0:  # every remaining point coincides with a centre: pick any not yet chosen
            scores = weights + (closest > 0).to(weights) + 1e-12
        choice = torch.multinomial(scores, 1, generator=generator)[0]
        centres.append(points[choice])
        closest = torch.minimum(closest, _squared_distances(points, points[choice][None]).squeeze(1))
    return torch.stack(centres)


def kmeans(
    points: Tensor, k: int, weights: Tensor | None = None, iterations: int = 50, seed: int = 0, tolerance: float = 1e-6
) -> KMeansResult:
    """Cluster ``points`` (N, D) into exactly ``k`` centroids.

    Args:
        points: codebook rows (N, D); computed in float64 for reproducible assignments.
        k: number of centroids, 1 <= k <= N.
        weights: optional non-negative per-row weights (N,), e.g. codebook usage counts; default uniform.
        iterations: maximum Lloyd iterations; stops early when the centroids move less than ``tolerance``.
        seed: seed of the k-means++ generator.

    Empty clusters are re-seeded with the row farthest from its centroid, so the result always has k
    distinct, used centroids when the points have at least k distinct rows.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot cluster a codebook of {n} entries into K={k}; K must be between 1 and {n}")
    data = points.detach().to(torch.float64)
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.detach().to(torch.float64).clamp_min(0)
    if w.sum() <= 0:
        w = torch.ones(n, dtype=torch.float64)
    # rows of weight 0 (unused codes) still need a centroid; give them a small floor so seeding can reach them
    w = w + 1e-6 * w.max()
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(data, k, w, generator)
    for _ in range(iterations):
        distances = _squared_distances(data, centroids)
        assignment = distances.argmin(1)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, w)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, data * w[:, None])
        updated = centroids.clone()
        filled = mass > 0
        updated[filled] = sums[filled] / mass[filled, None]
        empties = (~filled).nonzero().flatten().tolist()
        if empties:
            error = distances.gather(1, assignment[:, None]).squeeze(1).clone()
            for empty in empties:
                farthest = error.argmax()
                updated[empty] = data[farthest]
                error[farthest] = -1.0
        shift = (updated - centroids).pow(2).sum(1).max().item()
        centroids = updated
        if shift < tolerance:
            break
    distances = _squared_distances(data, centroids)
    assignment = distances.argmin(1)
    inertia = float((distances.gather(1, assignment[:, None]).squeeze(1) * w).sum())
    return KMeansResult(centroids.to(points.dtype), assignment, inertia)
