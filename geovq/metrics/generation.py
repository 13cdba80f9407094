"""Sample metrics (DESIGN.md §4): distances between the distribution of generated images and the test images.

Samples are never paired with real images (an unconditional sample has no partner): every metric here
compares two sets through features.
- `frechet_distance`: between Gaussian fits N(μ1, Σ1), N(μ2, Σ2) of two feature sets,
  ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½, evaluated by symmetric eigendecompositions.
- `precision_recall`: the k-NN manifold estimates of Kynkäänniemi et al. (2019), "Improved Precision and
  Recall Metric for Assessing Generative Models": precision = share of generated points inside some real
  point's ball (radius: its distance to its k-th nearest real neighbour), recall = the same with the roles
  swapped. Both sets are subsampled to the same size, since the radii shrink with the set's size.
- Domain FID: `frechet_distance` of the features of a classifier trained on the dataset's own training split
  (geovq.models.classifier); the caller records the classifier's test accuracy beside it.
- FID / KID with the real Inception-v3 (torchmetrics' network, torch-fidelity's weights) only when those
  weights are already in the torch hub cache: geovq never downloads them and never uses random weights;
  otherwise `inception_status` says why they are null.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.metrics._arrays import to_numpy

#: torch-fidelity's Inception-v3 weights (TF 2015-12-05 graph), the file torchmetrics' FID network loads
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: points per block of the pairwise-distance computations (a 10k × 10k float32 block is 400 MB)
DISTANCE_BLOCK = 2048


def gaussian_fit(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F), float64, of (N, F) features (N >= 2)."""
    x = to_numpy(features).astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise GeovqError(f"features must be (N, F) with N >= 2 to fit a Gaussian, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise GeovqError("features contain NaN or inf values")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a PSD matrix (eigenvalues below 0 from rounding clipped to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The squared 2-Wasserstein (Fréchet) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½, and the latter matrix is symmetric PSD: its eigenvalues are real and
    non-negative, so no complex square root (nor scipy's sqrtm and its imaginary residue) is needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise GeovqError(f"Gaussians of different dimension: means {mu1.shape}, {mu2.shape}, "
                         f"covariances {sigma1.shape}, {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical fits


def feature_frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two (N, F) feature sets."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) distance of each point to its k-th nearest other point of the same set."""
    radii = []
    for s in range(0, len(x), DISTANCE_BLOCK):
        d = torch.cdist(x[s:s + DISTANCE_BLOCK], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest is the k-th other: 0 is itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of `points` within distance radii[j] of some centre j."""
    inside = []
    for s in range(0, len(points), DISTANCE_BLOCK):
        inside.append((torch.cdist(points[s:s + DISTANCE_BLOCK], centres) <= radii[None]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     seed: int = 0) -> dict[str, float | int]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real` (N, F) features.

    Both sets are cut to n = min(len(real), len(fake)) points (a seeded random subset of the larger): a
    manifold estimate from more points has smaller balls, so unequal sizes would bias the two numbers.
    """
    real_t = torch.as_tensor(to_numpy(real), dtype=torch.float32)
    fake_t = torch.as_tensor(to_numpy(fake), dtype=torch.float32)
    if real_t.ndim != 2 or fake_t.shape[1:] != real_t.shape[1:]:
        raise GeovqError(f"real and fake features must be (N, F) of one F, got {tuple(real_t.shape)} and "
                         f"{tuple(fake_t.shape)}")
    n = min(len(real_t), len(fake_t))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or n <= k:
        raise GeovqError(f"precision/recall needs an integer k >= 1 and more than k={k!r} points per set, got {n}")
    rng = np.random.default_rng(seed)
    real_t = real_t[np.sort(rng.choice(len(real_t), n, replace=False))]
    fake_t = fake_t[np.sort(rng.choice(len(fake_t), n, replace=False))]
    return {"precision": _coverage(fake_t, real_t, _kth_neighbour_radius(real_t, k)),
            "recall": _coverage(real_t, fake_t, _kth_neighbour_radius(fake_t, k)), "pr_k": k, "pr_points": n}


def _inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def inception_status() -> tuple[bool, str]:
    """(available, reason): FID/KID are computed only with the real Inception weights in the torch hub cache."""
    if importlib.util.find_spec("torch_fidelity") is None:  # torchmetrics' Inception network is torch-fidelity's
        return False, ("FID/KID not computed: torch-fidelity, which torchmetrics' Inception network needs, is "
                       "not installed")
    path = _inception_weights_path()
    if not path.is_file():
        return False, (f"FID/KID not computed: the Inception-v3 weights ({path.name}) are not in the torch hub "
                       "cache (geovq never downloads them and never uses random weights)")
    return True, f"FID/KID with the Inception-v3 weights ({path.name}) from the torch hub cache, 2048-d pool features"


@torch.no_grad()
def inception_features(images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """(N, 2048) Inception-v3 pool features of (N, 1 or 3, H, W) images in [0, 1] (call only when
    `inception_status()` says the weights are there)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(_inception_weights_path())).to(device)
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        out.append(net((x * 255).round().clamp(0, 255).to(torch.uint8)).double().cpu())  # it resizes to 299
    return torch.cat(out)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): torchmetrics' unbiased cubic-polynomial-kernel MMD² on feature subsets."""
    from torchmetrics.image.kid import poly_mmd

    size = min(subset_size, len(real), len(fake))
    rng = np.random.default_rng(seed)
    values = torch.stack([poly_mmd(real[rng.choice(len(real), size, replace=False)],
                                   fake[rng.choice(len(fake), size, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())


def inception_metrics(real: torch.Tensor, fake: torch.Tensor, device: torch.device) -> dict[str, float | str | None]:
    """fid, kid, kid_std with the real Inception weights, or nulls; `fid_reason` says which and why."""
    available, reason = inception_status()
    if not available:
        return {"fid": None, "kid": None, "kid_std": None, "fid_reason": reason}
    f_real, f_fake = inception_features(real, device), inception_features(fake, device)
    kid, kid_std = kernel_inception_distance(f_real, f_fake)
    return {"fid": feature_frechet_distance(f_real, f_fake), "kid": kid, "kid_std": kid_std, "fid_reason": reason}

