"""Set-to-set metrics of 3D volumes: diversity, feature-distribution distances, intensity histograms, memorisation.

Every function takes lists of volumes ``(1, X, Y, Z)`` in [0, 1] (image space) or feature matrices ``(N, F)``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric

__all__ = [
    "MSSSIM",
    "fid",
    "histogram_distance",
    "mmd",
    "ms_ssim_diversity",
    "nearest_neighbours",
    "precision_recall",
    "wasserstein_1d",
]


class MSSSIM:
    """MS-SSIM between two volumes ``(1, X, Y, Z)``, with the scales and kernel the volume size allows.

    Args:
        data_range: intensity range (1 for [0, 1] volumes).
        kernel_size: Gaussian kernel size; sides must exceed ``(kernel - 1) * 2 ** (scales - 1)``.
        weights: one weight per scale.
    """

    def __init__(self, data_range: float = 1.0, kernel_size: int = 3,
                 weights: Sequence[float] = (0.3, 0.3, 0.4)) -> None:
        self.metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel_size,
                                           weights=list(weights))

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.metric(a[None].float(), b[None].float()).mean())


def ms_ssim_diversity(volumes: Sequence[torch.Tensor], ms_ssim: MSSSIM, max_pairs: int = 64, seed: int = 0) -> float:
    """Mean MS-SSIM over pairs of distinct volumes of one set (at most ``max_pairs``, drawn with ``seed``):
    lower means more diverse; near 1 means the set collapsed to one volume."""
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    if not pairs:
        raise ValueError("MS-SSIM diversity needs at least 2 volumes in a set.")
    pairs = random.Random(seed).sample(pairs, min(max_pairs, len(pairs)))
    return float(sum(ms_ssim(volumes[i], volumes[j]) for i, j in pairs) / len(pairs))


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (``monai.metrics.FIDMetric``)."""
    return float(FIDMetric()(fake.double(), real.double()))


def mmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased linear-kernel MMD (``monai.metrics.MMDMetric``) between two feature sets, on the first
    ``min(N, M)`` of each (the metric needs equal counts), both centred on the real mean and divided by the real
    features' mean standard deviation (one scalar, so that the value does not depend on the extractor's scale),
    per feature dimension."""
    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError("MMD needs at least 2 volumes in each set.")
    mean, std = real.mean(0), real.std(0).mean().clamp_min(1e-12)
    return float(MMDMetric()((real[:n] - mean) / std, (fake[:n] - mean) / std)) / real.shape[1]


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(features, features)
    return d.kthvalue(min(k + 1, len(features)), dim=1).values  # k+1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the fraction of generated features inside the
    k-NN balls of the real ones (precision: fidelity), and of real features inside the generated balls (recall:
    coverage)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("precision/recall needs at least 2 volumes in each set.")
    real_r, fake_r = _knn_radii(real, k), _knn_radii(fake, k)
    precision = (torch.cdist(fake, real) <= real_r[None]).any(1).double().mean()
    recall = (torch.cdist(real, fake) <= fake_r[None]).any(1).double().mean()
    return float(precision), float(recall)


def wasserstein_1d(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Exact Wasserstein-1 (earth mover's) distance between the empirical distributions of two 1-D samples of any
    sizes, in the values' units: the integral over x of ``|F_a(x) - F_b(x)|``, ``F`` the empirical CDFs (as
    ``scipy.stats.wasserstein_distance``)."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten().sort().values
    b = torch.as_tensor(b, dtype=torch.float64).flatten().sort().values
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("Wasserstein distance of an empty set.")
    edges = torch.cat([a, b]).sort().values  # F_a - F_b is constant between consecutive pooled values
    cdf_a = torch.searchsorted(a, edges[:-1], right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, edges[:-1], right=True).double() / b.numel()
    return float(((cdf_a - cdf_b).abs() * edges.diff()).sum())


def histogram_distance(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], foreground: float | None = None,
                       max_voxels: int = 200_000, seed: int = 0) -> float:
    """Wasserstein-1 distance between the pooled voxel intensities of two sets (above ``foreground`` when given;
    intensity units, 0 for identical histograms). At most ``max_voxels`` voxels per set are drawn, with ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def pooled(volumes: Sequence[torch.Tensor]) -> torch.Tensor:
        values = torch.cat([v.float().flatten() for v in volumes])
        if foreground is not None:
            values = values[values > foreground]
        if values.numel() > max_voxels:
            values = values[torch.randperm(values.numel(), generator=generator)[:max_voxels]]
        return values

    return wasserstein_1d(pooled(real), pooled(fake))


def nearest_neighbours(queries: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                       ms_ssim: MSSSIM) -> list[tuple[int, float]]:
    """For each query volume, the index of its most similar reference volume and their MS-SSIM (the memorisation
    check: a generated volume much closer to one training volume than real volumes are to each other is a copy)."""
    if not references:
        raise ValueError("nearest neighbours: the reference set is empty.")
    out = []
    for q in queries:
        scores = [ms_ssim(q, r) for r in references]
        best = max(range(len(scores)), key=scores.__getitem__)
        out.append((best, float(scores[best])))
    return out
