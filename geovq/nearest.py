"""The one exact nearest-neighbour search (faiss flat L2) that codebooks, W2 medoids and landmarks share."""

from __future__ import annotations

import numpy as np


def exact_nearest(base: np.ndarray, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest rows of `base` by Euclidean distance, exactly.

    base (M, d), queries (Q, d) -> (squared distances (Q, k) float32, row ids (Q, k) int64). faiss computes
    in float32, which is what every caller stores its latents in.
    """
    import faiss

    index = faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    squared, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return squared, ids.astype(np.int64)
