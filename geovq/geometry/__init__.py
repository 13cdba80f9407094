"""Riemannian geometry of a decoder's latent space, usable alone (no Ray, no CLI). DESIGN.md §3.3.

- `knn_graph`: symmetric k-NN graph (faiss exact or IVF), components reported.
- `FlatTokenDecoder`, `GridTokenDecoder`: nodes and their decoder maps, each token in its own image.
- `edge_lengths`, `pair_lengths`, `node_metrics`: segment lengths under the pull-back metric (midpoint,
  simpson, endpoint, adaptive) and metric tensors G = JᵀJ at the nodes, by batched torch.func JVPs.
- `shortest_paths`, `voronoi`: Dijkstra (scipy.sparse.csgraph), multi-source for Voronoi cells.
- `kmedoids`: k-means++ seeding, FasterPAM swaps or alternate iterations, per-component quotas.
- `refine_pairs`, `refine_curves`: discrete geodesics (curve-energy minimisation) between token pairs, in one
  context or the mean of two; `geodesic_distances(..., refine=True)` refines graph distances with them.
- `geodesic_distances(latents, decoder, sources, k=10, quadrature="midpoint")`: the one-call entry point.
- `geovq.geometry.manifolds`: analytic decoders with closed-form geodesics in any dimension (accuracy checks).
"""

from geovq.geometry.curves import Curves, refine_curves, refine_pairs, resample_paths, straight_curves
from geovq.geometry.decoders import FlatTokenDecoder, GridTokenDecoder, TokenDecoder
from geovq.geometry.lengths import QUADRATURES, edge_lengths, node_metrics, own_speeds, pair_lengths, speeds
from geovq.geometry.graph import GeodesicGraph, build_geodesic_graph, geodesic_distances
from geovq.geometry.medoids import (EuclideanSpace, KMedoidsResult, component_quotas, kmeans_plus_plus,
                                    kmedoids)
from geovq.geometry.knn import KnnGraph, knn_graph
from geovq.geometry.landmarks import landmark_coverage, stratified_tokens
from geovq.geometry.paths import (GraphSpace, path_nodes, shortest_path_trees, shortest_paths, voronoi,
                                  weighted_graph)

__all__ = [
    "QUADRATURES", "Curves", "EuclideanSpace", "FlatTokenDecoder", "GeodesicGraph", "GraphSpace", "GridTokenDecoder",
    "KMedoidsResult", "KnnGraph", "TokenDecoder", "build_geodesic_graph", "component_quotas", "edge_lengths",
    "geodesic_distances", "kmeans_plus_plus", "kmedoids", "knn_graph", "landmark_coverage", "node_metrics",
    "own_speeds", "pair_lengths", "path_nodes", "refine_curves", "refine_pairs", "resample_paths",
    "shortest_path_trees", "shortest_paths", "speeds", "straight_curves", "stratified_tokens", "voronoi",
    "weighted_graph",
]
