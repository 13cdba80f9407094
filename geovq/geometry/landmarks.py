"""Landmark tokens: a subsample stratified across images, and how well it covers the rest.

Taking the first tokens of a split (or of an unshuffled loader) biases the graph towards a few images and
classes (DESIGN.md §5). Here every image gives floor or ceil(M / n_images) tokens, chosen at random within
the image; when M < n_images, a random subset of images gives one token each.
"""

from __future__ import annotations

import numpy as np

from geovq.errors import GeovqError
from geovq.nearest import exact_nearest


def stratified_tokens(n_images: int, tokens_per_image: int, n_landmarks: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Sorted ids (image-major token order) of `n_landmarks` tokens spread evenly over the images."""
    total = n_images * tokens_per_image
    if not 1 <= n_landmarks <= total:
        raise GeovqError(f"{n_landmarks} landmarks must lie in [1, {total}] (the number of tokens)")
    # Rank tokens within their image at random; take all rank-0 tokens first, then rank 1, ..., breaking
    # the tie at the last rank taken at random, so images differ by at most one landmark.
    rank = rng.random((n_images, tokens_per_image)).argsort(axis=1).argsort(axis=1)
    key = rank + rng.random((n_images, tokens_per_image))
    chosen = np.argpartition(key.ravel(), n_landmarks - 1)[:n_landmarks]
    return np.sort(chosen)


def landmark_coverage(landmarks: np.ndarray, queries: np.ndarray, radius: float) -> float:
    """Fraction of `queries` whose Euclidean-nearest landmark lies within `radius`."""
    if len(queries) == 0:
        return float("nan")
    squared, _ = exact_nearest(landmarks, queries)
    return float((np.sqrt(np.maximum(squared[:, 0], 0.0)) <= radius).mean())
