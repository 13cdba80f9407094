"""Euclidean k-means on posterior means μ: the control every geometric method must beat (DESIGN.md §3.2).

k-means++ seeding (scikit-learn's `kmeans_plusplus`) on a uniform random sample of at most
`seed_sample` tokens: exact k-means++ over millions of tokens costs more than the Lloyd iterations that
follow and buys nothing measurable. Then Lloyd on ALL training tokens to convergence (scikit-learn's
KMeans, `tol` on the centre shift, at most `max_iter` sweeps); `fit_info` records the sample size, the
iterations and whether it converged. (bench/kmeans.py measures scikit-learn against faiss: faiss's own
Kmeans has no k-means++ init, subsamples to 256 points per centroid by default and has no convergence test.)
Encoding is exact nearest-centroid search (`geovq.nearest.exact_nearest`).
"""

from __future__ import annotations

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import exact_nearest
from geovq.quantize.base import Quantizer, register


@register("kmeans")
class KMeansQuantizer(Quantizer):
    def __init__(self, n_codes: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
                 seed_sample: int = 200_000) -> None:
        super().__init__(n_codes, seed)
        self.max_iter = max_iter  # Lloyd sweeps at most
        self.tol = tol  # convergence: relative centre shift (scikit-learn's tol)
        self.seed_sample = seed_sample  # tokens the k-means++ seeding draws from

    def _validate_params(self) -> None:
        if self.max_iter < 1 or self.tol < 0 or self.seed_sample < 1:
            raise GeovqError(f"kmeans needs max_iter >= 1, tol >= 0 and seed_sample >= 1; got "
                             f"max_iter={self.max_iter}, tol={self.tol}, seed_sample={self.seed_sample}")

    def _fit(self, latents: LatentSet) -> None:
        from sklearn.cluster import KMeans, kmeans_plusplus

        points = latents.token_mu.astype(np.float32)
        rng = np.random.default_rng(self.seed)
        sample = points if len(points) <= self.seed_sample else points[
            rng.choice(len(points), self.seed_sample, replace=False)]
        if len(sample) < self.n_codes:
            raise GeovqError(f"kmeans seed_sample={self.seed_sample} draws fewer tokens than K={self.n_codes}")
        seeds, _ = kmeans_plusplus(sample, self.n_codes, random_state=self.seed)
        km = KMeans(self.n_codes, init=seeds, n_init=1, max_iter=self.max_iter, tol=self.tol,
                    random_state=self.seed).fit(points)
        self.codebook_ = km.cluster_centers_.astype(np.float32)
        self.fit_info_ = {"seeding_sample": len(sample), "n_points": len(points), "iterations": int(km.n_iter_),
                          "converged": bool(km.n_iter_ < self.max_iter), "inertia": float(km.inertia_)}

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return exact_nearest(self.codebook_, latents.token_mu)[1][:, 0]
