"""The one exact nearest-neighbour search (faiss flat L2) that codebooks, W2 medoids and landmarks share, and the
one first-order cost of codes under each point's own metric tensor (pull-back and geodesic codes)."""

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


def metric_costs(points: np.ndarray, metrics: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(n, K) float64 (c_k − z_i)ᵀ G_i (c_k − z_i) for points (n, d), metrics (n, d, d), codebook (K, d).

    Expanded as vec(G_i)·vec(c_k c_kᵀ) − 2 (G_i z_i)·c_k + z_iᵀG_i z_i: two matrix products, no (n, K, d).
    """
    n, d = points.shape
    z = points.astype(np.float64)
    c = codebook.astype(np.float64)
    g = metrics.reshape(n, d * d)
    gz = np.einsum("nij,nj->ni", metrics, z)
    outer = (c[:, :, None] * c[:, None, :]).reshape(len(c), d * d)
    return g @ outer.T - 2.0 * gz @ c.T + np.einsum("ni,ni->n", gz, z)[:, None]
