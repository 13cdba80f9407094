"""The geodesic graph (k-NN graph re-weighted by decoder-metric edge lengths) and the public distance call.

    from geovq.geometry import geodesic_distances
    D = geodesic_distances(latents, decoder, sources=[0, 5], k=10, quadrature="midpoint")  # (2, N)
    D = geodesic_distances(latents, decoder, sources=[0, 5], refine=True)  # discrete geodesics' lengths

The `geodesic` quantizer builds its graph with the same `build_geodesic_graph`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from geovq.errors import GeovqError
from geovq.geometry.curves import N_SEGMENTS, TOL, refine_pairs
from geovq.geometry.decoders import FlatTokenDecoder, TokenDecoder
from geovq.geometry.lengths import check_quadrature, edge_lengths, node_metrics
from geovq.geometry.knn import KnnGraph, knn_graph
from geovq.geometry.paths import path_nodes, shortest_path_trees, shortest_paths, weighted_graph

NEIGHBOURS = ("metric", "latent")
INITS = ("path", "straight")  # where a refined curve starts: the shortest graph path, or the straight segment
#: refined curves per refine_pairs call in refined_distances (bounds the (pairs, path hops) arrays)
REFINE_PAIRS = 2**14
EdgeLengths = Callable[[np.ndarray], np.ndarray]
#: most float64 metric-tensor values (N·d²) kept in memory for metric neighbours (1 GiB)
METRIC_VALUES = 2**27
log = logging.getLogger(__name__)


@dataclass
class GeodesicGraph:
    knn: KnnGraph
    lengths: np.ndarray  # (E,) decoder-metric length of each undirected edge in knn.edges
    graph: sp.csr_matrix  # (N, N) symmetric, those lengths
    metrics: np.ndarray | None  # (N, d, d) the nodes' metric tensors, when metric neighbours computed them
    seconds: dict = field(default_factory=dict)  # wall time per stage: "graph", "lengths"


def build_geodesic_graph(dec: TokenDecoder, k: int = 10, quadrature: str = "midpoint", index: str = "auto",
                         neighbours: str = "metric", metrics: np.ndarray | None = None,
                         edge_lengths_fn: EdgeLengths | None = None, **length_options) -> GeodesicGraph:
    """k-NN graph of the decoder's nodes, each undirected edge weighted by its decoder-metric length.

    neighbours="metric" chooses each node's k neighbours under the pull-back metric (see `knn`), from the
    metric tensors G_n at the nodes (d tangent passes per node, then reused by the endpoint rule). It falls
    back to latent-Euclidean neighbours, with a warning, when N·d² float64 values would exceed
    METRIC_VALUES; neighbours="latent" always uses them. `metrics`: the nodes' metric tensors if already known.

    `edge_lengths_fn(edges) -> lengths` measures the undirected edges (E, 2) instead of the in-process
    `edge_lengths` (e.g. sharded over Ray Data workers, `geovq.stages.edges`); it must return the same numbers.
    """
    check_quadrature(quadrature)
    if neighbours not in NEIGHBOURS:
        raise GeovqError(f"neighbours {neighbours!r} is unknown; valid: {', '.join(NEIGHBOURS)}")
    t0 = time.perf_counter()
    if neighbours != "metric":
        metrics = None  # latent neighbours: endpoint terms come from the nodes' own JVPs, as always
    elif metrics is None:
        if dec.n_nodes * dec.dim**2 <= METRIC_VALUES:
            metrics = node_metrics(dec, **_chunking(length_options))
        else:
            log.warning("metric tensors of %d nodes in %d dims exceed %d values: latent-Euclidean neighbours",
                        dec.n_nodes, dec.dim, METRIC_VALUES)
    t1 = time.perf_counter()
    knn = knn_graph(dec.points, k, index, metrics=metrics)
    t2 = time.perf_counter()
    if edge_lengths_fn is not None and not (quadrature == "endpoint" and metrics is not None):
        lengths = np.asarray(edge_lengths_fn(knn.edges), dtype=np.float64)
    else:  # (endpoint lengths from known metric tensors cost no decoder call: nothing to hand out)
        lengths = edge_lengths(dec, knn.edges, quadrature, metrics=metrics, **length_options)
    t3 = time.perf_counter()
    return GeodesicGraph(knn, lengths, weighted_graph(dec.n_nodes, knn.edges, lengths), metrics,
                         {"metrics": t1 - t0, "graph": t2 - t1, "lengths": t3 - t2})


def _chunking(length_options: dict) -> dict:
    return {key: value for key, value in length_options.items() if key == "chunk_elements"}


def geodesic_distances(latents, decoder: Callable[[torch.Tensor], torch.Tensor], sources, k: int = 10,
                       quadrature: str = "midpoint", refine: bool = False, targets=None, init: str = "path",
                       n_segments: int = N_SEGMENTS, tol: float = TOL) -> np.ndarray:
    """Geodesic distances under the decoder's pull-back metric, shape (len(sources), N) (or len(targets)).

    latents: (N, d) float array or tensor. decoder: a callable from a (B, d) tensor to a (B, ...) tensor
    (an nn.Module is put in eval mode). It is called with float64 tensors when the latents are float64 and
    it accepts them, otherwise with float32 tensors (and in its parameters' dtype if it is an nn.Module);
    lengths are accumulated in float64. Each point's k neighbours are chosen under the pull-back metric,
    the graph is symmetrised, and every edge carries its decoder-metric length (`quadrature`: midpoint,
    simpson, endpoint or adaptive). Entry (s, j) is the length of the shortest path from latents[sources[s]]
    to latents[targets[j]] (all points when targets is None); points in another connected component than
    the source are unreachable: inf.

    refine=True: each finite entry becomes the length of a discrete geodesic (`geovq.geometry.curves`, T =
    n_segments segments, energy converged to the relative tolerance `tol`), started from the shortest path
    resampled at equal graph length (init="path") or from the straight segment (init="straight"). A k-NN
    path overestimates, increasingly with the latent dimension (DESIGN.md §3.9); a refined curve does not.
    Cost: one refined curve per entry (a few thousand per second for cheap decoders on one core).
    """
    points, dtype = _as_points(latents)
    n = points.shape[0]
    if not 1 <= k < n:
        raise GeovqError(f"k={k} neighbours needs 1 <= k < N; there are N={n} latent points")
    sources = _node_ids(sources, n, "sources")
    targets = np.arange(n) if targets is None else _node_ids(targets, n, "targets")
    check_quadrature(quadrature)
    if refine and init not in INITS:
        raise GeovqError(f"init {init!r} is unknown; valid: {', '.join(INITS)}")
    if refine and not tol > 0:
        raise GeovqError(f"tol={tol} must be > 0 (the relative energy decrease below which a curve stops)")
    dec = FlatTokenDecoder(decoder, points, dtype)
    graph = build_geodesic_graph(dec, k, quadrature).graph
    if not refine:
        return shortest_paths(graph, sources)[:, targets]
    return refined_distances(dec, graph, sources, targets, init, n_segments, tol)


def refined_distances(dec: TokenDecoder, graph: sp.csr_matrix, sources: np.ndarray, targets: np.ndarray,
                      init: str = "path", n_segments: int = N_SEGMENTS, tol: float = TOL,
                      pairs_per_call: int = REFINE_PAIRS) -> np.ndarray:
    """(len(sources), len(targets)) refined geodesic lengths between graph nodes: inf where the graph has no
    path (another connected component), 0 from a node to itself, else the refined curve's length."""
    out = np.empty((len(sources), len(targets)))
    rows = max(1, pairs_per_call // max(1, len(targets)))
    for start in range(0, len(sources), rows):
        block = sources[start:start + rows]
        dist, pred = shortest_path_trees(graph, block)
        d = dist[:, targets]  # (b, targets)
        out[start:start + len(block)] = d
        row, col = np.nonzero(np.isfinite(d) & (block[:, None] != targets[None]))
        for s in range(0, len(row), pairs_per_call):
            r, c = row[s:s + pairs_per_call], col[s:s + pairs_per_call]
            src, tgt = block[r], targets[c]
            if init == "path":
                path = path_nodes(pred, r, tgt)
                curves = refine_pairs(dec, src, tgt, paths=path, path_lengths=dist[r[:, None], path],
                                      n_segments=n_segments, tol=tol)
            else:
                curves = refine_pairs(dec, src, tgt, n_segments=n_segments, tol=tol)
            out[start + r, c] = curves.lengths
        out[start:start + len(block)][block[:, None] == targets[None]] = 0.0
    return out


def _node_ids(ids, n: int, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or (ids >= n).any():
        raise GeovqError(f"{name} must be a 1-D array of integer indices in [0, {n}); got {ids!r}")
    return ids.astype(np.int64)


def _as_points(latents) -> tuple[np.ndarray, torch.dtype]:
    if isinstance(latents, torch.Tensor):
        dtype = latents.dtype
        latents = latents.detach().cpu().numpy()
    else:
        latents = np.asarray(latents)
        dtype = torch.float32 if latents.dtype == np.float32 else torch.float64
    if latents.ndim != 2 or latents.shape[0] < 2 or not np.issubdtype(latents.dtype, np.floating):
        raise GeovqError(f"latents must be an (N, d) float array with N >= 2; got shape {latents.shape}, "
                         f"dtype {latents.dtype}")
    if not np.isfinite(latents).all():
        raise GeovqError(f"latents contain {int((~np.isfinite(latents)).sum())} NaN or inf values")
    return latents.astype(np.float64), (torch.float32 if dtype == torch.float32 else torch.float64)


def geometry_sample(points: np.ndarray, graph: GeodesicGraph, rng: np.random.Generator, n_sources: int = 20,
                    n_pairs: int = 400, n_edges: int = 400) -> dict[str, dict[str, list[float]]]:
    """What a report draws of a fitted graph (DESIGN.md §3): graph geodesic against Euclidean distance for
    n_pairs landmark pairs (Dijkstra from n_sources landmarks), and the decoder-metric length of n_edges edges
    against their Euclidean chords. 5 significant digits: a sample for a picture, small in fit_info."""
    from scipy.sparse.csgraph import dijkstra

    n = len(points)
    sources = rng.choice(n, size=min(n_sources, n), replace=False)
    targets = rng.choice(n, size=(len(sources), max(1, n_pairs // len(sources))))
    dist = dijkstra(graph.graph, directed=True, indices=sources)[np.arange(len(sources))[:, None], targets]
    chord = np.linalg.norm(points[sources][:, None] - points[targets], axis=-1)
    keep = np.isfinite(dist) & (chord > 0)  # unreachable pairs and a source drawn as its own target say nothing
    edges = rng.choice(len(graph.lengths), size=min(n_edges, len(graph.lengths)), replace=False)
    i, j = graph.knn.edges[edges].T
    edge_chord = np.linalg.norm(points[i] - points[j], axis=1)

    def short(values: np.ndarray) -> list[float]:
        return [float(f"{v:.5g}") for v in values]

    return {"pairs": {"euclidean": short(chord[keep]), "graph": short(dist[keep])},
            "edges": {"euclidean": short(edge_chord), "length": short(graph.lengths[edges])}}
