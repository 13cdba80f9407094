"""k-nearest-neighbour graph over latent points (DESIGN.md §3.3a).

faiss finds each point's k nearest neighbours: exactly (IndexFlatL2) by default, or approximately with an
inverted-file index (IndexIVFFlat) for large N. Given the pull-back metric tensors G_n at the nodes, the
neighbours are then re-chosen under the metric (NN-descent: a node's candidates are its neighbours and
their neighbours, ranked by its own metric length ‖Δ‖_{G_i} = sqrt(Δᵀ G_i Δ), until no list changes).
Why: where the decoder stretches one latent direction far more than another, latent-Euclidean neighbours
all lie along the cheap direction and shortest paths must zig-zag (on sklearn's swiss roll, 24% error at
the 90th percentile with k=10); metric neighbours are isotropic where it matters, in the image.

The directed relation "j is among i's k nearest" is
symmetrised with max (an edge exists if either end chose the other; an edge chosen by both ends is still
one edge, never two summed), and the result is checked to be symmetric. Each undirected edge appears once in
`edges` with i < j: that is the edge every cost figure counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from geovq.errors import GeovqError
from geovq.nearest import exact_nearest

INDEXES = ("auto", "exact", "ivf")
#: "auto" searches exactly up to this many points (exact search is O(N²d) but simple and exact)
EXACT_UP_TO = 200_000
#: float64 values per chunk when ranking candidates under the metric (rows × candidates × d)
METRIC_ELEMENTS = 2**23


@dataclass
class KnnGraph:
    n_nodes: int
    k: int
    edges: np.ndarray  # (E, 2) int64, i < j, each undirected edge once
    euclidean: np.ndarray  # (E,) float64 latent-space lengths ‖z_i − z_j‖
    component: np.ndarray  # (N,) connected-component label of each node
    index: str  # "exact" or "ivf"
    missing_neighbours: int  # neighbour slots an approximate search left empty (0 for exact)
    neighbours: np.ndarray  # (N, k) each node's own chosen neighbours (-1: none), before symmetrisation
    metric_rounds: int  # NN-descent rounds under the pull-back metric (0: latent-Euclidean neighbours)

    @property
    def n_components(self) -> int:
        return int(self.component.max()) + 1 if self.n_nodes else 0

    @property
    def component_sizes(self) -> np.ndarray:
        return np.bincount(self.component)

    def summary(self) -> dict:
        sizes = self.component_sizes
        return {"nodes": self.n_nodes, "k": self.k, "undirected_edges": len(self.edges), "index": self.index,
                "components": self.n_components, "largest_component": int(sizes.max()),
                "smallest_component": int(sizes.min()), "missing_neighbours": self.missing_neighbours,
                "metric_rounds": self.metric_rounds}


def knn_graph(points: np.ndarray, k: int, index: str = "auto", nprobe: int | None = None,
              metrics: np.ndarray | None = None, max_rounds: int = 20) -> KnnGraph:
    """Symmetric k-NN graph of `points` (N, d), under the metric tensors `metrics` (N, d, d) if given."""
    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    if not 1 <= k < n:
        raise GeovqError(f"k={k} neighbours needs 1 <= k < N; there are N={n} points")
    if index not in INDEXES:
        raise GeovqError(f"k-NN index {index!r} is unknown; valid: {', '.join(INDEXES)}")
    kind = ("exact" if n <= EXACT_UP_TO else "ivf") if index == "auto" else index
    neighbours = latent_neighbours(points, k, kind, nprobe)
    rounds = 0
    if metrics is not None:
        neighbours, rounds = metric_neighbours(points, metrics, neighbours, max_rounds)
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.ravel()
    found = cols >= 0
    # Symmetrise the 0/1 structure with max: lengths are attached later, and an explicit 0 (two equal
    # points) must stay an edge, which a max over weighted matrices would drop.
    chosen = sp.csr_matrix((np.ones(found.sum()), (rows[found], cols[found])), shape=(n, n))
    sym = chosen.maximum(chosen.T)
    assert (sym != sym.T).nnz == 0, "k-NN graph is not symmetric after symmetrisation"
    upper = sp.triu(sym, k=1).tocoo()
    edges = np.stack([upper.row, upper.col], axis=1).astype(np.int64)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    edges = edges[order]
    _, component = connected_components(sym, directed=False)
    euclidean = np.linalg.norm(points[edges[:, 1]] - points[edges[:, 0]], axis=1)
    return KnnGraph(n, k, edges, euclidean, component, kind, int((~found).sum()), neighbours, rounds)


def metric_neighbours(points: np.ndarray, metrics: np.ndarray, neighbours: np.ndarray,
                      max_rounds: int = 20) -> tuple[np.ndarray, int]:
    """NN-descent of (N, k) neighbour lists under each node's own metric; returns (lists, rounds).

    A node's candidates are its neighbours and their neighbours. Only nodes whose candidate set changed
    in the last round are ranked again (the others would get the same answer).
    """
    n, k = neighbours.shape
    self_ids = np.arange(n)
    stale = np.ones(n, dtype=bool)  # nodes whose candidates may have changed
    for rounds in range(1, max_rounds + 1):
        rows = np.flatnonzero(stale)
        known = np.where(neighbours >= 0, neighbours, self_ids[:, None])  # -1 slots: self, excluded below
        candidates = np.concatenate([known[rows], known[known[rows]].reshape(len(rows), k * k)], axis=1)
        updated = nearest_by_metric(points[rows], metrics[rows], candidates, points, k, exclude=rows)
        changed = np.zeros(n, dtype=bool)
        changed[rows] = (np.sort(updated, axis=1) != np.sort(neighbours[rows], axis=1)).any(axis=1)
        if not changed.any():
            break
        neighbours = neighbours.copy()
        neighbours[rows] = updated
        # next round: nodes that changed, or that list a node that changed (their 2-hop set moved)
        stale = changed | (changed[known] & (neighbours >= 0)).any(axis=1)
    return neighbours, rounds


def nearest_by_metric(query_points: np.ndarray, query_metrics: np.ndarray, candidates: np.ndarray,
                      points: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(Q, k) the k candidates (Q, c) nearest each query q by ‖Δ‖_{G_q}; -1 where fewer exist.

    The query's own metric ranks its candidates (a Mahalanobis k-NN per node): one (c, d) × (d, d) product
    per query, where also using each candidate's metric would gather c·d² values per query. Duplicate
    candidates count once; candidate `exclude[q]` (the query itself) is skipped.
    """
    n_query, n_cand = candidates.shape
    d = points.shape[1]
    out = np.empty((n_query, k), dtype=np.int64)
    rows = max(1, METRIC_ELEMENTS // (n_cand * d))
    for start in range(0, n_query, rows):
        sl = slice(start, start + rows)
        cand = np.sort(candidates[sl], axis=1)
        delta = points[cand] - query_points[sl, None, :]  # (r, c, d)
        length = np.sqrt(np.maximum(((delta @ query_metrics[sl]) * delta).sum(-1), 0.0))
        length[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf
        if exclude is not None:
            length[cand == exclude[sl, None]] = np.inf
        pick = np.argsort(length, axis=1, kind="stable")[:, :k]
        out[sl] = np.where(np.isfinite(np.take_along_axis(length, pick, axis=1)),
                           np.take_along_axis(cand, pick, axis=1), -1)
    return out


def latent_neighbours(points: np.ndarray, k: int, kind: str = "exact", nprobe: int | None = None) -> np.ndarray:
    """(N, k) neighbour ids of every point, itself excluded; -1 where an approximate search found none."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    n, d = x.shape
    if kind == "exact":
        _, found = exact_nearest(x, x, k + 1)
    else:
        # ~4·sqrt(N) lists, each trained with >= 39 points (faiss's minimum for a stable k-means)
        n_lists = int(np.clip(4 * np.sqrt(n), 1, max(1, n // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, n_lists)
        index.train(x)
        index.nprobe = nprobe or min(n_lists, 32)
        index.add(x)
        _, found = index.search(x, k + 1)
    # Drop each point itself. With duplicate points, faiss may list a twin first and the point itself later
    # (or not at all): sort "is self" to the back, stably, and keep the first k.
    is_self = found == np.arange(n)[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(found, keep, axis=1).astype(np.int64)
