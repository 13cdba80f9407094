"""Wasserstein-2 k-medoids on token posteriors (DESIGN.md §3.4).

Between diagonal Gaussians N(μ₁, σ₁²) and N(μ₂, σ₂²), W2 = sqrt(‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²): the Euclidean
distance between the points [μ, σ] in R^{2d}. So the medoids are k-medoids of those points under the plain
(unsquared) Euclidean distance, the codes are W2-nearest medoids (exact faiss search on [μ, σ]), and a code
decodes to its medoid's μ. At scale the medoids are fitted on `max_points` tokens stratified across images,
with alternate iterations plus CLARA-style FasterPAM blocks (geovq.geometry.medoids).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import exact_nearest
from geovq.quantize.base import Quantizer, register


def w2_points(latents: LatentSet, tokens: np.ndarray | None = None) -> np.ndarray:
    """(n, 2d) float64 [μ, σ] of the tokens: Euclidean distance between these rows is W2."""
    mu, sigma = latents.token_mu, latents.token_sigma
    if tokens is not None:
        mu, sigma = mu[tokens], sigma[tokens]
    return np.concatenate([mu, sigma], axis=1).astype(np.float64)


@register("wasserstein")
class WassersteinQuantizer(Quantizer):
    def __init__(self, n_codes: int, seed: int = 0, max_points: int = 50_000, exact_limit: int = 2000,
                 n_blocks: int = 2, block_size: int = 2000, max_iter: int = 100) -> None:
        super().__init__(n_codes, seed)
        self.max_points = max_points  # tokens the medoids are fitted on (stratified across images)
        self.exact_limit = exact_limit  # full distance matrix + FasterPAM up to this many points
        self.n_blocks = n_blocks  # CLARA-style FasterPAM blocks after alternate iterations, at scale
        self.block_size = block_size  # points per FasterPAM block (current medoids + a random sample)
        self.max_iter = max_iter  # alternate (Voronoi) iterations at most

    def _validate_params(self) -> None:
        if self.max_points < 2 or self.block_size < 2 or self.max_iter < 1 or self.n_blocks < 0:
            raise GeovqError(f"invalid wasserstein settings {self.get_params()}: need max_points, block_size "
                             ">= 2, max_iter >= 1, n_blocks >= 0")

    def _fit(self, latents: LatentSet) -> None:
        from geovq.geometry.landmarks import stratified_tokens
        from geovq.geometry.medoids import EuclideanSpace, kmedoids

        rng = np.random.default_rng(self.seed)
        n_points = min(self.max_points, latents.n_tokens)
        if self.n_codes > n_points:
            raise GeovqError(f"K={self.n_codes} codes exceeds the {n_points} fitted tokens; raise max_points")
        tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, n_points, rng)
        points = w2_points(latents, tokens)
        result = kmedoids(EuclideanSpace(points), self.n_codes, self.seed, exact_limit=self.exact_limit,
                          max_iter=self.max_iter, n_blocks=self.n_blocks, block_size=self.block_size)
        d = latents.token_dim
        self.codebook_ = points[result.medoids, :d].astype(np.float32)
        self.sigma_ = points[result.medoids, d:].astype(np.float32)  # (K, d) the medoids' σ
        self.fit_info_ = {"points": int(n_points), "objective": result.objective,
                          "mean_w2": result.objective / n_points, "converged": bool(result.converged),
                          "trace": result.trace, "seconds": result.seconds}

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return exact_nearest(np.concatenate([self.codebook_, self.sigma_], axis=1), w2_points(latents))[1][:, 0]

    def state(self) -> dict[str, np.ndarray]:
        return {"sigma": self.sigma_}

    def set_state(self, arrays: dict[str, Any]) -> None:
        self.sigma_ = arrays["sigma"]
