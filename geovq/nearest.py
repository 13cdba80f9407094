"""The one exact nearest-neighbour search (faiss flat L2) that codebooks, W2 medoids and landmarks share, the
one first-order cost of codes under each point's own metric tensor (pull-back and geodesic codes), and the test
of which codes a probed estimate of that metric cannot rule out (`probe_shortlist`, `probe_candidates`)."""

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


#: codes (the cheapest by the probes' estimate) that `probe_candidates` considers per token: on the MNIST TDC VAE the
#: pull-back exact rule's code was among the 4 cheapest for 99.9% of tokens (32 probes)
PROBE_SHORTLIST = 16


def probe_shortlist(probe_grads: np.ndarray, points: np.ndarray, codebook: np.ndarray, confidence: float,
                    ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """From probe gradients g (n, s, d) (Σ_j g_j g_jᵀ estimates each token's metric, `geometry.probes`): each
    token's PROBE_SHORTLIST cheapest codes by the estimate, cheapest (its estimated best b) first, (n, M), and which
    of them are not ruled out, (n, M) bool: b, and every code c for which cost(c) > ratio²·cost(b) is not shown at
    `confidence` standard errors of the per-probe differences. ratio 1: codes that might be cheaper than b
    (pull-back's exact rule decides by this cost); ratio r > 1: codes whose first-order length might be within r
    times b's (the geodesic rule, whose curves may reorder codes that close)."""
    n, s, _ = probe_grads.shape
    estimated = np.einsum("nsi,nsj->nij", probe_grads, probe_grads)
    shortlist = metric_shortlist(points, estimated, codebook, PROBE_SHORTLIST)  # (n, M), cheapest first
    # per-probe terms s·(g_jᵀ(c − z))², (n, s, M): their mean over j is the estimated cost of each listed code
    delta = codebook[shortlist] - points[:, None, :]  # (n, M, d)
    terms = s * np.einsum("nsd,nmd->nsm", probe_grads, delta) ** 2
    with np.errstate(invalid="ignore"):  # inf × 0: confidence or ratio inf keeps every listed code (below)
        differences = terms - ratio ** 2 * terms[:, :, :1]
        gap = differences.mean(1)
        spread = differences.std(1, ddof=1) / np.sqrt(s) if s > 1 else np.zeros_like(gap)
        listed = (gap < confidence * spread) | np.isinf(confidence) | np.isinf(ratio)
    listed[:, 0] = True
    return shortlist, listed


def probe_candidates(probe_grads: np.ndarray, points: np.ndarray, codebook: np.ndarray, confidence: float,
                     ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`probe_shortlist` as each token's estimated best code (n,) and the (n, K) mask of the codes not ruled out."""
    shortlist, listed = probe_shortlist(probe_grads, points, codebook, confidence, ratio)
    keep = np.zeros((len(shortlist), len(codebook)), dtype=bool)
    keep[np.repeat(np.arange(len(shortlist)), listed.sum(1)), shortlist[listed]] = True
    return shortlist[:, 0], keep
