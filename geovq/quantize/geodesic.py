"""Geodesic k-medoids on μ under the decoder's pull-back metric (DESIGN.md §3.3).

fit: landmark tokens (stratified across images) -> k-NN graph with each token's Jacobian taken in its own
image's μ-grid -> decoder-metric edge lengths -> k-medoids on graph distances. The codebook is the medoids'
μ. Then one multi-source Dijkstra from the medoids gives every landmark j its distance D(j) and code
label(j). The quantizer's default edge rule is `endpoint` (`geovq.geometry.geodesic_distances` keeps
`midpoint`): it needs only each landmark's own metric tensor G_j, which metric neighbour selection computes
anyway, so the lengths cost no further decoder call. The metric tensors (d tangent passes + 1 primal pass
of the full decoder per landmark) are then most of a fit's time; `midpoint` adds two JVPs per edge (each
end's segment in its own image), which roughly doubles a fit's decoder work at k=10 (bench/edge_lengths.py).

encode (the graph-insertion rule, §3.3e, rule "graph"): a token q finds its k graph neighbours among the
landmarks (chosen the way the graph chose them), measures L_qj = ½(ℓ_q + ℓ_j) with ℓ_q in q's own image and
ℓ_j in j's, and gets label[argmin_j (L_qj + D(j))]. It needs q's own metric tensor: d tangent passes of
the full decoder per token, about 5 ms per MNIST token on one core, i.e. 40 min for the 490k tokens of
MNIST's test split. So `encode` uses it for splits of at most `exact_encode_limit` tokens (default 10k:
under a minute on MNIST) and otherwise `approx_rule` (with paths="context", "auto" mostly takes context_probed,
below), or an approximation without any decoder call:
- `landmark_metric` ("auto"'s rule with paths="graph"): the same rule with the endpoint length, q's metric
  tensor G_q replaced by the mean metric tensor of the BORROWED landmarks most like q in the decoder's eyes:
  nearest in [token μ, CONTEXT_WEIGHT · μ of the 3×3 cells around it (all channels), POSITION_WEIGHT · (row,
  col)]. On MNIST test tokens (6000, stratified) it agrees with the exact rule on 98.5% (20k landmarks; 97.8%
  with 10k; 73.7% on a quick run's 1,000-landmark fit, bench/geodesic_probed.py). Borrowing from the
  Euclidean-nearest landmark instead gives 97.6% (96.1%), the mean of the 5 nearest 98.2% (96.9%): a token's
  metric depends on its context and its place in the image, not only on its μ.
  The landmark searches use inverted lists (see landmark_index); 490k MNIST tokens take under a minute.
- `nearest_landmark`: the Euclidean-nearest landmark's code (86% agreement with 20k landmarks, 80% with 10k).
Every approximately encoded split is measured against the exact rule on a stratified sample of its tokens
(`check_approximation`); `encode_with_info` returns the figures, and the unit's row keeps them. `encode_tokens(..., rule=...)` runs any rule on any subset of tokens.

paths (what decides a code; recorded in fit_info["paths"]):
- "graph" (the behaviour above; the default before in-context distances): graph distances. A path between
  tokens of different images runs through other images' contexts; on MNIST it hops into border cells, where
  the decoder hardly reacts, and is then the length of no curve in any image (bench/geodesic_context.py).
- "context" (default): replacing token i by code c changes image n(i) only, so the distance that decides i's
  code is d_i(c), the length of the shortest curve from z_i to c in image n(i) (DESIGN.md §3.9; refined by
  `geovq.geometry.curves` inside the latent box of the landmarks, since outside the latents the encoder
  produces the decoder saturates and curves escaping there are shorter than any through real images). The
  graph k-medoids only starts the fit: each landmark then takes the d_i-nearest medoid among its `shortlist`
  nearest by its own metric tensor (first-order d_i), and `context_iterations` rounds move medoids by Σ d_i
  over a sample of each cell (see `_fit_in_context`). Encode: the exact rule "context" (the query's own metric
  shortlists, its refined curves decide; a code that chord and straight-segment bounds leave alone is taken
  without refining, see `nearest_in_context`); for larger splits "landmark_metric" is the first-order
  in-context rule argmin_c ‖c − z_q‖_G with G borrowed as above, and "nearest_landmark" the landmark's
  in-context code. "context_probed" (`approx_rule="auto"`'s rule for splits up to `probed_encode_limit` tokens whose
  images have more metric directions, d × tokens, than `probes`: MNIST, CIFAR-10, not digits) decides by the exact
  rule wherever a first-order margin cannot: `probes` output probes per image estimate every token's own metric at
  once (`geometry.probes`, as pull-back's probed encode), and a token keeps the estimate's nearest code when every
  other code's first-order length is shown, at PROBE_CONFIDENCE standard errors of the probes, to exceed `margin`
  times its length; the other tokens are settled as the exact rule settles them, by refined curves in their own
  image, among the codes the probes left (at most `shortlist`, where the exact rule takes its shortlist by the exact
  metric: d tangent passes per token). Measured (2026-12-08): on 1,000 MNIST test images (TDC VAE of a quick run, K
  = 64, 1,000 landmarks) 99.88% of the exact codes, ΔPSNR -0.0004 dB on the check sample, 53% of tokens to curves,
  2.0-2.3x cheaper than the exact rule (37-45 decoder forward-equivalents per token; bench/geodesic_probed.py),
  where landmark_metric agrees on 73.7% only; on digits' main job (bench/geodesic_margin.py) 99.95-100%, but slower
  than the exact rule, as 128 probes are as many as digits' metric directions (16 tokens × d = 8). Its cost is the
  margin's: a token whose runner-up lies within 1.2x at first order needs curves.

The quantizer needs the decoder: a callable from μ-grids (B, h, w, C) to images (B, ...), in eval mode.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import faiss
import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import metric_nearest, metric_shortlist
from geovq.quantize.base import EncodeProgress, Quantizer, register

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the geometry engine imports torch: loaded when a fit or encode needs it
    import torch


ENCODE_RULES = ("graph", "context", "context_probed", "landmark_metric", "nearest_landmark")
#: "auto": context_probed with paths="context", landmark_metric with paths="graph"
APPROX_RULES = ("auto", *ENCODE_RULES[2:])
#: standard errors of the probes' estimate by which context_probed must show a token's margin (pull-back's default)
PROBE_CONFIDENCE = 2.0
PATHS = ("graph", "context")
#: paths=context: the latent box curves stay in is the landmarks' range widened by this share on each side
BOX_MARGIN = 0.01
NEIGHBOUR_RULES = ("metric", "latent")
#: fewest tokens an approximate encode is checked on against the exact rule (all, in smaller splits)
MIN_CHECK_TOKENS = 2000
#: non-landmark training tokens sampled to measure coverage at fit time
COVERAGE_SAMPLE = 20_000
#: query tokens per encode chunk (their grids, metric tensors and k candidate edges live together)
ENCODE_CHUNK = 8192
#: landmark_metric: a query borrows the mean metric tensor of this many context-nearest landmarks
BORROWED = 5
#: landmark_metric context features: weight of the 3×3 neighbourhood's μ and of the (row, col) position,
#: relative to the token's own μ (VAE latents are O(1)); chosen on MNIST, see the module docstring
CONTEXT_WEIGHT = 0.5
POSITION_WEIGHT = 3.0
#: ... searched after a PCA to this many dimensions (same agreement on MNIST as without, 5× faster)
CONTEXT_DIMS = 32
#: inverted lists searched by approximate rules (see landmark_index)
NPROBE = 16
#: images per decoder call when checking an approximation
DECODE_BATCH = 256
#: floor on a per-image MSE before PSNR = 10·log10(1/MSE) (caps PSNR at 120 dB, keeps figures finite)
MSE_FLOOR = 1e-12


@register("geodesic")
class GeodesicQuantizer(Quantizer):
    needs_decoder = True

    def __init__(self, n_codes: int, seed: int = 0, decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 k: int = 10, quadrature: str = "endpoint", neighbours: str = "metric", max_landmarks: int = 20_000,
                 index: str = "auto", exact_encode_limit: int = 10_000, approx_rule: str = "auto",
                 check_tokens: int = MIN_CHECK_TOKENS, exact_limit: int = 2000, n_blocks: int = 0,
                 chunk_elements: int | None = None, paths: str = "context", shortlist: int = 4,
                 context_iterations: int = 1, update_sample: int = 16, update_candidates: int = 4,
                 probes: int = 128, margin: float = 1.2, probed_encode_limit: int = 1_000_000) -> None:
        super().__init__(n_codes, seed)
        self.decoder = decoder  # a callable from μ-grids (B, h, w, C) to images, in eval mode
        self.k = k  # graph neighbours per node
        self.quadrature = quadrature  # edge length: endpoint (no decoder call), midpoint, simpson, adaptive
        self.neighbours = neighbours  # choose neighbours under the pull-back metric, or "latent" (Euclidean)
        self.max_landmarks = max_landmarks  # graph nodes; more training tokens are subsampled, by image
        self.index = index  # k-NN search: exact, ivf, auto
        self.exact_encode_limit = exact_encode_limit  # splits of at most this many tokens: the exact rule
        self.approx_rule = approx_rule  # larger splits: context_probed, landmark_metric, nearest_landmark, auto
        self.check_tokens = check_tokens  # tokens of an approximately encoded split re-encoded exactly
        self.exact_limit = exact_limit  # k-medoids: full distance matrix + FasterPAM up to this many nodes
        self.n_blocks = n_blocks  # k-medoids: CLARA-style FasterPAM blocks after alternate iterations
        self.chunk_elements = chunk_elements  # decoder output values per JVP call (None: the engine's default)
        self.paths = paths  # what decides a code: "context" (curves in the token's own image) or "graph"
        self.shortlist = shortlist  # paths=context: codes per token refined as curves in its own image
        self.context_iterations = context_iterations  # paths=context: medoid-update rounds after graph k-medoids
        self.update_sample = update_sample  # paths=context: members of a cell that score candidate medoids
        self.update_candidates = update_candidates  # paths=context: candidate medoids per cell and round
        self.probes = probes  # context_probed: output probes per image estimating every token's metric
        self.margin = margin  # context_probed: first-order length ratio to the runner-up that keeps a code
        self.probed_encode_limit = probed_encode_limit  # approx_rule=auto: context_probed up to this many tokens

    def _validate_params(self) -> None:
        from geovq.geometry.knn import INDEXES
        from geovq.geometry.lengths import check_quadrature

        check_quadrature(self.quadrature)
        for name, value, valid in (("neighbours", self.neighbours, NEIGHBOUR_RULES), ("paths", self.paths, PATHS),
                                   ("approx_rule", self.approx_rule, APPROX_RULES), ("index", self.index, INDEXES)):
            if value not in valid:
                raise GeovqError(f"geodesic {name} {value!r} is unknown; valid: {', '.join(valid)}")
        if self.k < 1 or self.max_landmarks < 2:
            raise GeovqError(f"geodesic needs k >= 1 and max_landmarks >= 2; got k={self.k}, "
                             f"max_landmarks={self.max_landmarks}")
        if self.exact_encode_limit < 0 or self.check_tokens < MIN_CHECK_TOKENS:
            raise GeovqError(f"geodesic needs exact_encode_limit >= 0 and check_tokens >= {MIN_CHECK_TOKENS}; got "
                             f"exact_encode_limit={self.exact_encode_limit}, check_tokens={self.check_tokens}")
        if min(self.shortlist, self.update_sample, self.update_candidates) < 1 or self.context_iterations < 0:
            raise GeovqError(f"geodesic needs shortlist, update_sample, update_candidates >= 1 and "
                             f"context_iterations >= 0; got {self.shortlist}, {self.update_sample}, "
                             f"{self.update_candidates}, {self.context_iterations}")
        if self.approx_rule == "context_probed" and self.paths != "context":
            raise GeovqError("geodesic approx_rule 'context_probed' settles tokens by in-context curves, so it needs "
                             f"paths='context' (got paths={self.paths!r}); valid with it: landmark_metric, "
                             "nearest_landmark, auto")
        if self.probes < 1 or not self.margin >= 1 or self.probed_encode_limit < 0:
            raise GeovqError(f"geodesic needs probes >= 1, margin >= 1 and probed_encode_limit >= 0; got "
                             f"probes={self.probes}, margin={self.margin}, "
                             f"probed_encode_limit={self.probed_encode_limit}")
        if self.chunk_elements is not None and self.chunk_elements < 1:
            raise GeovqError(f"geodesic chunk_elements={self.chunk_elements} must be >= 1 (or None)")

    @property
    def _chunking(self) -> dict[str, int]:
        return {} if self.chunk_elements is None else {"chunk_elements": self.chunk_elements}

    # -- fit ----------------------------------------------------------------------------------------
    def _fit(self, latents: LatentSet, edge_lengths: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
             ) -> None:
        """`edge_lengths(landmark_tokens, edges) -> lengths`: measures the graph's undirected edges (E, 2)
        between landmarks, given as ids into `landmark_tokens` (token ids of `latents`), instead of this
        process (e.g. `geovq.stages.edges` on Ray Data workers). Endpoint lengths from metric neighbours'
        tensors need no decoder call, so they are never handed out."""
        from geovq.geometry.decoders import GridTokenDecoder
        from geovq.geometry.graph import build_geodesic_graph, geometry_sample
        from geovq.geometry.landmarks import landmark_coverage, stratified_tokens
        from geovq.geometry.medoids import kmedoids
        from geovq.geometry.paths import GraphSpace

        self._check_decoder()
        rng = np.random.default_rng(self.seed)
        n_landmarks = min(self.max_landmarks, latents.n_tokens)
        if self.n_codes > n_landmarks:
            raise GeovqError(f"K={self.n_codes} codes exceeds the {n_landmarks} landmarks; raise max_landmarks")
        if self.k >= n_landmarks:
            raise GeovqError(f"k={self.k} neighbours needs k < the {n_landmarks} landmarks")
        start = time.perf_counter()
        tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, n_landmarks, rng)
        self.landmarks_ = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
        delegate = None if edge_lengths is None else (lambda edges: edge_lengths(tokens, edges))
        graph = build_geodesic_graph(self.landmarks_, self.k, self.quadrature, self.index, self._neighbour_rule(),
                                     edge_lengths_fn=delegate, **self._chunking)
        t0 = time.perf_counter()
        space = GraphSpace(graph.graph)
        result = kmedoids(space, self.n_codes, self.seed, exact_limit=self.exact_limit, n_blocks=self.n_blocks)
        t1 = time.perf_counter()
        self.codebook_ = self.landmarks_.points[result.medoids].astype(np.float32)
        # what encode needs: each landmark's graph distance D(j) to its nearest medoid and that medoid's
        # code, the medoids' landmark ids, each landmark's own k graph neighbours (-1: none), and the
        # landmarks' metric tensors (None until needed when the graph did not use them)
        self.landmark_distance_, self.landmark_code_ = result.distances, result.labels
        self.medoid_landmarks_, self.landmark_neighbours_ = result.medoids, graph.knn.neighbours
        self.landmark_metrics_ = graph.metrics
        context = self._fit_in_context(result.medoids) if self.paths == "context" else None
        radius = float(np.median(graph.knn.euclidean))
        others = np.setdiff1d(np.arange(latents.n_tokens), tokens)
        sample = rng.choice(others, size=min(len(others), COVERAGE_SAMPLE), replace=False)
        coverage = (landmark_coverage(self.landmarks_.points, latents.token_mu[sample], radius)
                    if len(sample) else None)  # None: every training token is a landmark
        self.fit_info_ = {
            "landmarks": int(n_landmarks), "images": int(latents.n_images), "graph": graph.knn.summary(),
            "quotas": result.quotas.tolist(), "objective": result.objective, "converged": bool(result.converged),
            "trace": result.trace, "median_knn_edge": radius,
            "median_edge_length": float(np.median(graph.lengths)),
            # fraction of held-out training tokens whose nearest landmark lies within the median k-NN edge
            "coverage": coverage, "coverage_tokens": int(len(sample)),
            # wall time by stage: metrics (each landmark's metric tensor, for metric neighbours and the
            # endpoint rule), graph (k-NN search), lengths, paths (every Dijkstra inside k-medoids),
            # medoids (the rest of k-medoids: k-means++ draws, cell bookkeeping, FasterPAM)
            "seconds": {**graph.seconds, "paths": space.clock["paths"], "medoids": t1 - t0 - space.clock["paths"],
                        "medoids_seeding": result.seconds["seeding"], "medoids_iterations": result.seconds["iterations"],
                        **({} if context is None else {"context": context["seconds"]}),
                        "total": time.perf_counter() - start},
            # what decided the codes: graph distances, or curves in each token's own image (then "context"
            # has the rounds after the graph k-medoids that started them; "objective" above is the graph's)
            "paths": self.paths, **({} if context is None else {"context": context}),
            # a sample of graph against Euclidean distances and of edge lengths, for the report's picture
            "diagnostics": geometry_sample(self.landmarks_.points, graph, np.random.default_rng(self.seed + 1)),
        }

    def _fit_in_context(self, medoids: np.ndarray) -> dict[str, Any]:
        """paths="context": assignments and medoid updates by in-context curve lengths (DESIGN.md §3.9).

        Replacing token i by code c changes image n(i) only, so d_i(c) is the length of the shortest curve from
        z_i to c in image n(i) (`geovq.geometry.curves`, inside the landmarks' latent box). Starting from the
        graph k-medoids: assign every landmark to its d_i-nearest medoid among the `shortlist` nearest by its
        own metric tensor, ‖c − z_i‖_{G_i} (the first-order d_i); then, `context_iterations` times, move each
        medoid to the best of `update_candidates` members (nearest in first order to a sample of the cell)
        and itself by Σ d_i over `update_sample` sampled members, and reassign. A round whose whole-landmark
        objective Σ_i d_i does not drop is undone, and the rounds stop. Sets the codebook and the landmarks'
        codes and distances; returns the rounds for fit_info.
        """
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.seed, 1])  # its own stream: the graph fit's draws stay as they were
        label, dist, refined = self._assign_in_context(medoids)
        rounds = [{"round": 0, "objective": float(dist.sum()), "curves": refined, "moved": 0, "changed": 0,
                   "seconds": time.perf_counter() - t0}]
        # progress of the slowest part of a fit (tens of minutes on MNIST on a CPU), one line per round
        log.info("geodesic in-context assignment of %d landmarks: objective %.6g, %d curves, %.0f s",
                 len(dist), dist.sum(), refined, rounds[0]["seconds"])
        for r in range(1, self.context_iterations + 1):
            t1 = time.perf_counter()
            moved, update_curves = self._update_medoids(medoids, label, rng)
            new_label, new_dist, refined = self._assign_in_context(moved)
            rounds.append({"round": r, "objective": float(new_dist.sum()), "curves": refined + update_curves,
                           "moved": int((moved != medoids).sum()), "changed": int((new_label != label).sum()),
                           "accepted": bool(new_dist.sum() < dist.sum()), "seconds": time.perf_counter() - t1})
            log.info("geodesic in-context round %d of %d: %d medoids moved, objective %.6g (%s), %d curves, %.0f s",
                     r, self.context_iterations, rounds[-1]["moved"], new_dist.sum(),
                     "kept" if rounds[-1]["accepted"] else "no lower: undone", rounds[-1]["curves"],
                     rounds[-1]["seconds"])
            if not new_dist.sum() < dist.sum():
                break
            medoids, label, dist = moved, new_label, new_dist
        self.medoid_landmarks_, self.landmark_code_, self.landmark_distance_ = medoids, label, dist
        self.codebook_ = self.landmarks_.points[medoids].astype(np.float32)
        lo, hi = self._box()
        return {"rounds": rounds, "objective": float(dist.sum()), "box_lo": lo.tolist(), "box_hi": hi.tolist(),
                "seconds": time.perf_counter() - t0}

    def _assign_in_context(self, medoids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Each landmark's d_i-nearest medoid (index into medoids) among its shortlist, d_i, curves refined."""
        from geovq.geometry.curves import nearest_in_context

        land = self.landmarks_
        codes = land.points[medoids]
        short = metric_shortlist(land.points, self._landmark_metrics(), codes, self.shortlist)
        best, dist, refined = nearest_in_context(land, np.arange(land.n_nodes), codes[short], bounds=self._box(),
                                                 **self._chunking)
        label = short[np.arange(land.n_nodes), best]
        label[medoids], dist[medoids] = np.arange(len(medoids)), 0.0  # a medoid is its own code
        return label, dist, refined

    def _update_medoids(self, medoids: np.ndarray, label: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, int]:
        """Each medoid moved to the candidate with the least Σ d_i over a sample of its cell (see _fit_in_context)."""
        from geovq.geometry.curves import refine_curves, straight_curves

        land, metrics = self.landmarks_, self._landmark_metrics()
        sources, targets, cell = [], [], []
        for c in range(len(medoids)):
            members = np.flatnonzero(label == c)
            sample = rng.choice(members, size=min(self.update_sample, len(members)), replace=False)
            delta = land.points[members][None] - land.points[sample][:, None]  # (m, M, d)
            first = np.sqrt(np.maximum(np.einsum("mjd,mde,mje->mj", delta, metrics[sample], delta), 0)).sum(0)
            candidates = np.union1d(members[np.argsort(first, kind="stable")[:self.update_candidates]], medoids[c])
            sources.append(np.repeat(sample, len(candidates)))
            targets.append(np.tile(candidates, len(sample)))
            cell.append(np.full(len(sample) * len(candidates), c))
        sources, targets, cell = np.concatenate(sources), np.concatenate(targets), np.concatenate(cell)
        lengths = refine_curves(straight_curves(land.points[sources], land.points[targets]), [(land, sources)],
                                bounds=self._box(), **self._chunking).lengths
        moved = medoids.copy()
        for c in range(len(medoids)):
            mine = cell == c
            candidates, where = np.unique(targets[mine], return_inverse=True)
            cost = np.bincount(where, weights=lengths[mine])
            current = cost[np.searchsorted(candidates, medoids[c])]
            if cost.min() < current * (1 - 1e-9):
                moved[c] = candidates[np.argmin(cost)]
        return moved, len(sources)

    def _box(self) -> tuple[np.ndarray, np.ndarray]:
        """The latent box in-context curves stay in: the landmarks' range, widened by BOX_MARGIN each side.

        Outside the latents the encoder produces, this decoder saturates, and curves that detour there (to
        |z| ~ 50-100× the data's on MNIST) are shorter than any curve through images the VAE ever made."""
        points = self.landmarks_.points
        lo, hi = points.min(0), points.max(0)
        return lo - BOX_MARGIN * (hi - lo), hi + BOX_MARGIN * (hi - lo)

    def coverage(self, latents: LatentSet) -> float:
        """Fraction of `latents`' tokens whose nearest landmark lies within the median k-NN edge length."""
        from geovq.geometry.landmarks import landmark_coverage

        self._check_fitted()
        return landmark_coverage(self.landmarks_.points, latents.token_mu, self.fit_info_["median_knn_edge"])

    # -- encode -------------------------------------------------------------------------------------
    @property
    def exact_rule(self) -> str:
        """The rule that decides codes: "graph" insertion (paths="graph") or in-context curves ("context")."""
        return self.paths

    def rule_for(self, latents: LatentSet) -> str:
        """The exact rule for a split of at most `exact_encode_limit` tokens, else `approx_rule`; "auto" is
        context_probed (paths="context") for splits of at most `probed_encode_limit` tokens whose images have more
        metric directions (d × tokens) than `probes`, and landmark_metric otherwise (a shard gets its whole split's
        rule: `LatentSet.split_tokens`)."""
        if latents.split_tokens <= self.exact_encode_limit:
            return self.exact_rule
        if self.approx_rule == "auto":
            # probes pay where an image has more metric directions than probes (d per token): MNIST's 784 against
            # 128, not digits' 8 × 16 = 128, whose large splits keep the first-order rule
            cheaper = self.probes < latents.token_dim * latents.tokens_per_image
            probed = self.paths == "context" and cheaper and latents.split_tokens <= self.probed_encode_limit
            return "context_probed" if probed else "landmark_metric"
        return self.approx_rule

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return self.encode_tokens(latents, rule=self.rule_for(latents))

    def _encode_info(self, latents: LatentSet, codes: np.ndarray) -> dict[str, Any]:
        """rule, tokens, exact_encode_limit, landmark_coverage (the split's tokens whose nearest landmark lies
        within the median k-NN edge: a split far from every landmark is encoded by extrapolating the graph,
        whatever the rule), and for an approximation the figures of `check_approximation`."""
        rule = self.rule_for(latents)
        info = {"rule": rule, "tokens": int(latents.n_tokens), "exact_encode_limit": self.exact_encode_limit,
                "landmark_coverage": self.coverage(latents)}
        if rule == "context_probed":
            info.update(self._probed_info(latents))
        if rule != self.exact_rule:
            info.update(self.check_approximation(latents, codes))
        return info

    def encode_tokens(self, latents: LatentSet, tokens: np.ndarray | None = None, rule: str | None = None,
                      ) -> np.ndarray:
        """Codes of `tokens` (ids into latents' tokens; all when None) by `rule` (see ENCODE_RULES; None: the
        exact rule of this quantizer's `paths`). With paths="context", "landmark_metric" is the first-order
        in-context rule argmin_c ‖c − z_q‖_G with G borrowed from landmarks (no graph, no decoder call)."""
        self._check_fitted()
        rule = self.exact_rule if rule is None else rule
        if rule not in ENCODE_RULES:
            raise GeovqError(f"encode rule {rule!r} is unknown; valid: {', '.join(ENCODE_RULES)}")
        tokens = np.arange(latents.n_tokens) if tokens is None else np.asarray(tokens, dtype=np.int64)
        land = self.landmarks_
        if rule == "context":
            return self._in_chunks(tokens, rule, lambda chunk: self._context_insert(latents, chunk, None))
        if rule == "context_probed":
            if self.paths != "context":
                raise GeovqError("encode rule 'context_probed' needs paths='context'")
            self._encode_stats = {"probes": 0.0, "curves": 0.0, "curve_tokens": 0}
            return self._in_chunks(tokens, rule, lambda chunk: self._context_probed(latents, chunk))
        index = landmark_index(land.points, exact=rule == "graph")  # the exact rule searches exactly
        if rule == "nearest_landmark":
            _, nearest = index.search(np.ascontiguousarray(latents.token_mu[tokens], dtype=np.float32), 1)
            return self.landmark_code_[nearest[:, 0]]
        similar = None
        if rule == "landmark_metric":  # landmarks by context, to borrow metric tensors from
            features = context_features(land.grids, land.image, land.channels)
            similar = landmark_index(features, exact=False, pca=CONTEXT_DIMS)
        insert = self._context_insert if self.paths == "context" and rule == "landmark_metric" else (
            lambda latents, chunk, similar: self._insert(latents, chunk, index, rule, similar))
        return self._in_chunks(tokens, rule, lambda chunk: insert(latents, chunk, similar))

    @staticmethod
    def _in_chunks(tokens: np.ndarray, rule: str, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """encode(chunk) over ENCODE_CHUNK tokens at a time, with a progress line now and then."""
        codes = np.empty(len(tokens), dtype=np.int64)
        progress = EncodeProgress(f"geodesic {rule} encode", len(tokens))
        for s in range(0, len(tokens), ENCODE_CHUNK):
            codes[s:s + ENCODE_CHUNK] = encode(tokens[s:s + ENCODE_CHUNK])
            progress.update(min(s + ENCODE_CHUNK, len(tokens)))
        return codes

    def _context_insert(self, latents: LatentSet, tokens: np.ndarray, similar: faiss.Index | None) -> np.ndarray:
        """In-context codes of one chunk of tokens: exact (similar=None: the token's own metric shortlists,
        refined curves in its own image decide) or first-order with metrics borrowed through `similar`."""
        from geovq.geometry.curves import nearest_in_context
        from geovq.geometry.decoders import GridTokenDecoder
        from geovq.geometry.lengths import node_metrics

        codes = self.codebook_.astype(np.float64)
        if similar is None:
            queries = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
            short = metric_shortlist(queries.points, node_metrics(queries, **self._chunking), codes, self.shortlist)
            best, _, _ = nearest_in_context(queries, np.arange(len(tokens)), codes[short], bounds=self._box(),
                                            lengths=False, **self._chunking)
            return short[np.arange(len(tokens)), best]
        points = latents.token_mu[tokens].astype(np.float64)
        image, slot = np.divmod(tokens, latents.tokens_per_image)
        _, alike = similar.search(context_features(latents.mu, image, latents.layout.flat_positions(slot)),
                                  min(BORROWED, self.landmarks_.n_nodes))
        borrowed = self._landmark_metrics()[alike].mean(axis=1)
        return metric_nearest(points, borrowed, codes)

    def _context_probed(self, latents: LatentSet, tokens: np.ndarray) -> np.ndarray:
        """Codes of one chunk of tokens by context_probed (module docstring): the probes' nearest code where its
        margin is shown, the exact rule's curves among the codes left elsewhere (`_settle_by_curves`)."""
        from geovq.geometry.probes import image_probes
        from geovq.nearest import probe_shortlist

        t0 = time.perf_counter()
        image, inverse = np.unique(tokens // latents.tokens_per_image, return_inverse=True)
        # (B, s, h·w·C): probes drawn by each image's index in its split, so a shard's codes are the split's
        grads = image_probes(self.decoder, latents.mu[image].astype(np.float64), self.probes, self.seed,
                             latents.ids[image]).reshape(len(image), -1, latents.mu[0].size)
        positions = latents.layout.flat_positions(tokens % latents.tokens_per_image)  # (n, d)
        probe_grads = grads[inverse[:, None, None], np.arange(grads.shape[1])[None, :, None],
                            positions[:, None, :]]  # (n, s, d)
        points = latents.token_mu[tokens].astype(np.float64)
        codebook = self.codebook_.astype(np.float64)
        shortlist, listed = probe_shortlist(probe_grads, points, codebook, PROBE_CONFIDENCE, ratio=self.margin)
        codes = shortlist[:, 0].copy()
        t1 = time.perf_counter()
        unsure = np.flatnonzero(listed.sum(1) > 1)
        if len(unsure):
            codes[unsure] = self._settle_by_curves(latents, tokens[unsure], shortlist[unsure], listed[unsure],
                                                   codebook)
        stats = self._encode_stats
        stats["probes"] += t1 - t0
        stats["curves"] += time.perf_counter() - t1
        stats["curve_tokens"] += len(unsure)
        return codes

    def _settle_by_curves(self, latents: LatentSet, tokens: np.ndarray, shortlist: np.ndarray, listed: np.ndarray,
                          codebook: np.ndarray) -> np.ndarray:
        """The exact rule's step for tokens whose margin the probes could not show: refined curves in each token's
        own image to its candidates (`probe_shortlist`'s codes not ruled out, at most `shortlist` of them, cheapest
        by the estimate first), where the exact rule "context" takes its `shortlist` cheapest codes by the exact
        metric (d tangent passes per token). Tokens are grouped by their number of candidates, so no curve is
        padding."""
        from geovq.geometry.curves import nearest_in_context
        from geovq.geometry.decoders import GridTokenDecoder

        width = min(self.shortlist, int(listed.sum(1).max()))
        # each token's listed codes in the shortlist's order (cheapest by the estimate first), (n, width)
        short = np.take_along_axis(shortlist, np.argsort(~listed, axis=1, kind="stable")[:, :width], 1)
        count = np.minimum(listed.sum(1), width)
        queries = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
        codes = short[:, 0].copy()
        for m in range(2, width + 1):
            rows = np.flatnonzero(count == m)
            if len(rows):
                best, _, _ = nearest_in_context(queries, rows, codebook[short[rows, :m]], bounds=self._box(),
                                                lengths=False, **self._chunking)
                codes[rows] = short[rows, best]
        return codes

    def _probed_info(self, latents: LatentSet) -> dict[str, Any]:
        """Figures of the last context_probed encode (JSON-safe): probes, margin, confidence; seconds of the probes
        and of the exact rule's curves; curve_fraction (tokens the margin left to the exact rule); and the encode in
        decoder forward-equivalents per token and per image (`geometry.probes.forward_equivalents`)."""
        from geovq.geometry.probes import forward_equivalents

        stats = self.encode_stats()
        probes, curves = stats.get("probes", 0.0), stats.get("curves", 0.0)
        return {"probes": int(self.probes), "margin": float(self.margin), "confidence": PROBE_CONFIDENCE,
                "seconds_probes": probes, "seconds_curves": curves,
                "curve_fraction": stats.get("curve_tokens", 0) / max(latents.n_tokens, 1),
                **forward_equivalents(self.decoder, latents, probes + curves)}

    def _insert(self, latents: LatentSet, tokens: np.ndarray, index: faiss.Index, rule: str,
                similar: faiss.Index | None) -> np.ndarray:
        """label[argmin_j (L_qj + D(j))] over each query's k graph neighbours, for one chunk of tokens."""
        from geovq.geometry.decoders import GridTokenDecoder
        from geovq.geometry.knn import nearest_by_metric
        from geovq.geometry.lengths import metric_norms, node_metrics, pair_lengths

        land = self.landmarks_
        k = min(self.k, land.n_nodes)
        metric_rule = self._neighbour_rule() == "metric"
        if rule == "graph":  # the query's own metric, in its own image
            queries = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
            points = queries.points
            query_metrics = node_metrics(queries, **self._chunking) if metric_rule else None
        else:  # landmark_metric: no decoder call; the mean metric of the landmarks most like the query
            points = latents.token_mu[tokens].astype(np.float64)
            image, slot = np.divmod(tokens, latents.tokens_per_image)
            _, alike = similar.search(context_features(latents.mu, image, latents.layout.flat_positions(slot)),
                                      min(BORROWED, land.n_nodes))
            query_metrics = self._landmark_metrics()[alike].mean(axis=1)
        _, near = index.search(np.ascontiguousarray(points, dtype=np.float32), k)
        if metric_rule:  # as in the graph: metric-nearest among near ∪ their neighbours
            known = np.where(self.landmark_neighbours_[near] >= 0, self.landmark_neighbours_[near], near[:, :, None])
            candidates = np.concatenate([near, known.reshape(len(near), -1)], axis=1)
            near = nearest_by_metric(points, query_metrics, candidates, land.points, k)
        q = np.repeat(np.arange(len(tokens)), k)
        j = near.ravel()
        found = j >= 0
        q, j = q[found], j[found]
        if rule == "graph":
            length = pair_lengths(queries, q, land, j, self.quadrature, metrics_a=query_metrics,
                                  metrics_b=self._landmark_metrics() if metric_rule else None, **self._chunking)
        else:  # the endpoint rule, the query's end with its borrowed metric tensor
            delta = land.points[j] - points[q]
            length = 0.5 * (metric_norms(query_metrics[q], delta) + metric_norms(self._landmark_metrics()[j], delta))
        cost = np.full(len(found), np.inf)
        cost[found] = length + self.landmark_distance_[j]
        best = np.argmin(cost.reshape(len(tokens), k), axis=1)
        return self.landmark_code_[near[np.arange(len(tokens)), best]]

    def check_approximation(self, latents: LatentSet, codes: np.ndarray) -> dict[str, Any]:
        """Figures of approximate `codes` (all of latents' tokens) against the exact rule, on a sample.

        Sample: `check_tokens` of the split's tokens (all of them in a smaller split), stratified across
        images (every image gives floor or ceil of check_tokens / images tokens; when there are more images
        than sampled tokens, a random subset of images gives one each), drawn with the quantizer's seed and
        re-encoded by the exact rule "graph". Returns (JSON-safe):
        - check_tokens, check_images: the sample; agreement: fraction of its tokens whose two codes agree;
        - latent_sq_diff: mean over sampled tokens of ‖c_approx − c_exact‖² between their codewords (0 where
          the codes agree); latent_sq_error_exact: mean ‖c_exact − μ‖², for scale;
        - image figures. Each sampled image's μ-grid is decoded three times (by self.decoder): as it is (the
          reference), and with its sampled tokens replaced by their exact, resp. approximate, codewords,
          every other token keeping its μ. PSNR = 10·log10(1 / MSE) over all decoder output values (data
          range 1, MSE floored at MSE_FLOOR). psnr_exact_db, psnr_approx_db: mean over sampled images of
          the PSNR of each against the reference; delta_psnr_db = psnr_approx_db − psnr_exact_db (< 0: the
          approximation loses quality); differing_images: images where some sampled code differs;
          psnr_between_db: mean PSNR between the approximate and the exact image over those (None if 0).
          With one sampled token per image, these are the effects of single tokens, not of a whole split.
        - check_seconds: time taken by this check.
        """
        from geovq.geometry.landmarks import stratified_tokens

        t0 = time.perf_counter()
        per_image = latents.tokens_per_image
        n_check = min(self.check_tokens, latents.n_tokens)
        sample = stratified_tokens(latents.n_images, per_image, n_check, np.random.default_rng(self.seed))
        exact = self.encode_tokens(latents, sample, rule=self.exact_rule)
        approx = np.asarray(codes).reshape(-1)[sample]
        differs = approx != exact
        images, local = np.unique(sample // per_image, return_inverse=True)
        channels = latents.layout.flat_positions(sample % per_image)
        grids = latents.mu[images].reshape(len(images), -1)
        reference = self._decode(grids)
        decoded = {}
        for name, chosen in (("exact", exact), ("approx", approx)):
            replaced = grids.copy()
            replaced[local[:, None], channels] = self.codebook_[chosen]
            decoded[name] = self._decode(replaced)
        psnr_exact, psnr_approx = _psnr(decoded["exact"], reference), _psnr(decoded["approx"], reference)
        image_differs = np.bincount(local, weights=differs, minlength=len(images)) > 0
        between = _psnr(decoded["approx"][image_differs], decoded["exact"][image_differs])
        mu = latents.token_mu[sample].astype(np.float64)
        return {
            "check_tokens": int(n_check), "check_images": int(len(images)), "agreement": float(1 - differs.mean()),
            "latent_sq_diff": float(((self.codebook_[approx] - self.codebook_[exact]).astype(np.float64) ** 2)
                                    .sum(1).mean()),
            "latent_sq_error_exact": float(((self.codebook_[exact] - mu) ** 2).sum(1).mean()),
            "psnr_exact_db": float(psnr_exact.mean()), "psnr_approx_db": float(psnr_approx.mean()),
            "delta_psnr_db": float((psnr_approx - psnr_exact).mean()),
            "differing_images": int(image_differs.sum()),
            "psnr_between_db": float(between.mean()) if len(between) else None,
            "check_seconds": time.perf_counter() - t0,
        }

    def _decode(self, grids: np.ndarray) -> np.ndarray:
        """(n, h·w·C) flattened μ-grids -> (n, P) float64 decoder outputs, in batches, without gradients."""
        import torch

        land = self.landmarks_
        out = []
        with torch.no_grad():
            for s in range(0, len(grids), DECODE_BATCH):
                batch = land.tensor(grids[s:s + DECODE_BATCH]).reshape(-1, *land.grid_shape)
                out.append(self.decoder(batch).reshape(len(batch), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, land.out_dim))

    def _landmark_metrics(self) -> np.ndarray:
        """The landmarks' metric tensors: kept from the fit, or computed on first use after `load`."""
        from geovq.geometry.lengths import node_metrics

        if self.landmark_metrics_ is None:
            self.landmark_metrics_ = node_metrics(self.landmarks_, **self._chunking)
        return self.landmark_metrics_

    def _neighbour_rule(self) -> str:
        """Metric neighbours unless the landmarks' metric tensors would not fit (as build_geodesic_graph)."""
        from geovq.geometry.graph import METRIC_VALUES

        n, d = self.landmarks_.n_nodes, self.landmarks_.dim
        return "metric" if self.neighbours == "metric" and n * d * d <= METRIC_VALUES else "latent"

    # -- persistence --------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        land = self.landmarks_
        return {"grids": land.grids, "image": land.image, "channels": land.channels,
                "distance": self.landmark_distance_, "label": self.landmark_code_,
                "medoids": self.medoid_landmarks_, "neighbours": self.landmark_neighbours_}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        from geovq.geometry.decoders import GridTokenDecoder

        self._check_decoder()
        self.landmarks_ = GridTokenDecoder(self.decoder, arrays["grids"], arrays["image"], arrays["channels"])
        self.landmark_distance_, self.landmark_code_ = arrays["distance"], arrays["label"]
        self.medoid_landmarks_, self.landmark_neighbours_ = arrays["medoids"], arrays["neighbours"]
        self.landmark_metrics_ = None


def context_features(grids: np.ndarray, image: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """(n, d + 9C + 2) float32 features by which a query borrows landmarks' metric tensors.

    Token t (the d channels at flat positions channels[t] of grid image[t], grids (N, h, w, C)):
    [its μ, CONTEXT_WEIGHT · μ of all C channels of the 3×3 cells around its cell (0 outside the grid),
    POSITION_WEIGHT · (row, col)]. A token's Jacobian depends on its whole receptive field and on where it
    sits in the image (near the border of an MNIST image the decoder's output is saturated background), not
    only on its own μ.
    """
    n_images, h, w, c = grids.shape
    flat = grids.reshape(n_images, -1)
    row, col = np.divmod(channels[:, 0] // c, w)
    step = np.array([-1, 0, 1])
    rows = row[:, None] + np.repeat(step, 3)[None]  # (n, 9); -1 and h lie outside the grid
    cols = col[:, None] + np.tile(step, 3)[None]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    window = grids[image[:, None], rows.clip(0, h - 1), cols.clip(0, w - 1)] * inside[:, :, None]  # (n, 9, C)
    own = flat[image[:, None], channels]
    position = np.stack([row, col], axis=1)
    return np.ascontiguousarray(np.concatenate(
        [own, CONTEXT_WEIGHT * window.reshape(len(image), -1), POSITION_WEIGHT * position], axis=1),
        dtype=np.float32)


def landmark_index(vectors: np.ndarray, exact: bool, pca: int | None = None) -> faiss.Index:
    """A faiss L2 index of landmark vectors: flat (exact) or, for approximate rules, inverted lists.

    Approximate: ~4·sqrt(N) lists (each trained with >= 39 points), NPROBE of them searched; on MNIST test
    tokens this left the landmark_metric agreement unchanged at about a third of the flat search's time.
    Optionally after a PCA to `pca` dimensions.
    """
    n, dim = vectors.shape
    n_lists = int(np.clip(4 * np.sqrt(n), 1, n // 39))
    steps = ([f"PCA{min(pca, n, dim)}"] if pca else []) + ["Flat" if exact or n_lists < 2 else f"IVF{n_lists},Flat"]
    index = faiss.index_factory(dim, ",".join(steps))
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.train(vectors)
    index.add(vectors)
    if "IVF" in steps[-1]:
        faiss.extract_index_ivf(index).nprobe = NPROBE
    return index


def _psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-row PSNR in dB, data range 1, of flattened outputs against a reference."""
    mse = ((images - reference) ** 2).mean(axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, MSE_FLOOR))
