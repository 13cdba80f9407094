"""The one exact nearest-neighbour search (faiss flat L2) that codebooks, W2 medoids and landmarks share, and the
one first-order cost of codes under each point's own metric tensor (pull-back and geodesic codes)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

#: bytes of one block of (rows, K) float64 metric costs: bounds the memory of the metric searches below
COST_BLOCK_BYTES = 64 << 20


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


def _cost_blocks(points: np.ndarray, metrics: np.ndarray, codebook: np.ndarray
                 ) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, their (rows, K) metric_costs) over blocks of at most COST_BLOCK_BYTES of costs."""
    rows = max(1, COST_BLOCK_BYTES // (8 * len(codebook)))
    for s in range(0, len(points), rows):
        yield slice(s, s + rows), metric_costs(points[s:s + rows], metrics[s:s + rows], codebook)


def metric_nearest(points: np.ndarray, metrics: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(n,) int64: each point's cheapest code under its own metric tensor (first order)."""
    labels = np.empty(len(points), dtype=np.int64)
    for rows, costs in _cost_blocks(points, metrics, codebook):
        labels[rows] = costs.argmin(1)
    return labels


def metric_shortlist(points: np.ndarray, metrics: np.ndarray, codebook: np.ndarray, size: int) -> np.ndarray:
    """(n, min(size, K)) int64: each point's `size` cheapest codes under its own metric tensor, cheapest first."""
    size = min(size, len(codebook))
    out = np.empty((len(points), size), dtype=np.int64)
    for rows, costs in _cost_blocks(points, metrics, codebook):
        top = np.argpartition(costs, size - 1, axis=1)[:, :size]
        order = np.argsort(np.take_along_axis(costs, top, 1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(top, order, 1)
    return out
