"""Geodesic k-medoids on μ under the decoder's pull-back metric (DESIGN.md §3.3).

fit: landmark tokens (stratified across images) -> k-NN graph with each token's Jacobian taken in its own
image's μ-grid -> decoder-metric edge lengths -> k-medoids on graph distances. The codebook is the medoids'
μ. Then one multi-source Dijkstra from the medoids gives every landmark j its distance D(j) and code
label(j).

encode (the graph-insertion rule, §3.3e): a token q finds its k graph neighbours among the landmarks (chosen
the way the graph chose them), measures L_qj = ½(ℓ_q + ℓ_j) with ℓ_q in q's own image and ℓ_j in j's, and
gets label[argmin_j (L_qj + D(j))]. It costs about d + 1 decoder passes per token (its own Jacobian in its
own image), so two approximations without any decoder call are offered for whole splits:
- `landmark_metric`: the same rule with the endpoint length, q's metric tensor taken from its
  Euclidean-nearest landmark (needs the landmarks' metric tensors, i.e. metric neighbours);
- `nearest_landmark`: the Euclidean-nearest landmark's code.
`encode_tokens(..., rule=...)` runs any rule on any subset of tokens, so that an approximation can be
measured against the exact rule (agreement rate, ΔPSNR).

The quantizer needs the decoder: a callable from μ-grids (B, h, w, C) to images (B, ...), in eval mode.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import faiss
import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.geometry.decoders import GridTokenDecoder
from geovq.geometry.lengths import CHUNK_ELEMENTS, QUADRATURES, metric_norms, node_metrics, pair_lengths
from geovq.geometry.graph import METRIC_VALUES, NEIGHBOURS, build_geodesic_graph
from geovq.geometry.medoids import kmedoids
from geovq.geometry.knn import nearest_by_metric
from geovq.geometry.landmarks import landmark_coverage, stratified_tokens
from geovq.geometry.paths import GraphSpace
from geovq.latents import LatentSet
from geovq.quantize.base import Quantizer, register

ENCODE_RULES = ("graph", "landmark_metric", "nearest_landmark")
#: non-landmark training tokens sampled to measure coverage at fit time
COVERAGE_SAMPLE = 20_000
#: query tokens per encode chunk (their grids, metric tensors and k candidate edges live together)
ENCODE_CHUNK = 8192


@dataclass
class GeodesicConfig:
    k: int = 10  # graph neighbours per node
    quadrature: str = "midpoint"  # edge-length rule: midpoint, simpson, endpoint, adaptive
    neighbours: str = "metric"  # choose neighbours under the pull-back metric, or "latent" (Euclidean)
    max_landmarks: int = 20_000  # graph nodes; more training tokens are subsampled, stratified by image
    index: str = "auto"  # k-NN search: exact, ivf, auto
    encode_rule: str = "graph"  # graph (exact §3.3e), landmark_metric or nearest_landmark (approximations)
    exact_limit: int = 2000  # k-medoids: full distance matrix + FasterPAM up to this many nodes
    n_blocks: int = 0  # k-medoids: CLARA-style FasterPAM blocks after alternate iterations, at scale
    chunk_elements: int = CHUNK_ELEMENTS  # decoder output values per JVP call (memory bound)

    def __post_init__(self) -> None:
        if self.quadrature not in QUADRATURES:
            raise GeovqError(f"quadrature {self.quadrature!r} is unknown; valid: {', '.join(QUADRATURES)}")
        if self.neighbours not in NEIGHBOURS:
            raise GeovqError(f"neighbours {self.neighbours!r} is unknown; valid: {', '.join(NEIGHBOURS)}")
        if self.encode_rule not in ENCODE_RULES:
            raise GeovqError(f"encode_rule {self.encode_rule!r} is unknown; valid: {', '.join(ENCODE_RULES)}")
        if self.k < 1 or self.max_landmarks < 2:
            raise GeovqError(f"need k >= 1 and max_landmarks >= 2; got k={self.k}, "
                             f"max_landmarks={self.max_landmarks}")


@register("geodesic")
class GeodesicQuantizer(Quantizer):
    needs_decoder = True

    def __init__(self, n_codes: int, seed: int = 0, decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 **config: Any) -> None:
        super().__init__(n_codes, seed)
        if decoder is None:
            raise GeovqError("the geodesic quantizer needs decoder=: a callable from μ-grids (B, h, w, C) to images")
        self.decoder = decoder
        self.config = GeodesicConfig(**config)
        # fitted state (what encode needs): the landmark tokens in their images, each landmark's graph
        # distance D(j) to its nearest medoid and that medoid's code, the medoids' landmark ids, and each
        # landmark's own k graph neighbours (-1: none)
        self.landmarks: GridTokenDecoder | None = None
        self.landmark_distance: np.ndarray | None = None
        self.landmark_code: np.ndarray | None = None
        self.medoid_landmarks: np.ndarray | None = None
        self.landmark_neighbours: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {**super().params(), **asdict(self.config)}

    # -- fit ----------------------------------------------------------------------------------------
    def _fit(self, latents: LatentSet) -> None:
        cfg = self.config
        rng = np.random.default_rng(self.seed)
        n_landmarks = min(cfg.max_landmarks, latents.n_tokens)
        if self.n_codes > n_landmarks:
            raise GeovqError(f"K={self.n_codes} codes exceeds the {n_landmarks} landmarks; raise max_landmarks")
        if cfg.k >= n_landmarks:
            raise GeovqError(f"k={cfg.k} neighbours needs k < the {n_landmarks} landmarks")
        tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, n_landmarks, rng)
        self.landmarks = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
        graph = build_geodesic_graph(self.landmarks, cfg.k, cfg.quadrature, cfg.index, self._neighbour_rule(),
                                     chunk_elements=cfg.chunk_elements)
        t0 = time.perf_counter()
        result = kmedoids(GraphSpace(graph.graph), self.n_codes, self.seed, exact_limit=cfg.exact_limit,
                          n_blocks=cfg.n_blocks)
        medoid_seconds = time.perf_counter() - t0
        self.codebook = self.landmarks.points[result.medoids].astype(np.float32)
        self.landmark_distance, self.landmark_code = result.distances, result.labels
        self.medoid_landmarks, self.landmark_neighbours = result.medoids, graph.knn.neighbours
        radius = float(np.median(graph.knn.euclidean))
        others = np.setdiff1d(np.arange(latents.n_tokens), tokens)
        sample = rng.choice(others, size=min(len(others), COVERAGE_SAMPLE), replace=False)
        self.fit_info = {
            "landmarks": int(n_landmarks), "images": int(latents.n_images), "graph": graph.knn.summary(),
            "quotas": result.quotas.tolist(), "objective": result.objective, "converged": bool(result.converged),
            "trace": result.trace, "median_knn_edge": radius,
            "median_edge_length": float(np.median(graph.lengths)),
            # fraction of held-out training tokens whose nearest landmark lies within the median k-NN edge
            "coverage": (landmark_coverage(self.landmarks.points, latents.token_mu[sample], radius)
                         if len(sample) else None),  # None: every training token is a landmark
            "coverage_tokens": int(len(sample)),
            "seconds": {**graph.seconds, "medoids_seeding": result.seconds["seeding"],
                        "medoids_iterations": result.seconds["iterations"], "medoids_total": medoid_seconds},
        }

    def coverage(self, latents: LatentSet) -> float:
        """Fraction of `latents`' tokens whose nearest landmark lies within the median k-NN edge length."""
        self._check_fitted()
        return landmark_coverage(self.landmarks.points, latents.token_mu, self.fit_info["median_knn_edge"])

    # -- encode -------------------------------------------------------------------------------------
    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return self.encode_tokens(latents)

    def encode_tokens(self, latents: LatentSet, tokens: np.ndarray | None = None, rule: str | None = None,
                      ) -> np.ndarray:
        """Codes of `tokens` (ids into latents' tokens; all when None) by `rule` (default: the config's)."""
        self._check_fitted()
        rule = rule or self.config.encode_rule
        if rule not in ENCODE_RULES:
            raise GeovqError(f"encode rule {rule!r} is unknown; valid: {', '.join(ENCODE_RULES)}")
        if rule == "landmark_metric" and self._neighbour_rule() != "metric":
            raise GeovqError("encode rule 'landmark_metric' needs the landmarks' metric tensors "
                             "(neighbours='metric' within METRIC_VALUES); use 'graph' or 'nearest_landmark'")
        tokens = np.arange(latents.n_tokens) if tokens is None else np.asarray(tokens, dtype=np.int64)
        index = faiss.IndexFlatL2(self.landmarks.dim)
        index.add(np.ascontiguousarray(self.landmarks.points, dtype=np.float32))
        if rule == "nearest_landmark":
            _, nearest = index.search(np.ascontiguousarray(latents.token_mu[tokens], dtype=np.float32), 1)
            return self.landmark_code[nearest[:, 0]]
        codes = [self._insert(latents, tokens[s:s + ENCODE_CHUNK], index, rule)
                 for s in range(0, len(tokens), ENCODE_CHUNK)]
        return np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)

    def _insert(self, latents: LatentSet, tokens: np.ndarray, index: faiss.Index, rule: str) -> np.ndarray:
        """label[argmin_j (L_qj + D(j))] over each query's k graph neighbours, for one chunk of tokens."""
        cfg, land = self.config, self.landmarks
        k = min(cfg.k, land.n_nodes)
        if rule == "graph":
            queries = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
            points = queries.points
        else:  # landmark_metric: no decoder call; the query's metric is its nearest landmark's
            points = latents.token_mu[tokens].astype(np.float64)
        _, near = index.search(np.ascontiguousarray(points, dtype=np.float32), k)
        if self._neighbour_rule() == "metric":  # as in the graph: metric-nearest among near ∪ their neighbours
            if rule == "graph":
                query_metrics = node_metrics(queries, cfg.chunk_elements)
            else:
                query_metrics = self._landmark_metrics()[near[:, 0]]
            known = np.where(self.landmark_neighbours[near] >= 0, self.landmark_neighbours[near], near[:, :, None])
            candidates = np.concatenate([near, known.reshape(len(near), -1)], axis=1)
            near = nearest_by_metric(points, query_metrics, candidates, land.points, k)
        q = np.repeat(np.arange(len(tokens)), k)
        j = near.ravel()
        found = j >= 0
        q, j = q[found], j[found]
        if rule == "graph":
            length = pair_lengths(queries, q, land, j, cfg.quadrature, chunk_elements=cfg.chunk_elements)
        else:  # the endpoint rule with both metric tensors taken from landmarks
            delta = land.points[j] - points[q]
            length = 0.5 * (metric_norms(query_metrics[q], delta) + metric_norms(self._landmark_metrics()[j], delta))
        cost = np.full(len(found), np.inf)
        cost[found] = length + self.landmark_distance[j]
        best = np.argmin(cost.reshape(len(tokens), k), axis=1)
        return self.landmark_code[near[np.arange(len(tokens)), best]]

    def _landmark_metrics(self) -> np.ndarray:
        """The landmarks' metric tensors: kept from the fit, or computed once after `load`."""
        land = self.landmarks
        return land.metrics if land.metrics is not None else node_metrics(land, self.config.chunk_elements)

    def _neighbour_rule(self) -> str:
        """Metric neighbours unless the landmarks' metric tensors would not fit (as build_geodesic_graph)."""
        n, d = self.landmarks.n_nodes, self.landmarks.dim
        return "metric" if self.config.neighbours == "metric" and n * d * d <= METRIC_VALUES else "latent"

    # -- persistence --------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        land = self.landmarks
        return {"grids": land.grids, "image": land.image, "channels": land.channels, "distance": self.landmark_distance,
                "label": self.landmark_code, "medoids": self.medoid_landmarks, "neighbours": self.landmark_neighbours}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.landmarks = GridTokenDecoder(self.decoder, arrays["grids"], arrays["image"], arrays["channels"])
        self.landmark_distance, self.landmark_code = arrays["distance"], arrays["label"]
        self.medoid_landmarks, self.landmark_neighbours = arrays["medoids"], arrays["neighbours"]
