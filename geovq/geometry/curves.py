"""Geodesic curves under the pull-back metric: discrete curve-energy minimisation (DESIGN.md §3.9).

A curve is T+1 latent points z_0 .. z_T with fixed ends. Under a decoder map f (one node's context),

    energy  E = T Σ_t ‖f(z_{t+1}) − f(z_t)‖²        length  L = Σ_t ‖f(z_{t+1}) − f(z_t)‖,

and E ≥ L² with equality at constant speed, so minimising E over the interior points gives a constant-speed
discrete geodesic, whose length is the distance. Where a symmetric length is wanted, a curve has two maps
(the two ends' contexts) and E, L are the means of the two maps' values.

The minimiser is a batched L-BFGS, each curve with its own history, step and stopping test, all curves'
interior points in one decoder batch. Why L-BFGS: one iteration costs one forward and one backward pass of
the decoder per interior point (a Gauss-Newton step needs the full Jacobian, d tangent passes, ~10 times
more on the MNIST decoder), and on a nearly straight geodesic it needs only a few iterations because its
starting Hessian is the energy's exact Hessian for a constant metric s·I along a straight curve:
2T s (L ⊗ I_d), L = tridiag(−1, 2, −1), with s the curve's mean stretch E / (T Σ‖Δz‖²) (or, if given, a
per-curve metric tensor G instead of s·I). The tridiagonal part removes the T² ill-conditioning of
curve energies; the quasi-Newton updates learn the rest (anisotropy, curvature). Steps are accepted by a
backtracking Armijo line search (quadratic interpolation). A curve stops (`converged`) when its last step
lowered E by less than `tol`·E and the quasi-Newton model predicts no more than that for the next full
step, or after `max_iter` iterations. Since L ≤ √E with equality at the constant-speed minimiser, stopping
with E within about tol·E of its minimum leaves the length at most about tol/2 long. The default tol = 1e-2
balances that against the chords' own error at T = 4 (a few tenths of a percent on the MNIST decoder): on
MNIST TDC pairs the median error against a 256-segment reference is 0.43% at tol = 1e-3 and 0.49% at 1e-2,
which takes about half the time (two-thirds of the decoder rows); the analytic 16-D cases stay below 0.3%
at this tol (bench/geodesic_accuracy.py).

Resolution: chords see the decoder only at the curve's points. A curve whose length grows by more than
`resolution` when its segments' midpoints are added is subdivided (to the T its 1/T² error asks for) and
minimised again (`refine_curves`); a curve that passes has its length extrapolated from its chords on T and
2T segments (Richardson), which is what `Curves.lengths` reports. Starting curves are first moved along
themselves to constant output speed (what an energy minimiser spends its first steps on). Richardson removes
the chords' 1/T² error, so what is left of a curve that passes is of the order of the square of its share:
the default resolution = 4e-2 (against 2e-2) keeps the same median error on MNIST TDC pairs (0.49%) and
≤ 0.4% on the analytic cases up to 16-D, with a fifth fewer decoder passes (fewer curves go to T = 8).

The decoder passes per curve (one map, T = 4, not subdivided): 2T+1 to measure the start (ends, points,
midpoints), T−1 forward and backward per evaluation (a few: the first, each accepted or rejected step), and T
for the final measurement, whose points' outputs are the last evaluation's.

Speed on 2 shared CPU cores, one thread (bench/geodesic_refine.py): several thousand curves per CPU second in
the 16-D analytic cases, tens per CPU second on the MNIST decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.geometry.decoders import TokenDecoder
from geovq.geometry.lengths import CHUNK_ELEMENTS

N_SEGMENTS = 4
TOL = 1e-2
MAX_ITER = 200
MEMORY = 8  # L-BFGS correction pairs kept per curve
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
RESOLUTION = 4e-2  # a curve is subdivided when its midpoints lengthen it by more than this share
MAX_SEGMENTS = 256
PRUNE_MARGIN = 0.01  # nearest_in_context: slack on "refined <= straight" before a candidate is pruned
MAX_BACKTRACKS = 30  # steps cut this often (by 2-10× each) are < 1e-9 of the model's: no descent left
DECREASE_RESOLUTION = 1e-8  # relative: a decrease of E below this is lost in a float32 decoder's rounding

#: one decoder map per context: a token decoder and, for each curve, the node whose context it decodes in
Context = tuple[TokenDecoder, np.ndarray]


@dataclass
class Curves:
    """B refined curves; `lengths` are the distances."""

    points: list[np.ndarray]  # B final curves (T_b+1, d), ends included; T_b >= the starting T (subdivided)
    lengths: np.ndarray  # (B,) final curves' lengths: chords on T and 2T segments, Richardson-extrapolated
    energies: np.ndarray  # (B,) E of the final curves (at their T)
    initial_lengths: np.ndarray  # (B,) starting curves' lengths, likewise, at the T first minimised at
    iterations: np.ndarray  # (B,) accepted L-BFGS steps, all resolutions together
    converged: np.ndarray  # (B,) stopped by the tolerance (False: max_iter, or no step could lower E)
    evaluations: int  # curve evaluations (energy and gradient of one curve each), all curves together


def straight_curves(starts: np.ndarray, ends: np.ndarray, n_segments: int = N_SEGMENTS) -> np.ndarray:
    """(B, T+1, d) evenly spaced points on the segments from starts (B, d) to ends (B, d)."""
    s = np.linspace(0.0, 1.0, n_segments + 1)[None, :, None]
    return (1.0 - s) * np.asarray(starts, np.float64)[:, None] + s * np.asarray(ends, np.float64)[:, None]


def resample_paths(points: np.ndarray, n_segments: int = N_SEGMENTS, cumulative: np.ndarray | None = None
                   ) -> np.ndarray:
    """(B, T+1, d) points at equal arc length along polylines through `points` (B, H, d), ends kept.

    cumulative: (B, H) non-decreasing arc length at each vertex (e.g. the graph distance from the path's
    source, so that the resampled curve starts at about constant decoder-metric speed, as a discrete
    geodesic has); default the Euclidean length along the polyline. Repeated vertices (padding) are fine.
    """
    points = np.asarray(points, np.float64)
    if cumulative is None:
        hops = np.linalg.norm(np.diff(points, axis=1), axis=2)
        cumulative = np.concatenate([np.zeros((len(points), 1)), np.cumsum(hops, axis=1)], axis=1)
    cumulative = np.asarray(cumulative, np.float64) - np.asarray(cumulative, np.float64)[:, :1]
    total = cumulative[:, -1:]
    targets = total * np.linspace(0.0, 1.0, n_segments + 1)[None]  # (B, T+1)
    # the last vertex at or before each target, and the fraction of the way to the next one
    vertex = np.clip((cumulative[:, None, :] <= targets[:, :, None]).sum(2) - 1, 0, points.shape[1] - 2)
    lo = np.take_along_axis(cumulative, vertex, axis=1)
    hop = np.take_along_axis(cumulative, vertex + 1, axis=1) - lo
    within = np.clip(np.where(hop > 0, (targets - lo) / np.where(hop > 0, hop, 1.0), 0.0), 0.0, 1.0)
    a = np.take_along_axis(points, vertex[:, :, None], axis=1)
    b = np.take_along_axis(points, vertex[:, :, None] + 1, axis=1)
    out = a + within[:, :, None] * (b - a)
    out[:, 0], out[:, -1] = points[:, 0], points[:, -1]
    return out


def subdivide(curves: np.ndarray, factor: int = 2) -> np.ndarray:
    """(B, factor·T+1, d): the same latent polylines with each segment cut into `factor` equal pieces."""
    s = np.linspace(0.0, 1.0, factor + 1)[:-1, None]  # (factor, 1)
    pieces = curves[:, :-1, None] + s * (curves[:, 1:, None] - curves[:, :-1, None])  # (B, T, factor, d)
    return np.concatenate([pieces.reshape(len(curves), factor * (curves.shape[1] - 1), curves.shape[2]),
                           curves[:, -1:]], axis=1)


def _extrapolated(coarse_len: np.ndarray, fine_len: np.ndarray) -> np.ndarray:
    """The continuous length of a latent polyline's image from its chord sums on T and 2T segments.

    Chords of a smooth curve fall short of its length by O(1/T²): Richardson's L_2T + (L_2T − L_T)/3. The
    correction is at most resolution/3 of the length (coarser curves are subdivided), and never negative.
    """
    return fine_len + np.maximum(fine_len - coarse_len, 0.0) / 3.0


def _finer(segments: int, coarse_len: np.ndarray, fine_len: np.ndarray, resolution: float,
           max_segments: int) -> np.ndarray:
    """(B,) the factor (a power of 2; 0: none) by which to subdivide each curve of T = `segments`.

    A chord sum's error falls as 1/T², so a curve whose midpoints lengthen it by a share r > resolution
    needs about T·sqrt(r / resolution) segments: jump there rather than minimise at every level between.
    """
    share = np.maximum(fine_len / np.maximum(coarse_len, 1e-300) - 1, 0.0)
    factor = 2 ** np.ceil(np.log2(np.maximum(np.sqrt(share / resolution), 1.0)))
    factor = np.minimum(factor, max_segments // segments)
    return np.where((share > resolution) & (factor >= 2), factor, 0).astype(np.int64)


def refine_curves(curves: np.ndarray, contexts: Sequence[Context], *, tol: float = TOL, max_iter: int = MAX_ITER,
                  metrics: np.ndarray | None = None, bounds: tuple[np.ndarray, np.ndarray] | None = None,
                  resolution: float = RESOLUTION, max_segments: int = MAX_SEGMENTS,
                  chunk_elements: int = CHUNK_ELEMENTS,
                  measured: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Curves:
    """Minimise the energy of each starting curve (B, T+1, d) over its interior points; ends stay fixed.

    contexts: one or two (decoder, nodes (B,)) maps; curve b is decoded in node nodes[b]'s context of each,
    and its energy and length are the mean over the maps. All maps must share the latent dimension.
    metrics: optional (B, d, d) metric tensors that shape each curve's starting Hessian (see the module
    docstring); by default a multiple s·I of the identity. bounds: optional (lo, hi) latent box, (d,) or
    (B, d) each; every interior point is kept inside it (projected after each step).

    Resolution: chords only see the decoder at the curve's points. A curve whose length measured with
    its segments' latent midpoints exceeds its length by more than `resolution` (relative) is too coarse
    (its chords cut corners, or jump between sheets of the decoded manifold that are close in the output
    but far along it): it is subdivided (T -> 2T, up to `max_segments`) before it is minimised and again
    after, and minimised at the finer T. Curves are refined in chunks of about `chunk_elements` decoder
    output values per decoder call (per map). measured: the starting curves' (coarse, fine, along) of
    `_midpoint_lengths` in these contexts, when the caller has them (`nearest_in_context` pruned by them):
    they are not decoded again.
    """
    curves = np.asarray(curves, np.float64)
    if curves.ndim != 3 or curves.shape[1] < 2:
        raise GeovqError(f"curves must be (B, T+1, d) with T >= 1 segments; got shape {curves.shape}")
    if not np.isfinite(curves).all():
        raise GeovqError("curves contain NaN or inf latent points")
    if not tol > 0:
        raise GeovqError(f"tol={tol} must be > 0 (the relative energy decrease below which a curve stops)")
    if not resolution > 0:
        raise GeovqError(f"resolution={resolution} must be > 0 (the relative length change that subdivides)")
    if max_iter < 0:
        raise GeovqError(f"max_iter={max_iter} must be >= 0")
    if not 1 <= len(contexts) <= 2:
        raise GeovqError(f"a curve has one or two decoder contexts; got {len(contexts)}")
    n_curves, n_points, d = curves.shape
    contexts = [(dec, np.asarray(nodes, dtype=np.int64)) for dec, nodes in contexts]
    for dec, nodes in contexts:
        if dec.dim != d or len(nodes) != n_curves:
            raise GeovqError(f"a context of {len(nodes)} nodes in {dec.dim} dims does not fit {n_curves} curves "
                             f"in {d} dims")
    if metrics is not None and metrics.shape != (n_curves, d, d):
        raise GeovqError(f"metrics must be (B, d, d) = ({n_curves}, {d}, {d}); got {metrics.shape}")
    if bounds is not None:
        bounds = tuple(np.broadcast_to(np.asarray(v, np.float64), (n_curves, d)) for v in bounds)
    out = Curves([None] * n_curves, np.zeros(n_curves), np.zeros(n_curves), np.full(n_curves, np.nan),
                 np.zeros(n_curves, dtype=np.int64), np.zeros(n_curves, dtype=bool), 0)
    levels = {n_points - 1: [(np.arange(n_curves), curves)]}  # segments -> curves waiting at that resolution

    def defer(idx: np.ndarray, level: np.ndarray, along: np.ndarray, factor: np.ndarray) -> None:
        """Curves idx whose `_finer` factor is > 0 wait at that finer T, resampled at constant output speed."""
        for more in np.unique(factor[factor > 0]):
            pick = factor == more
            levels.setdefault(segments * more, []).append(
                (idx[pick], resample_paths(subdivide(level[pick]), segments * more, along[pick])))

    while levels:
        segments = min(levels)
        idx_all, level_all = (np.concatenate(parts) for parts in zip(*levels.pop(segments)))
        given, measured = measured, None  # the starting level: all curves, in order, measured by the caller
        # chunks of about chunk_elements decoder outputs per call (per map), each measured, minimised and
        # measured again before the next, so that the ends decoded by the first measurement serve the minimiser
        per_chunk = max(1, chunk_elements // ((2 * segments + 1) * max(dec.out_dim for dec, _ in contexts)))
        for first in range(0, len(idx_all), per_chunk):
            chunk = slice(first, first + per_chunk)
            idx, level = idx_all[chunk], level_all[chunk]

            def at(rows):  # the contexts, metrics and bounds of curves idx[rows]
                return ([(dec, nodes[idx[rows]]) for dec, nodes in contexts],
                        None if metrics is None else metrics[idx[rows]],
                        None if bounds is None else tuple(v[idx[rows]] for v in bounds))

            if given is not None:
                (coarse_len, fine_len, along), ends = (v[chunk] for v in given), None
            else:
                coarse_len, fine_len, along, ends = _midpoint_lengths(level, at(slice(None))[0], chunk_elements,
                                                                      ends=True)
            coarse = _finer(segments, coarse_len, fine_len, resolution, max_segments)
            defer(idx, level, along, coarse)  # too coarse to start from: subdivided before minimising
            keep = coarse == 0
            if not keep.any():
                continue
            first_time = np.isnan(out.initial_lengths[idx[keep]])
            out.initial_lengths[idx[keep][first_time]] = _extrapolated(coarse_len[keep][first_time],
                                                                        fine_len[keep][first_time])
            # start at about constant speed in the output (what a minimiser of E reaches anyway, at a cost)
            start_curves = resample_paths(subdivide(level[keep]), segments, along[keep])
            minimiser = _Minimiser(start_curves, *at(keep), None if ends is None else [e[keep] for e in ends])
            done = minimiser.run(tol, max_iter)
            coarse_len, fine_len, along = minimiser.midpoint_lengths()
            idx = idx[keep]
            out.evaluations += done.evaluations
            out.iterations[idx] += done.iterations
            coarse = _finer(segments, coarse_len, fine_len, resolution, max_segments)
            defer(idx, done.points, along, coarse)  # the minimiser cut a corner between its points: resolve it
            ok = coarse == 0
            out.lengths[idx[ok]] = _extrapolated(coarse_len[ok], fine_len[ok])
            out.energies[idx[ok]] = done.energies[ok]
            out.converged[idx[ok]] = done.converged[ok]
            for i, curve in zip(idx[ok], done.points[ok]):
                out.points[i] = curve
    return out


def _midpoint_lengths(curves: np.ndarray, contexts, chunk_elements: int, ends: bool = False):
    """Lengths of the latent polylines (B, T+1, d), B >= 1, measured at their T+1 points (B,) and, finer, with
    their segments' midpoints added (B,), and the finer cumulative length at each of the 2T+1 points
    (B, 2T+1): means over the contexts, by decoder forward passes only. ends: also return each context's
    decoded end points, (B, 2, P) float64 tensors (what `_Minimiser` would otherwise decode again)."""
    fine = subdivide(curves)
    per_chunk = max(1, chunk_elements // (fine.shape[1] * max(dec.out_dim for dec, _ in contexts)))
    parts, end_parts = [], []
    with torch.no_grad():
        for start in range(0, len(curves), per_chunk):
            sl = slice(start, start + per_chunk)
            rows = len(fine[sl])
            outputs = [dec.decode(dec.tensor(fine[sl].reshape(-1, fine.shape[2])),
                                  dec.tensor(np.repeat(nodes[sl], fine.shape[1]), torch.long)
                                  ).double().reshape(rows, fine.shape[1], -1) for dec, nodes in contexts]
            parts.append(_chord_lengths(outputs))
            if ends:
                end_parts.append([out[:, [0, -1]] for out in outputs])
    lengths = tuple(np.concatenate(p) for p in zip(*parts))
    return (*lengths, [torch.cat(per_map) for per_map in zip(*end_parts)]) if ends else lengths


def _chord_lengths(outputs: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_midpoint_lengths` from the decoded points of each context, (B, 2T+1, P) each: a curve's points at
    even positions, its segments' midpoints at odd ones."""
    along = sum((out[:, 1:] - out[:, :-1]).norm(dim=2).cumsum(1) for out in outputs) / len(outputs)
    coarse = sum((out[:, 2::2] - out[:, :-2:2]).norm(dim=2).sum(1) for out in outputs) / len(outputs)
    along = torch.cat([along.new_zeros(len(along), 1), along], 1).cpu().numpy()
    coarse = coarse.cpu().numpy()
    if not (np.isfinite(along).all() and np.isfinite(coarse).all()):
        raise GeovqError("curve lengths are NaN or inf: the decoder returned non-finite values along the curves")
    return coarse, along[:, -1], along


class _Minimiser:
    """Batched L-BFGS over the interior points of one chunk of curves (see the module docstring)."""

    def __init__(self, curves: np.ndarray, contexts: Sequence[Context], metrics: np.ndarray | None,
                 bounds: tuple[np.ndarray, np.ndarray] | None = None,
                 ends: Sequence[torch.Tensor] | None = None) -> None:
        """ends: each context's decoded end points (B, 2, P) float64, when the caller has them."""
        self.n, n_points, self.d = curves.shape
        self.segments = n_points - 1
        self.maps = []
        with torch.no_grad():
            for m, (dec, nodes) in enumerate(contexts):  # the fixed ends' outputs, once
                node_t = dec.tensor(nodes, torch.long)
                pair = ([ends[m][:, 0], ends[m][:, 1]] if ends is not None else
                        [dec.decode(dec.tensor(curves[:, i]), node_t).double() for i in (0, -1)])
                self.maps.append((dec, node_t, pair[0], pair[1]))
        self.device = self.maps[0][0].device
        z = torch.as_tensor(curves, dtype=torch.float64, device=self.device)
        self.lo = self.hi = None
        if bounds is not None:  # every trial point is projected onto the box [lo, hi] (per curve or shared)
            self.lo, self.hi = (torch.as_tensor(np.broadcast_to(v, (self.n, self.d)).copy(), dtype=torch.float64,
                                                device=self.device)[:, None] for v in bounds)
            z[:, 1:-1] = torch.maximum(torch.minimum(z[:, 1:-1], self.hi), self.lo)
        self.ends = z[:, [0, -1]]
        self.x = z[:, 1:-1]  # (B, T−1, d) the variables: the interior points
        inner = self.segments - 1
        off = torch.diag(torch.ones(max(inner - 1, 0), dtype=torch.float64), 1)
        lap = 2 * torch.eye(inner, dtype=torch.float64) - off - off.T  # tridiag(−1, 2, −1)
        self.lap_inv = torch.linalg.inv(lap).to(self.device) if inner else None
        self.metric_inv = None
        if metrics is not None:  # a relative ridge keeps singular metrics (dead latent directions) invertible
            g = torch.as_tensor(metrics, dtype=torch.float64, device=self.device)
            ridge = 1e-8 * g.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
            self.metric_inv = torch.linalg.inv(g + ridge[:, None, None] * torch.eye(self.d, dtype=torch.float64,
                                                                                   device=self.device))
        self.evaluations = 0

    def evaluate(self, x: torch.Tensor, rows: torch.Tensor, trial: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energies (b,), lengths (b,), energy gradients (b, T−1, d) and the decoded interior points
        (b, maps, T−1, P) of curves `rows` at interior points x.

        A trial point of the line search may leave the region where the decoder is finite (a warp that
        overflows far out): its energy counts as +inf, so the step is rejected and shortened. Anywhere else a
        non-finite energy is the decoder's fault and an error."""
        x = x.detach().requires_grad_(True)
        energy = x.new_zeros(len(rows))
        length = x.new_zeros(len(rows))
        inner = self.segments - 1
        decoded = []
        for dec, nodes, first, last in self.maps:
            out = first.new_zeros(len(rows), 0, first.shape[1])  # T = 1: no interior point to decode
            if inner:
                out = dec.decode(x.reshape(-1, self.d).to(dec.dtype), nodes[rows].repeat_interleave(inner))
                out = out.double().reshape(len(rows), inner, first.shape[1])
            decoded.append(out.detach())
            seq = torch.cat([first[rows, None], out, last[rows, None]], 1)  # (b, T+1, P)
            sq = ((seq[:, 1:] - seq[:, :-1]) ** 2).sum(-1)  # (b, T) squared segment lengths in the output
            energy = energy + self.segments * sq.sum(1)
            length = length + sq.sqrt().sum(1)
        energy, length = energy / len(self.maps), length / len(self.maps)
        if trial:
            energy = torch.where(torch.isfinite(energy), energy, torch.full_like(energy, float("inf")))
        elif not torch.isfinite(energy).all():
            raise GeovqError(f"{int((~torch.isfinite(energy)).sum())} curve energies are NaN or inf: the decoder "
                             f"returned non-finite values along the curves")
        self.evaluations += len(rows)
        grad = torch.autograd.grad(energy.sum(), x)[0] if inner else torch.zeros_like(x)
        return energy.detach(), length.detach(), grad, torch.stack(decoded, 1)

    def midpoint_lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_midpoint_lengths` of the curves `run` returned: their points' outputs are the ones its last
        accepted evaluation decoded, so only the T segment midpoints are decoded here."""
        rows = torch.arange(self.n, device=self.device)
        full = self._full(self.x, rows)  # (n, T+1, d)
        mids = full[:, :-1] + 0.5 * (full[:, 1:] - full[:, :-1])  # as `subdivide` places them
        outputs = []
        with torch.no_grad():
            for m, (dec, nodes, first, last) in enumerate(self.maps):
                half = dec.decode(mids.reshape(-1, self.d).to(dec.dtype), nodes.repeat_interleave(self.segments))
                seq = first.new_empty(self.n, 2 * self.segments + 1, first.shape[1])
                seq[:, 0::2] = torch.cat([first[:, None], self.decoded[:, m], last[:, None]], 1)
                seq[:, 1::2] = half.double().reshape(self.n, self.segments, -1)
                outputs.append(seq)
        return _chord_lengths(outputs)

    def precondition(self, g: torch.Tensor, rows: torch.Tensor, stretch: torch.Tensor) -> torch.Tensor:
        """(2T (L ⊗ G))⁻¹ g for g (b, T−1, d): G = the curve's metric tensor, else stretch · I."""
        out = self.lap_inv @ g
        if self.metric_inv is not None:
            return out @ self.metric_inv[rows] / (2 * self.segments)
        return out / (2 * self.segments * stretch[:, None, None])

    def run(self, tol: float, max_iter: int) -> Curves:
        n, dev = self.n, self.device
        all_rows = torch.arange(n, device=dev)
        x = self.x
        if self.segments == 1:  # no interior point: the straight segment is the only curve
            energy, length, _, self.decoded = self.evaluate(x, all_rows)
            return self._result(x, energy, length, length, torch.zeros(n, dtype=torch.long, device=dev),
                                torch.ones(n, dtype=torch.bool, device=dev))
        energy, length, grad, self.decoded = self.evaluate(x, all_rows)
        initial_length = length.clone()
        full = self._full(x, all_rows)
        steps = (full[:, 1:] - full[:, :-1]).pow(2).sum((1, 2))
        stretch = (energy / (self.segments * steps)).clamp_min(1e-300)  # mean ‖JΔ‖²/‖Δ‖² along the curve
        flat = x.shape[1] * self.d
        s_hist = x.new_zeros(n, MEMORY, flat)
        y_hist = x.new_zeros(n, MEMORY, flat)
        rho = x.new_zeros(n, MEMORY)
        gamma = x.new_ones(n)
        iterations = torch.zeros(n, dtype=torch.long, device=dev)
        converged = energy <= 0  # coincident ends (or a constant map): nothing to minimise
        active = ~converged
        last_decrease = torch.full_like(energy, float("inf"))
        for iteration in range(max_iter + 1):
            rows = torch.nonzero(active).flatten()
            if len(rows) == 0:
                break
            g = grad[rows].flatten(1)
            direction = -self._two_loop(g, s_hist[rows], y_hist[rows], rho[rows], gamma[rows], rows, stretch[rows])
            slope = (g * direction).sum(1)
            # converged: the last step lowered E by less than tol·E, and so would the next full quasi-Newton
            # step by the model's own prediction (−slope/2); either alone stops too early after a short step
            # or a poor first model
            done = (last_decrease[rows] <= tol * energy[rows]) & (-0.5 * slope <= tol * energy[rows])
            converged[rows[done]] = True
            active[rows[done]] = False
            if iteration == max_iter:  # out of steps: not converged
                break
            keep = ~done
            rows, g, direction, slope = rows[keep], g[keep], direction[keep], slope[keep]
            if len(rows) == 0:
                break
            alpha = x.new_ones(len(rows))
            new = [x.new_empty(len(rows)), x.new_empty(len(rows)), torch.empty_like(grad[rows]),
                   torch.empty_like(self.decoded[rows]), torch.empty_like(g)]
            pending = torch.ones(len(rows), dtype=bool, device=dev)
            gave_up = torch.zeros_like(pending)
            for _ in range(MAX_BACKTRACKS):
                idx = torch.nonzero(pending).flatten()
                trial = self._project(x[rows[idx]] + (alpha[idx, None] * direction[idx]).view_as(x[rows[idx]]),
                                      rows[idx])
                taken = (trial - x[rows[idx]]).flatten(1)  # the step, after projection
                e, ln, gr, decoded = self.evaluate(trial, rows[idx], trial=True)
                ok = e <= energy[rows[idx]] + ARMIJO * (g[idx] * taken).sum(1)
                for store, value in zip(new, (e, ln, gr, decoded, taken)):
                    store[idx[ok]] = value[ok]
                pending[idx[ok]] = False
                # rejected: the minimiser of the quadratic through E(0), E'(0) and E(alpha), within [0.1, 0.5]·alpha
                bad, a = idx[~ok], alpha[idx[~ok]]
                curv = (e[~ok] - energy[rows[bad]] - slope[bad] * a) / a**2
                alpha[bad] = (-slope[bad] / (2 * curv.clamp_min(1e-300))).clamp(0.1 * a, 0.5 * a)
                # cut to where the model expects a decrease below E's resolution: nothing left to verify, a
                # (numerical) minimum. Cutting on to MAX_BACKTRACKS evaluated such rows one or two at a time:
                # 5/6 of the in-context geodesic fit on a plain β-VAE's flat MNIST decoder, for the same lengths.
                flat = bad[alpha[bad] * -slope[bad] < DECREASE_RESOLUTION * energy[rows[bad]]]
                pending[flat], gave_up[flat] = False, True
                if not pending.any():
                    break
            moved = ~(pending | gave_up)
            converged[rows[gave_up]] = True  # no decrease E can resolve is left: a numerical minimum
            active[rows[~moved]] = False  # those, and the rows that no step lowered within MAX_BACKTRACKS cuts
            rows, g = rows[moved], g[moved]
            e_new, l_new, g_new, decoded, step = (v[moved] for v in new)
            change = g_new.flatten(1) - g
            curvature = (step * change).sum(1)
            keep = curvature > 1e-12 * (step.norm(dim=1) * change.norm(dim=1))
            upd = rows[keep]
            s_hist[upd] = torch.cat([s_hist[upd, 1:], step[keep, None]], 1)
            y_hist[upd] = torch.cat([y_hist[upd, 1:], change[keep, None]], 1)
            rho[upd] = torch.cat([rho[upd, 1:], 1.0 / curvature[keep, None]], 1)
            pre_y = self.precondition(change[keep].view(len(upd), *x.shape[1:]), upd, stretch[upd]).flatten(1)
            gamma[upd] = curvature[keep] / (change[keep] * pre_y).sum(1)
            last_decrease[rows] = energy[rows] - e_new
            x = x.clone()
            x[rows] = x[rows] + step.view(len(rows), *x.shape[1:])
            energy[rows], length[rows], grad[rows], self.decoded[rows] = e_new, l_new, g_new, decoded
            iterations[rows] += 1
        self.x = x
        return self._result(x, energy, length, initial_length, iterations, converged)

    def _two_loop(self, g, s_hist, y_hist, rho, gamma, rows, stretch) -> torch.Tensor:
        """H g by the L-BFGS two-loop recursion, H0 = gamma · (2T (L ⊗ G))⁻¹; empty slots have rho = 0."""
        q = g.clone()
        alphas = []
        for i in range(MEMORY - 1, -1, -1):
            a = rho[:, i] * (s_hist[:, i] * q).sum(1)
            q -= a[:, None] * y_hist[:, i]
            alphas.append(a)
        r = gamma[:, None] * self.precondition(q.view(len(g), self.segments - 1, self.d), rows, stretch).flatten(1)
        for i, a in zip(range(MEMORY), reversed(alphas)):
            b = rho[:, i] * (y_hist[:, i] * r).sum(1)
            r += (a - b)[:, None] * s_hist[:, i]
        return r

    def _project(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Interior points x of curves `rows`, projected onto their boxes (when bounded)."""
        return x if self.lo is None else torch.maximum(torch.minimum(x, self.hi[rows]), self.lo[rows])

    def _full(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(b, T+1, d) whole curves, ends included."""
        return torch.cat([self.ends[rows, :1], x, self.ends[rows, 1:]], 1)

    def _result(self, x, energy, length, initial_length, iterations, converged) -> Curves:
        rows = torch.arange(self.n, device=self.device)
        full = self._full(x, rows)
        return Curves(full.cpu().numpy(), length.cpu().numpy(), energy.cpu().numpy(), initial_length.cpu().numpy(),
                      iterations.cpu().numpy(), converged.cpu().numpy(), self.evaluations)


CONTEXTS = ("source", "target", "both")


def refine_pairs(dec: TokenDecoder, sources: np.ndarray, targets: np.ndarray, *, context: str = "both",
                 paths: np.ndarray | None = None, path_lengths: np.ndarray | None = None,
                 n_segments: int = N_SEGMENTS, tol: float = TOL, max_iter: int = MAX_ITER,
                 metrics: np.ndarray | None = None, bounds: tuple[np.ndarray, np.ndarray] | None = None,
                 resolution: float = RESOLUTION, max_segments: int = MAX_SEGMENTS,
                 chunk_elements: int = CHUNK_ELEMENTS) -> Curves:
    """Refined curves between the nodes sources[b] and targets[b] of one token decoder; `.lengths` are the
    distances.

    context: whose decoder map measures the curve: "source" (d_i, the length in the source token's own image:
    the distance that decides its code), "target", or "both" (the mean of the two maps: a symmetric length,
    as an edge's). A context-free (flat) decoder has one map whatever this says.
    paths: (B, H) node ids of a polyline from each source to its target (e.g. `path_nodes` of a shortest-path
    tree; repeated ids as padding are fine) to start from, resampled at equal arc length along
    `path_lengths` (B, H) (cumulative, e.g. the graph distance from the source; default Euclidean); without
    paths, each curve starts as the straight segment. metrics, bounds, resolution, max_segments: see
    `refine_curves`.
    """
    sources, targets = np.asarray(sources, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if context not in CONTEXTS:
        raise GeovqError(f"curve context {context!r} is unknown; valid: {', '.join(CONTEXTS)}")
    if n_segments < 1:
        raise GeovqError(f"n_segments={n_segments} must be >= 1")
    if sources.shape != targets.shape or sources.ndim != 1:
        raise GeovqError(f"sources {sources.shape} and targets {targets.shape} must be 1-D arrays of equal length")
    for name, ids in (("sources", sources), ("targets", targets)):
        if len(ids) and (ids.min() < 0 or ids.max() >= dec.n_nodes):
            raise GeovqError(f"{name} must be node ids in [0, {dec.n_nodes}); got values in [{ids.min()}, {ids.max()}]")
    if paths is None:
        init = straight_curves(dec.points[sources], dec.points[targets], n_segments)
    else:
        paths = np.asarray(paths, dtype=np.int64)
        if paths.shape[0] != len(sources) or (paths[:, 0] != sources).any() or (paths[:, -1] != targets).any():
            raise GeovqError("paths must be (B, H) node ids, row b running from sources[b] to targets[b]")
        init = resample_paths(dec.points[paths], n_segments, path_lengths)
    if dec.context_free or context != "both":
        contexts = [(dec, targets if context == "target" else sources)]
    else:
        contexts = [(dec, sources), (dec, targets)]
    return refine_curves(init, contexts, tol=tol, max_iter=max_iter, metrics=metrics, bounds=bounds,
                         resolution=resolution, max_segments=max_segments, chunk_elements=chunk_elements)


def nearest_in_context(dec: TokenDecoder, nodes: np.ndarray, targets: np.ndarray, *, margin: float = PRUNE_MARGIN,
                       lengths: bool = True, **options) -> tuple[np.ndarray, np.ndarray, int]:
    """For each node, the nearest of its candidate latent points by refined curve length in its own context.

    nodes (N,) node ids of `dec`; targets (N, S, d) each node's S candidates (e.g. codewords). Returns (index
    into S (N,), that curve's length (N,), curves refined). Exact pruning: a curve is no shorter than the
    chord ‖f(c) − f(z)‖ between its ends' outputs, and the refined curve is no longer than the straight
    segment (up to `margin`, the length that trading speed for energy may add), so a candidate whose chord
    exceeds (1 + margin) × the least straight length in its row is never refined. The chords cost one
    decoder pass per candidate and the straight lengths 2T − 1, so the straight length is measured first for
    each row's least-chord candidate, and then only for the candidates whose chord does not already exceed
    (1 + margin) × that: a candidate pruned by it has a straight length above the row's least, so the
    survivors are those of the full rule. lengths=False (an encoder, which needs only the choice): a row
    that pruning leaves with one candidate takes it unrefined, and reports its straight length (an upper
    bound). `options`: refine_curves'.
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    targets = np.asarray(targets, np.float64)
    n, s, d = targets.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), 0
    chunk = options.get("chunk_elements", CHUNK_ELEMENTS)
    flat_nodes = np.repeat(nodes, s)
    straight = straight_curves(np.repeat(dec.points[nodes], s, axis=0), targets.reshape(-1, d),
                               options.pop("n_segments", N_SEGMENTS))
    chord = _chords(dec, nodes, targets, chunk)  # (n, s) lower bounds
    # each measured candidate's `_midpoint_lengths`: coarse and (its straight length) fine, cumulative along
    coarse, upper = np.full((n, s), np.nan), np.full((n, s), np.inf)
    along = np.zeros((n, s, 2 * straight.shape[1] - 1))
    first = np.zeros((n, s), dtype=bool)
    first[np.arange(n), chord.argmin(1)] = True
    for stage in (first, ~first):  # stage 2: what the least-chord candidates' straight lengths leave standing
        rows, cols = np.nonzero(stage & (chord <= (1 + margin) * upper.min(1, keepdims=True)))
        if len(rows):
            flat = rows * s + cols
            coarse[rows, cols], upper[rows, cols], along[rows, cols] = _midpoint_lengths(
                straight[flat], [(dec, flat_nodes[flat])], chunk)
    live = chord <= (1 + margin) * upper.min(1, keepdims=True)
    live[np.arange(n), upper.argmin(1)] = True
    dist = np.full((n, s), np.inf)
    if not lengths:  # decided by pruning alone
        alone = live.sum(1) == 1
        dist[alone] = np.where(live[alone], upper[alone], np.inf)
        live[alone] = False
    rows, cols = np.nonzero(live)
    flat = rows * s + cols
    if len(flat):
        dist[rows, cols] = refine_curves(straight[flat], [(dec, flat_nodes[flat])], **options,
                                         measured=(coarse[rows, cols], upper[rows, cols], along[rows, cols])).lengths
    best = dist.argmin(1)
    return best, dist[np.arange(n), best], len(rows)


def _chords(dec: TokenDecoder, nodes: np.ndarray, targets: np.ndarray, chunk_elements: int) -> np.ndarray:
    """(N, S) ‖f_i(c) − f_i(z_i)‖: each node's output distance to each of its S candidates, in its context."""
    n, s, _ = targets.shape
    rows = max(1, chunk_elements // (dec.out_dim * (s + 1)))  # nodes per decoder call
    out = np.empty((n, s))
    with torch.no_grad():
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            m = len(nodes[sl])
            points = np.concatenate([dec.points[nodes[sl]][:, None], targets[sl]], 1).reshape(-1, targets.shape[2])
            f = dec.decode(dec.tensor(points), dec.tensor(np.repeat(nodes[sl], s + 1), torch.long))
            f = f.double().reshape(m, s + 1, -1)
            out[sl] = (f[:, 1:] - f[:, :1]).norm(dim=2).cpu().numpy()
    return out
