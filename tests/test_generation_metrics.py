"""Sample metrics: the Fréchet distance against scipy and closed forms, k-NN precision/recall on sets with
known answers, and FID/KID refusing to run (null plus the reason) without the real Inception weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch

from geovq.errors import GeovqError
from geovq.metrics import generation
from geovq.metrics.generation import (feature_frechet_distance, frechet_distance, gaussian_fit, inception_metrics,
                                      inception_status, precision_recall)


def random_spd(dim: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(dim, rank or dim))
    return a @ a.T + (0 if rank else 0.1 * np.eye(dim))


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root of Σ1 Σ2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("dim", [1, 3, 16, 64])
def test_frechet_distance_agrees_with_scipy_on_known_gaussians(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_spd(dim, rng), random_spd(dim, rng)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    # a rank-deficient covariance (fewer samples than features: what a small test set gives)
    s3 = random_spd(dim, rng, rank=max(1, dim // 2))
    assert frechet_distance(mu1, s3, mu2, s2) == pytest.approx(scipy_frechet(mu1, s3, mu2, s2), rel=1e-6, abs=1e-6)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=5), random_spd(5, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # a shift alone costs its squared length
    assert frechet_distance(mu, s, mu + 2.0, s) == pytest.approx(4.0 * 5, rel=1e-9)
    # diagonal covariances: Σ (σ1 − σ2)² per dimension (the squared 2-Wasserstein distance)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(np.zeros(5), np.diag(v1), np.zeros(5), np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # symmetric in its two Gaussians
    s2 = random_spd(5, rng)
    assert frechet_distance(mu, s, -mu, s2) == pytest.approx(frechet_distance(-mu, s2, mu, s), rel=1e-9)
    with pytest.raises(GeovqError, match="different dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_frechet_distance_of_large_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), random_spd(4, rng), random_spd(4, rng)
    a = rng.multivariate_normal(mu1, s1, 200_000)
    b = rng.multivariate_normal(mu2, s2, 200_000)
    mean, cov = gaussian_fit(a)
    np.testing.assert_allclose(mean, a.mean(0))
    np.testing.assert_allclose(cov, np.cov(a.T))
    assert feature_frechet_distance(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)
    with pytest.raises(GeovqError, match="N >= 2"):
        gaussian_fit(a[:1])


def test_precision_and_recall_on_sets_with_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 8)).astype(np.float32)
    same = precision_recall(real, real)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["pr_points"] == 600
    far = precision_recall(real, real + 100.0)  # disjoint supports
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Mode dropping (2-D, where k-NN balls cover a cluster well): real has two far-apart clusters, fake
    # covers one of them. Precise, but it recalls at most the half of the real points in its cluster.
    cluster = rng.normal(size=(600, 2))
    two = np.concatenate([cluster[:300], cluster[300:] + 50.0])
    dropped = precision_recall(two, rng.normal(size=(600, 2)))
    assert dropped["precision"] > 0.9 and 0.4 < dropped["recall"] <= 0.5
    # The larger set is subsampled to the smaller one's size, reproducibly.
    bigger = rng.normal(size=(5000, 8)).astype(np.float32)
    assert precision_recall(real, bigger, seed=3) == precision_recall(real, bigger, seed=3)
    assert precision_recall(real, bigger)["pr_points"] == 600
    with pytest.raises(GeovqError, match="more than k=3 points"):
        precision_recall(real[:3], real[:3])
    with pytest.raises(GeovqError, match="of one F"):
        precision_recall(real, real[:, :4])


def test_distance_blocks_do_not_change_precision_recall(monkeypatch):
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(300, 4)), rng.normal(0.3, 1.2, size=(300, 4))
    whole = precision_recall(real, fake)
    monkeypatch.setattr(generation, "DISTANCE_BLOCK", 7)
    assert precision_recall(real, fake) == whole
    assert 0.2 < whole["precision"] < 1.0 and 0.2 < whole["recall"] < 1.0


@pytest.mark.parametrize("installed", [False, True], ids=["no-torch-fidelity", "no-weights"])
def test_fid_and_kid_are_null_with_a_reason_without_inception_weights(installed, tmp_path, monkeypatch):
    """torch-fidelity missing, or there but its weights not in the (empty) hub cache: nulls, and no download."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("geovq must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "torch_fidelity"
                        else find_spec(name, *a))
    available, reason = inception_status()
    assert not available and reason.startswith("FID/KID not computed") and "\n" not in reason
    assert ("weights-inception-2015-12-05-6726825d.pth" in reason) == installed
    images = torch.rand(4, 1, 16, 16)
    assert inception_metrics(images, images, torch.device("cpu")) == {"fid": None, "kid": None, "kid_std": None,
                                                                     "fid_reason": reason}
