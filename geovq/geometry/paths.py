"""Shortest paths on the re-weighted k-NN graph: scipy.sparse.csgraph's Dijkstra (DESIGN.md §3.3c).

Distances between nodes of different connected components are inf: nothing here replaces them with a
constant. Callers that need finite distances (k-medoids) work per component.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra

from geovq.errors import GeovqError

#: cap on the float64 entries one Dijkstra call returns (rows × nodes), to bound memory
DIJKSTRA_ENTRIES = 2**23


def weighted_graph(n_nodes: int, edges: np.ndarray, lengths: np.ndarray) -> sp.csr_matrix:
    """Symmetric (N, N) CSR matrix with each undirected edge (i < j) stored once in each direction.

    Zero lengths (coincident points) are kept as explicit entries, which csgraph treats as edges.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if not (np.isfinite(lengths).all() and (lengths >= 0).all()):
        raise GeovqError("edge lengths must be finite and non-negative; the decoder's Jacobian gave "
                         f"{int((~np.isfinite(lengths)).sum())} non-finite and {int((lengths < 0).sum())} negative")
    i, j = edges[:, 0], edges[:, 1]
    graph = sp.csr_matrix((np.concatenate([lengths, lengths]), (np.concatenate([i, j]), np.concatenate([j, i]))),
                          shape=(n_nodes, n_nodes))
    assert graph.nnz == 2 * len(edges), "duplicate edges were summed: edges must be unique with i < j"
    assert (graph != graph.T).nnz == 0, "weighted graph is not symmetric"
    return graph


def shortest_paths(graph: sp.csr_matrix, sources: np.ndarray, limit: float = np.inf) -> np.ndarray:
    """(len(sources), N) graph distances; inf where unreachable (or beyond `limit`)."""
    sources = np.asarray(sources, dtype=np.int64)
    rows = max(1, DIJKSTRA_ENTRIES // max(1, graph.shape[0]))
    out = np.empty((len(sources), graph.shape[0]))
    for start in range(0, len(sources), rows):
        out[start:start + rows] = dijkstra(graph, directed=True, indices=sources[start:start + rows], limit=limit)
    return out


def shortest_path_trees(graph: sp.csr_matrix, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distances, predecessors), each (len(sources), N): Dijkstra from each source; predecessor -9999 at
    the source itself and at unreachable nodes (scipy's convention)."""
    return dijkstra(graph, directed=True, indices=np.asarray(sources, dtype=np.int64), return_predecessors=True)


def path_nodes(predecessors: np.ndarray, trees: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B, H) the node ids of each shortest path, source first, padded at the end with its target.

    predecessors: (S, N) shortest-path trees (`shortest_path_trees`); path b runs in tree trees[b] to
    targets[b], which must be reachable in it.
    """
    rows = np.asarray(trees, dtype=np.int64)
    walk = [np.asarray(targets, dtype=np.int64)]
    while True:
        prev = predecessors[rows, walk[-1]]
        if (prev < 0).all():
            break
        walk.append(np.where(prev >= 0, prev, walk[-1]))
    back = np.stack(walk[::-1], axis=1)  # (B, H): each row starts with its source, repeated while shorter
    hops = (back[:, 1:] != back[:, :-1]).sum(1)
    first = back.shape[1] - 1 - hops  # where each row's path begins
    index = np.minimum(first[:, None] + np.arange(back.shape[1])[None], back.shape[1] - 1)
    return np.take_along_axis(back, index, axis=1)


def voronoi(graph: sp.csr_matrix, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-source Dijkstra (min_only): each node's distance to its nearest source, and which source.

    Returns (distance (N,), label (N,)), label indexing `sources`; unreachable nodes get inf and -1.
    Ties go to the source whose path Dijkstra settles first; a node's shortest path from its source runs
    through nodes with the same label, so each Voronoi cell is connected.
    """
    sources = np.asarray(sources, dtype=np.int64)
    dist, _, nearest = dijkstra(graph, directed=True, indices=sources, min_only=True, return_predecessors=True)
    position = np.full(graph.shape[0], -1, dtype=np.int64)
    position[sources] = np.arange(len(sources))
    label = np.where(nearest >= 0, position[np.maximum(nearest, 0)], -1)
    return dist, label


class GraphSpace:
    """A graph as a metric space for k-medoids (`geovq.geometry.medoids`), which works per component.

    `clock["paths"]` accumulates the seconds spent in shortest-path searches (shared with subspaces), so
    that a fit can split its k-medoids time into paths and the rest.
    """

    def __init__(self, graph: sp.csr_matrix, clock: dict[str, float] | None = None) -> None:
        self.graph = graph.tocsr()
        self.clock = {"paths": 0.0} if clock is None else clock

    @property
    def n(self) -> int:
        return self.graph.shape[0]

    def components(self) -> np.ndarray:
        """(N,) connected-component label of each node."""
        return connected_components(self.graph, directed=False)[1]

    def subspace(self, nodes: np.ndarray) -> GraphSpace:
        return GraphSpace(self.graph[nodes][:, nodes], self.clock)

    def distances_from(self, sources: np.ndarray, limit: float = np.inf) -> np.ndarray:
        with self._timed():
            return shortest_paths(self.graph, sources, limit)

    def pairwise(self, nodes: np.ndarray) -> np.ndarray:
        """(m, m) full-graph distances among `nodes` (paths may leave the set)."""
        rows = max(1, DIJKSTRA_ENTRIES // self.n)
        with self._timed():
            return np.concatenate([shortest_paths(self.graph, nodes[s:s + rows])[:, nodes]
                                   for s in range(0, len(nodes), rows)]) if len(nodes) else np.zeros((0, 0))

    def assign(self, medoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._timed():
            dist, label = voronoi(self.graph, medoids)
        assert (label >= 0).all(), "k-medoids space must be connected"
        return dist, label

    def best_medoid(self, members: np.ndarray, candidates: np.ndarray) -> tuple[int, float]:
        """The candidate with the least summed distance to `members`, measured in the members' subgraph.

        The induced subgraph of a Voronoi cell contains every shortest path from its medoid to its members,
        so the current medoid's cost is exact here and any other candidate's is an upper bound on its
        full-graph cost: choosing the minimum never increases the k-medoids objective.
        """
        with self._timed():
            sub = self.graph[members][:, members]
            local = np.searchsorted(members, candidates)  # members are sorted
            rows = max(1, DIJKSTRA_ENTRIES // len(members))
            cost = np.concatenate([dijkstra(sub, directed=True, indices=local[s:s + rows]).sum(axis=1)
                                   for s in range(0, len(local), rows)])
        best = int(np.argmin(cost))
        return int(candidates[best]), float(cost[best])

    @contextmanager
    def _timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.clock["paths"] += time.perf_counter() - t0
