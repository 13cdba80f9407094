"""Pull-back k-means: a codebook that minimises the decoder's own linearised reconstruction error (DESIGN.md §3.10).

Replacing token i of image n(i) by a code c changes that image by about J_i (c − z_i), J_i the decoder's
Jacobian in token i's own context (its image's μ-grid with i's channels varying), so

    ‖Dec_i(c) − Dec_i(z_i)‖² ≈ (c − z_i)ᵀ G_i (c − z_i),   G_i = J_iᵀJ_i (the pull-back metric at token i).

fit minimises Σ_i (c_a(i) − z_i)ᵀ G_i (c_a(i) − z_i) over the codebook and the assignments, on a stratified
subsample of `max_tokens` training tokens (each needs G_i: d tangent passes of the full decoder around one
primal pass, and d² float64 values of memory):
- start: the `kmeans` quantizer itself, fit on the subsample's μ (same k-means++ seeds, same Lloyd), so that
  with every G_i = I the method is k-means (see the last point);
- assignment: each token by its own metric, argmin_c (c − z_i)ᵀG_i(c − z_i) (`assign`);
- centres: the closed form (Σ_{i∈k} G_i)⁻¹ Σ_{i∈k} G_i z_i (`metric_centres`). A summed metric A_k whose
  smallest eigenvalue is below `ridge`·tr(A_k)/d is near-singular: the objective barely depends on the centre
  along some direction, so A_k⁻¹ would place it there by rounding noise, possibly far from every member (and
  from tokens outside the subsample, whose metrics may well see that direction). Such a centre is the
  minimiser of the objective plus λ‖c − m_k‖², λ = ridge·tr(A_k)/d, m_k the members' Euclidean mean: the
  metric decides where it sees, the Euclidean mean elsewhere. A cluster whose summed metric is zero (every
  member in a context where the decoder ignores it) gets m_k. `fit_info["regularised"]` and
  `["mean_fallback"]` count how often (clusters × iterations);
- a new centre that does not lower its own cluster's cost is not taken (the old one stays); a cluster left
  empty by the assignment is re-seeded at the subsample token with the largest current cost (distinct
  tokens for several empty clusters), which lowers the objective by at least that token's cost;
- an iteration (centres, then assignment) is taken only if it lowers the objective by more than `tol`
  (relative); the first that does not ends the fit, untaken, as does `max_iter`. `fit_info["trace"]` logs
  the objective of every iteration taken (strictly decreasing), with the assignments changed, clusters
  regularised, kept and re-seeded. With every G_i = I this is Lloyd's algorithm from k-means' centres, so
  it stops at once where scikit-learn converged to a fixed point, and otherwise finishes k-means' iterations
  (scikit-learn also stops on a centre-shift tolerance).

Default subsample, `max_tokens` = 50 000: at d = 16 that is 100 MB of metric tensors and, on MNIST
(bench/pullback_encode.py), as many decoder passes as encoding 1000 images, a few minutes on one CPU core;
it gives a K = 256 codebook about 200 tokens per code to average metrics over.

encode decides every token by its own G_i's costs. Where it is the cheaper rule (`rule_for`: MNIST's 7×7×16 grid
and larger) the PROBED rule does (`encode_probed`, geometry/probes.py): `probes` backward passes per image estimate
every token's metric at once, and only the tokens whose best code that estimate cannot tell apart from another
(within `confidence` standard errors) are settled by exact forward-mode passes, one per candidate code. On the
MNIST TDC VAE (bench/pullback_encode.py, 1000 test images, one core): 2.66 decoder forward-equivalents per token
against 17.7 for the exact rule, 99.79% of the exact rule's codes, ΔPSNR +0.0006 dB. Its agreement with the exact
rule on `check_tokens` tokens is part of `encode_info`. The EXACT rule (`probes=0`, and grids whose d passes
per token cost less than the probes) needs each token's own G_i, for every token of the split: `ENCODE_CHUNK` tokens at a time (their
grids, metric tensors and K costs, then discarded), the metric tensors by batched forward-mode passes on
the decoder's device (the trunk's own JVP through `GridDecoder`). On MNIST (7×7×16, d = 16) that is about
16 decoder forward-equivalents per token, 800 per image, 8·10⁶ per 10k images: 21 min of one CPU core
(bench/pullback_encode.py). Optional exact re-rank: the `rerank` best candidates of each token by
linearised cost are re-scored by the true in-context decode error ‖Dec_i(c) − Dec_i(z_i)‖² (r + 1 decoder
passes per token) and the best taken. On a trained MNIST VAE, rerank = 4 changed 4-5% of the codes and
lowered that single-token error by 1-2%, at +50% encode cost, with no measurable PSNR change: off by
default. `encode_with_info` reports the cost (seconds per stage, decoder forward-equivalents per token
against a plain forward of the split's images timed in the same call) and, with re-rank, what it changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import metric_nearest, metric_shortlist, probe_candidates
from geovq.quantize.base import EncodeProgress, Quantizer, register

if TYPE_CHECKING:  # the geometry engine imports torch: loaded when a fit or encode needs it
    import torch

    from geovq.geometry.decoders import GridTokenDecoder

#: tokens whose grids and metric tensors are held at once (fit and encode); d = 16: 8 MB of metrics
ENCODE_CHUNK = 4096
#: decoder output values per JVP call on a CUDA device (the engine's CPU default, 2^18, is a few dozen
#: tokens: far too little work per kernel launch for a GPU). Not measured here (no GPU on the dev machine).
CUDA_CHUNK_ELEMENTS = 2**24
#: fit tokens whose metric tensors a large split borrows from (saved with the quantizer: at d = 16 and
#: C = 16, 10k tokens are 17 MB of float32 features and metrics)
BORROW_POOL = 10_000
#: tokens per borrowed-metric assignment block
BORROW_CHUNK = 65_536


def token_features(latents: LatentSet, tokens: np.ndarray) -> np.ndarray:
    """The context features by which a token borrows metric tensors (see geodesic.context_features)."""
    from geovq.quantize.geodesic import context_features

    image, slot = np.divmod(np.asarray(tokens), latents.tokens_per_image)
    return context_features(latents.mu, image, latents.layout.flat_positions(slot))


# -- the algorithm on given points and metric tensors (no decoder) ---------------------------------------
def exact_costs(points: np.ndarray, metrics: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n,) (c_i − z_i)ᵀ G_i (c_i − z_i) row by row, by the difference (no cancellation)."""
    delta = centres.astype(np.float64) - points.astype(np.float64)
    return np.maximum(np.einsum("ni,nij,nj->n", delta, metrics, delta), 0.0)


def assign(points: np.ndarray, metrics: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's code by its own metric, and its cost: ((n,) int64, (n,) float64), in bounded blocks."""
    labels = metric_nearest(points, metrics, codebook)
    return labels, exact_costs(points, metrics, codebook[labels])


def metric_centres(points: np.ndarray, metrics: np.ndarray, labels: np.ndarray, n_codes: int,
                   ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form centres (Σ_{i∈k} G_i)⁻¹ Σ_{i∈k} G_i z_i of every cluster (module docstring: regularisation).

    Returns centres (K, d) float64 (NaN for empty clusters), regularised (K,) bool, mean_fallback (K,) bool,
    and the sums A = Σ G_i (K, d, d) and b = Σ G_i z_i (K, d), which give each cluster's cost up to a constant.
    """
    import scipy.sparse as sp

    n, d = points.shape
    z = points.astype(np.float64)
    # per-cluster sums of [G_i, G_i z_i, z_i, 1] in one sparse (K, n) one-hot product
    gz = np.einsum("nij,nj->ni", metrics, z)
    onehot = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(n_codes, n))
    sums = onehot @ np.concatenate([metrics.reshape(n, d * d), gz, z, np.ones((n, 1))], axis=1)
    a = sums[:, :d * d].reshape(n_codes, d, d)
    b = sums[:, d * d:d * d + d]
    mean, counts = sums[:, d * d + d:-1], sums[:, -1]
    full = counts > 0
    mean[full] /= counts[full, None]
    a = 0.5 * (a + a.transpose(0, 2, 1))  # symmetric to rounding, for eigvalsh
    trace = np.trace(a, axis1=1, axis2=2)
    lowest = np.linalg.eigvalsh(a)[:, 0]
    zero = full & ~(trace > 0)  # also NaN-safe: every member's metric is zero
    lam = np.where(full & ~zero & (lowest < ridge * trace / d), ridge * trace / d, 0.0)
    regularised = lam > 0
    solve = full & ~zero
    centres = np.full((n_codes, d), np.nan)
    if solve.any():
        system = a[solve] + lam[solve, None, None] * np.eye(d)
        rhs = b[solve] + lam[solve, None] * mean[solve]
        centres[solve] = np.linalg.solve(system, rhs[:, :, None])[:, :, 0]
    centres[zero] = mean[zero]
    return centres, regularised, zero, a, b


def cluster_costs(centres: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K,) Σ_{i∈k} (c_k − z_i)ᵀG_i(c_k − z_i) − Σ_{i∈k} z_iᵀG_i z_i = c_kᵀA_k c_k − 2 c_kᵀb_k, from the
    summed metrics A (K, d, d) and b = Σ G_i z_i (K, d) of `metric_centres`."""
    return np.einsum("ki,kij,kj->k", centres, a, centres) - 2.0 * np.einsum("ki,ki->k", centres, b)


#: images per forward-mode call of the probed rule's exact passes, grouped by their number of unsure pairs
SETTLE_GROUP = 4


@dataclass
class LloydResult:
    centres: np.ndarray  # (K, d) float64, each exactly representable in float32 (the stored codebook)
    labels: np.ndarray  # (n,) each token's code under its own metric
    costs: np.ndarray  # (n,) each token's linearised cost
    trace: list[dict] = field(default_factory=list)  # one row per iteration taken (0: the start)
    converged: bool = False
    regularised: int = 0  # cluster centre solves regularised, over all iterations
    mean_fallback: int = 0  # clusters whose summed metric was zero (centre = Euclidean mean)
    kept: int = 0  # new centres not taken because they did not lower their cluster's cost
    reseeded: int = 0  # empty clusters re-seeded at the worst-served tokens

    @property
    def objective(self) -> float:
        return float(self.costs.sum())


def pullback_lloyd(points: np.ndarray, metrics: np.ndarray, centres: np.ndarray, max_iter: int = 100,
                   tol: float = 1e-6, ridge: float = 1e-6) -> LloydResult:
    """Alternate closed-form centres and per-token metric assignments from `centres` (module docstring).

    points (n, d), metrics (n, d, d) PSD, centres (K, d). Centres are rounded to float32 (what the codebook
    stores) before they are scored, so the objective traced is that of the codebook as saved.
    """
    t0 = time.perf_counter()
    centres = centres.astype(np.float32).astype(np.float64)
    n_codes = len(centres)
    labels, costs = assign(points, metrics, centres)
    result = LloydResult(centres, labels, costs)
    result.trace.append({"iteration": 0, "objective": result.objective, "changed": None, "regularised": 0,
                         "kept": 0, "reseeded": 0, "empty": int(n_codes - len(np.unique(labels))),
                         "seconds": time.perf_counter() - t0})
    for iteration in range(1, max_iter + 1):
        new, regularised, zero, a, b = metric_centres(points, metrics, result.labels, n_codes, ridge)
        new = new.astype(np.float32).astype(np.float64)
        empty = np.isnan(new[:, 0])
        # keep a centre that would not lower its own cluster's cost
        old = result.centres
        kept = ~empty & (cluster_costs(np.where(empty[:, None], 0.0, new), a, b) > cluster_costs(old, a, b))
        new[kept] = old[kept]
        if empty.any():  # re-seed at the worst-served tokens (distinct), each then costing 0
            worst = np.argsort(-result.costs, kind="stable")[:int(empty.sum())]
            new[np.flatnonzero(empty)[:len(worst)]] = points[worst]
        labels, costs = assign(points, metrics, new)
        previous, objective = result.objective, float(costs.sum())
        # a step is taken only if it lowers the objective by more than tol (relative): at a fixed point
        # (e.g. k-means' with every G_i = I) float32 rounding of the centres is not a step
        if not previous - objective > tol * previous:
            result.converged = True
            break
        changed = int((labels != result.labels).sum())
        result.centres, result.labels, result.costs = new, labels, costs
        result.regularised += int(regularised.sum())
        result.mean_fallback += int(zero.sum())
        result.kept += int(kept.sum())
        result.reseeded += int(empty.sum())
        result.trace.append({"iteration": iteration, "objective": objective, "changed": changed,
                             "regularised": int(regularised.sum()), "kept": int(kept.sum()),
                             "reseeded": int(empty.sum()), "empty": int(n_codes - len(np.unique(labels))),
                             "seconds": time.perf_counter() - t0})
    return result


# -- the quantizer -------------------------------------------------------------------------------------
@register("pullback")
class PullbackQuantizer(Quantizer):
    needs_decoder = True

    def __init__(self, n_codes: int, seed: int = 0, decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_tokens: int = 50_000, max_iter: int = 100, tol: float = 1e-6, ridge: float = 1e-6,
                 rerank: int = 0, probes: int = 32, confidence: float = 2.0, exact_encode_limit: int = 500_000,
                 check_tokens: int = 2000, chunk_elements: int | None = None) -> None:
        super().__init__(n_codes, seed)
        self.decoder = decoder  # a callable from μ-grids (B, h, w, C) to images, in eval mode
        self.max_tokens = max_tokens  # training tokens fitted on (stratified by image), each with its metric
        self.max_iter = max_iter  # centre/assignment iterations at most after the k-means start
        self.tol = tol  # stop at the first iteration that lowers the objective by less than this fraction
        self.ridge = ridge  # near-singular summed metric (λ_min < ridge·tr/d): ridge·tr/d pulls to the mean
        self.rerank = rerank  # encode: re-score this many best candidates by the true decode error (0: off)
        self.probes = probes  # output probes per image of the probed rule (0: each token's exact metric)
        self.confidence = confidence  # probed rule: codes within this many standard errors are settled exactly
        self.exact_encode_limit = exact_encode_limit  # probes=0, larger splits: metrics borrowed from fit tokens
        self.check_tokens = check_tokens  # tokens of a borrowed-metric encode re-encoded exactly, to measure it
        self.chunk_elements = chunk_elements  # decoder output values per JVP call (None: by device)

    def _validate_params(self) -> None:
        if self.max_tokens < 2 or self.max_iter < 0 or not self.tol >= 0 or not self.ridge > 0:
            raise GeovqError(f"pullback needs max_tokens >= 2, max_iter >= 0, tol >= 0 and ridge > 0; got "
                             f"max_tokens={self.max_tokens}, max_iter={self.max_iter}, tol={self.tol}, "
                             f"ridge={self.ridge}")
        if self.rerank < 0 or self.rerank == 1:
            raise GeovqError(f"pullback rerank={self.rerank} must be 0 (off) or >= 2 (candidates re-scored; 1 would "
                             "re-score only the linearised best)")
        if self.probes < 0 or not self.confidence >= 0:
            raise GeovqError(f"pullback needs probes >= 0 (0: the exact rule) and confidence >= 0; got "
                             f"probes={self.probes}, confidence={self.confidence}")
        if self.exact_encode_limit < 0 or self.check_tokens < 1:
            raise GeovqError(f"pullback needs exact_encode_limit >= 0 and check_tokens >= 1; got "
                             f"{self.exact_encode_limit}, {self.check_tokens}")
        if self.chunk_elements is not None and self.chunk_elements < 1:
            raise GeovqError(f"pullback chunk_elements={self.chunk_elements} must be >= 1 (or None)")

    def _chunking(self, dec: GridTokenDecoder) -> int:
        from geovq.geometry.lengths import CHUNK_ELEMENTS

        if self.chunk_elements is not None:
            return self.chunk_elements
        return CUDA_CHUNK_ELEMENTS if dec.device.type == "cuda" else CHUNK_ELEMENTS

    def token_metrics(self, latents: LatentSet, tokens: np.ndarray) -> tuple[GridTokenDecoder, np.ndarray]:
        """The token decoder of `tokens` (ids into latents' tokens, each in its own image's μ-grid) and their
        metric tensors (n, d, d); a GeovqError if the decoder's Jacobian is not finite there."""
        from geovq.geometry.decoders import GridTokenDecoder
        from geovq.geometry.lengths import node_metrics

        self._check_decoder()
        dec = GridTokenDecoder.from_latents(self.decoder, latents, tokens)
        metrics = node_metrics(dec, chunk_elements=self._chunking(dec))
        bad = ~np.isfinite(metrics).all(axis=(1, 2))
        if bad.any():
            raise GeovqError(f"the decoder's Jacobian is NaN or inf at {int(bad.sum())} of {len(tokens)} tokens "
                             f"(first: token {int(tokens[np.argmax(bad)])}); pullback needs a decoder with finite "
                             "derivatives at the latents")
        return dec, metrics

    # -- fit ----------------------------------------------------------------------------------------
    def _fit(self, latents: LatentSet) -> None:
        from geovq.geometry.landmarks import stratified_tokens
        from geovq.nearest import exact_nearest
        from geovq.quantize.kmeans import KMeansQuantizer

        self._check_decoder()
        n_sample = min(self.max_tokens, latents.n_tokens)
        if self.n_codes > n_sample:
            raise GeovqError(f"K={self.n_codes} codes exceeds the max_tokens={self.max_tokens} tokens pullback fits "
                             f"on; raise max_tokens to at least {self.n_codes}")
        start = time.perf_counter()
        tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, n_sample,
                                   np.random.default_rng(self.seed))
        points, metrics = [], []
        for s in range(0, n_sample, ENCODE_CHUNK):  # a chunk's context grids are dropped after its metrics
            dec, chunk_metrics = self.token_metrics(latents, tokens[s:s + ENCODE_CHUNK])
            points.append(dec.points)
            metrics.append(chunk_metrics)
        points, metrics = np.concatenate(points), np.concatenate(metrics)
        t_metrics = time.perf_counter()
        # the k-means start: the kmeans quantizer itself, on the subsample's μ seen as 1×1 grids
        mu = points.astype(np.float32)[:, None, None, :]
        kmeans = KMeansQuantizer(self.n_codes, self.seed).fit(LatentSet.from_grids(mu, np.zeros_like(mu)))
        self.kmeans_codebook_ = kmeans.codebook_
        euclidean = exact_nearest(self.kmeans_codebook_, points)[1][:, 0]  # k-means' own codes
        t_kmeans = time.perf_counter()
        result = pullback_lloyd(points, metrics, self.kmeans_codebook_, self.max_iter, self.tol, self.ridge)
        self.codebook_ = result.centres.astype(np.float32)
        # the pool a large split borrows metric tensors from: fit tokens, stratified, by context
        pool = np.sort(np.random.default_rng(self.seed).choice(n_sample, min(n_sample, BORROW_POOL), replace=False))
        self.pool_features_ = token_features(latents, tokens[pool])
        self.pool_metrics_ = metrics[pool].astype(np.float32)
        trace_g = np.trace(metrics, axis1=1, axis2=2)
        self.fit_info_ = {
            "tokens": int(n_sample), "images": int(len(np.unique(tokens // latents.tokens_per_image))),
            "kmeans": kmeans.fit_info_,
            # the objective of plain k-means (Euclidean codes, k-means centres) and of the result
            "objective_kmeans": float(exact_costs(points, metrics, self.kmeans_codebook_[euclidean]).sum()),
            "objective": result.objective, "iterations": len(result.trace) - 1, "converged": result.converged,
            "trace": result.trace, "regularised": result.regularised, "mean_fallback": result.mean_fallback,
            "kept": result.kept, "reseeded": result.reseeded,
            "empty_clusters": int(self.n_codes - len(np.unique(result.labels))),
            "metric_trace_median": float(np.median(trace_g)), "metric_trace_mean": float(trace_g.mean()),
            "seconds": {"metrics": t_metrics - start, "kmeans": t_kmeans - t_metrics,
                        "iterations": time.perf_counter() - t_kmeans, "total": time.perf_counter() - start},
        }

    # -- encode -------------------------------------------------------------------------------------
    def rule_for(self, latents: LatentSet) -> str:
        """"probed" where it is the cheaper rule (`probes` > 0 and a token's d tangent passes times the tokens of an
        image exceed twice the probes: the probes plus about as many exact passes for the unsure tokens) and no
        re-rank is asked (it re-scores the exact rule's candidates); else "exact" (every token's own metric) up to
        `exact_encode_limit` tokens of the split (a shard's whole split: `LatentSet.split_tokens`), and "borrowed"
        above."""
        if self.probes and not self.rerank and latents.token_dim * latents.tokens_per_image > 2 * self.probes:
            return "probed"
        return "exact" if latents.split_tokens <= self.exact_encode_limit else "borrowed"

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        rule = self.rule_for(latents)
        if rule == "borrowed":
            return self.encode_borrowed(latents, np.arange(latents.n_tokens))
        if rule == "probed":
            return self.encode_probed(latents)
        codes = np.empty(latents.n_tokens, dtype=np.int64)
        stats = {"metrics": 0.0, "assign": 0.0, "rerank": 0.0, "changed": 0, "error_metric": 0.0,
                 "error_rerank": 0.0, "predicted": 0.0}
        progress = EncodeProgress("pullback exact encode", latents.n_tokens)
        for s in range(0, latents.n_tokens, ENCODE_CHUNK):
            tokens = np.arange(s, min(s + ENCODE_CHUNK, latents.n_tokens))
            t0 = time.perf_counter()
            dec, metrics = self.token_metrics(latents, tokens)
            t1 = time.perf_counter()
            if self.rerank == 0:
                codes[tokens], _ = assign(dec.points, metrics, self.codebook_)
            else:
                codes[tokens] = self._rerank(dec, metrics, stats)
            stats["metrics"] += t1 - t0
            stats["assign"] += time.perf_counter() - t1
            progress.update(tokens[-1] + 1)
        self._encode_stats = stats
        return codes

    def encode_probed(self, latents: LatentSet) -> np.ndarray:
        """Every token's code by the exact rule's cost, decided from output probes (`geometry.probes`):

        1. `probes` backward passes per image give each token an unbiased estimate of its metric, as per-probe
           terms t_j(c) = s·(g_jᵀ(c − z))² whose mean is the estimated cost of code c;
        2. the estimated best code b is kept unless another code c is within `confidence` standard errors of it
           (the mean of t_j(c) − t_j(b) over the probes, against its standard error);
        3. such an unsure token's candidates are settled exactly: ‖J_i (c − z_i)‖², one forward-mode pass per
           candidate in its own image (the image's primal pass shared), and the cheapest taken.
        On the MNIST TDC VAE (issue 26) 32 probes and confidence 2 left 42% of tokens unsure with 2.7
        candidates each, and agreed with the exact rule on 99.7% of tokens."""
        from geovq.geometry.probes import image_probes

        self._check_decoder()
        if latents.n_tokens == 0:
            raise GeovqError("pullback cannot encode an empty split (0 images)")
        per_image, d = latents.tokens_per_image, latents.token_dim
        positions = latents.layout.flat_positions(np.arange(per_image))  # (tokens per image, d) in a flat grid
        codebook = self.codebook_.astype(np.float64)
        codes = np.empty(latents.n_tokens, dtype=np.int64)
        stats = {"probes": 0.0, "assign": 0.0, "verify": 0.0, "unsure": 0, "verify_passes": 0}
        progress = EncodeProgress("pullback probed encode", latents.n_tokens)
        step = max(1, ENCODE_CHUNK // per_image)  # images per chunk
        for start in range(0, latents.n_images, step):
            images = np.arange(start, min(start + step, latents.n_images))
            grids = latents.mu[images].astype(np.float64)
            t0 = time.perf_counter()
            # (B, s, h, w, C); probes drawn by each image's index in its split, so a shard's are the split's
            grads = image_probes(self.decoder, grids, self.probes, self.seed, latents.ids[images])
            t1 = time.perf_counter()
            flat = grads.reshape(*grads.shape[:2], -1)[:, :, positions]  # (B, s, tokens per image, d)
            probe_grads = flat.transpose(0, 2, 1, 3).reshape(-1, flat.shape[1], d)  # (n, s, d)
            points = grids.reshape(len(images), -1)[:, positions].reshape(-1, d)  # (n, d)
            best, candidates = probe_candidates(probe_grads, points, codebook, self.confidence)
            t2 = time.perf_counter()
            unsure = np.flatnonzero(candidates.sum(1) > 1)
            if len(unsure):
                best[unsure] = self._settle(grids, points, positions, unsure, candidates[unsure], codebook, stats)
            codes[images[0] * per_image:(images[-1] + 1) * per_image] = best
            stats["probes"] += t1 - t0
            stats["assign"] += t2 - t1
            stats["verify"] += time.perf_counter() - t2
            stats["unsure"] += len(unsure)
            progress.update((images[-1] + 1) * per_image)
        self._encode_stats = stats
        return codes

    def _settle(self, grids: np.ndarray, points: np.ndarray, positions: np.ndarray, tokens: np.ndarray,
                candidates: np.ndarray, codebook: np.ndarray, stats: dict) -> np.ndarray:
        """The exact rule's code among each unsure token's `candidates` (rows of a (len(tokens), K) mask):
        ‖J_i (c − z_i)‖² by forward-mode passes, each image's (token, candidate) pairs stacked on its one primal
        pass; images with similar numbers of pairs are grouped, so that few passes are padding."""
        from geovq.geometry.probes import image_tangent_norms

        per_image = len(positions)
        row, code = np.nonzero(candidates)  # (pairs,) sorted by token, so by image
        token = tokens[row]
        used, image_row, counts = np.unique(token // per_image, return_inverse=True, return_counts=True)
        rank = np.arange(len(row)) - np.searchsorted(image_row, image_row)  # each pair's rank within its image
        delta = codebook[code] - points[token]  # (pairs, d)
        cost = np.full(candidates.shape, np.inf)
        by_count = np.argsort(-counts, kind="stable")
        for group in np.array_split(by_count, max(1, len(used) // SETTLE_GROUP)):
            m = counts[group[0]]  # the group's largest number of pairs
            where = np.full(len(used), -1)
            where[group] = np.arange(len(group))
            mine = np.flatnonzero(where[image_row] >= 0)  # the group's pairs
            tangents = np.zeros((m, len(group), grids[0].size))
            tangents[rank[mine, None], where[image_row[mine], None], positions[token[mine] % per_image]] = delta[mine]
            norms = image_tangent_norms(self.decoder, grids[used[group]],
                                        tangents.reshape(m, len(group), *grids.shape[1:]))
            cost[row[mine], code[mine]] = norms[rank[mine], where[image_row[mine]]]
        stats["verify_passes"] += len(row)
        return cost.argmin(1)

    def _rerank(self, dec: GridTokenDecoder, metrics: np.ndarray, stats: dict) -> np.ndarray:
        """Codes of one chunk: the `rerank` best candidates by linearised cost, re-scored by true decode error."""
        n = dec.n_nodes
        candidates = metric_shortlist(dec.points, metrics, self.codebook_, self.rerank)  # best linearised first
        t0 = time.perf_counter()
        errors = self._decode_errors(dec, candidates)  # (n, r)
        best = candidates[np.arange(n), errors.argmin(1)]
        stats["rerank"] += time.perf_counter() - t0
        stats["changed"] += int((best != candidates[:, 0]).sum())
        stats["error_metric"] += float(errors[:, 0].sum())
        stats["error_rerank"] += float(errors.min(1).sum())
        stats["predicted"] += float(exact_costs(dec.points, metrics, self.codebook_[candidates[:, 0]]).sum())
        return best

    def _decode_errors(self, dec: GridTokenDecoder, candidates: np.ndarray) -> np.ndarray:
        """(n, r) ‖Dec_i(c) − Dec_i(z_i)‖² for each node i and candidate code c, each in i's own context."""
        import torch

        n, r = candidates.shape
        step = max(1, self._chunking(dec) // (dec.out_dim * (r + 1)))  # nodes per decoder call
        errors = np.empty((n, r))
        with torch.no_grad():
            for s in range(0, n, step):
                nodes = np.arange(s, min(s + step, n))
                z = np.concatenate([dec.points[nodes], self.codebook_[candidates[nodes].ravel()]])
                ids = np.concatenate([nodes, np.repeat(nodes, r)])
                out = dec.decode(dec.tensor(z), dec.tensor(ids, torch.long)).double()
                reference, trial = out[:len(nodes)], out[len(nodes):].reshape(len(nodes), r, -1)
                errors[nodes] = ((trial - reference[:, None]) ** 2).sum(-1).cpu().numpy()
        return errors

    def encode_borrowed(self, latents: LatentSet, tokens: np.ndarray) -> np.ndarray:
        """Codes of `tokens` with no decoder call: each token assigned by the mean metric tensor of the BORROWED
        pool tokens most like it in the decoder's eyes (its μ, its 3×3 neighbourhood, its place in the image:
        the geodesic quantizer's landmark_metric features), the exact rule's linearised cost otherwise."""
        from geovq.quantize.geodesic import BORROWED, CONTEXT_DIMS, landmark_index

        index = landmark_index(self.pool_features_, exact=False, pca=CONTEXT_DIMS)
        codes = np.empty(len(tokens), dtype=np.int64)
        for s in range(0, len(tokens), BORROW_CHUNK):
            chunk = tokens[s:s + BORROW_CHUNK]
            _, alike = index.search(token_features(latents, chunk), min(BORROWED, len(self.pool_metrics_)))
            metrics = self.pool_metrics_[alike].astype(np.float64).mean(axis=1)
            codes[s:s + len(chunk)], _ = assign(latents.token_mu[chunk].astype(np.float64), metrics, self.codebook_)
        return codes

    def _encode_info(self, latents: LatentSet, codes: np.ndarray) -> dict[str, Any]:
        rule = self.rule_for(latents)
        if rule == "borrowed":
            return self._check_against_exact(latents, codes, "borrowed")
        if rule == "probed":
            return {**self._probed_info(latents), **self._check_against_exact(latents, codes, "probed")}
        return self._exact_info(latents)

    def _check_against_exact(self, latents: LatentSet, codes: np.ndarray, rule: str) -> dict[str, Any]:
        """An approximate encode measured against the exact rule on `check_tokens` tokens stratified across
        images: agreement, and the linearised cost (under each token's own metric) of both codes."""
        from geovq.geometry.landmarks import stratified_tokens

        t0 = time.perf_counter()
        n = min(self.check_tokens, latents.n_tokens)
        sample = stratified_tokens(latents.n_images, latents.tokens_per_image, n, np.random.default_rng(self.seed))
        dec, metrics = self.token_metrics(latents, sample)
        exact, _ = assign(dec.points, metrics, self.codebook_)
        approximate = codes.reshape(-1)[sample]
        info = {"rule": rule, "tokens": int(latents.n_tokens), "check_tokens": int(n),
                "agreement": float((exact == approximate).mean()),
                "linearised_error_exact": float(exact_costs(dec.points, metrics, self.codebook_[exact]).mean()),
                f"linearised_error_{rule}": float(exact_costs(dec.points, metrics, self.codebook_[approximate]).mean()),
                "check_seconds": time.perf_counter() - t0}
        if rule == "borrowed":
            info["exact_encode_limit"] = self.exact_encode_limit
        return info

    def _probed_info(self, latents: LatentSet) -> dict[str, Any]:
        """Figures of the last probed encode: probes, confidence, seconds of its three steps, the unsure share
        of tokens and the exact passes they took, and its cost in decoder forward-equivalents (a plain forward
        of the split's μ-grids timed in this call)."""
        from geovq.geometry.probes import forward_equivalents

        stats = self._encode_stats
        n = max(latents.n_tokens, 1)
        return {"probes": int(self.probes), "confidence": float(self.confidence), "seconds_probes": stats["probes"],
                "seconds_assign": stats["assign"], "seconds_verify": stats["verify"],
                "unsure_fraction": stats["unsure"] / n, "verify_passes_per_token": stats["verify_passes"] / n,
                **forward_equivalents(self.decoder, latents, stats["probes"] + stats["assign"] + stats["verify"])}

    def _exact_info(self, latents: LatentSet) -> dict[str, Any]:
        """JSON-safe figures of the last exact encode:
        - tokens; seconds_metrics (metric tensors), seconds_assign (costs, argmin and any re-rank decodes);
        - forward_seconds_per_image: a plain decoder forward of the split's own μ-grids, timed in this call;
          encode_forward_equivalents_per_token and _per_image: the encode's seconds divided by it;
        - with re-rank: seconds_rerank, rerank_changed (codes unlike the linearised argmin) and its fraction,
          and mean over tokens of the true in-context decode error of the linearised argmin
          (rerank_sq_error_linearised), of the chosen code (rerank_sq_error), and the linearised prediction
          of the former (rerank_sq_error_predicted)."""
        from geovq.geometry.probes import forward_equivalents

        stats = self._encode_stats
        n = latents.n_tokens
        info = {"rule": "exact", "tokens": int(n), "seconds_metrics": stats["metrics"], "seconds_assign": stats["assign"],
                **forward_equivalents(self.decoder, latents, stats["metrics"] + stats["assign"]),
                "rerank": int(self.rerank)}
        if self.rerank:
            info.update({"seconds_rerank": stats["rerank"], "rerank_changed": stats["changed"],
                         "rerank_changed_fraction": stats["changed"] / max(n, 1),
                         "rerank_sq_error_linearised": stats["error_metric"] / max(n, 1),
                         "rerank_sq_error": stats["error_rerank"] / max(n, 1),
                         "rerank_sq_error_predicted": stats["predicted"] / max(n, 1)})
        return info

    # -- persistence --------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {"kmeans_codebook": self.kmeans_codebook_, "pool_features": self.pool_features_,
                "pool_metrics": self.pool_metrics_}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.kmeans_codebook_ = arrays["kmeans_codebook"]
        self.pool_features_, self.pool_metrics_ = arrays["pool_features"], arrays["pool_metrics"]
