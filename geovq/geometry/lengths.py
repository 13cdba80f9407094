"""Edge lengths under the decoder's pull-back metric G(z) = J(z)ᵀJ(z) (DESIGN.md §3.3b).

A segment from node a's point z_a along Δ, in a's context, has length ℓ_a = ∫₀¹ ‖J_a(z_a + tΔ) Δ‖ dt.
An edge (a, b) has length L_ab = ½(ℓ_a + ℓ_b), ℓ_b being the same segment in b's context (for a flat
decoder both are the same number, computed once). Quadratures of ℓ:

- `midpoint`:  ‖J(z_a + Δ/2) Δ‖                                  1 JVP per segment
- `simpson`:   (s(0) + 4 s(½) + s(1)) / 6                        s(0) shared per node, s(½) 1 JVP
- `endpoint`:  L_ab = ½(‖J_a(z_a) Δ‖ + ‖J_b(z_b) Δ‖), the trapezoid rule with each end in its own context
               (DESIGN.md §3.3b); needs only each node's own Jacobian, shared by all its edges
- `adaptive`:  adaptive Simpson: a panel is bisected while its Simpson estimate and the sum of its two
               halves' differ by more than rtol·ℓ·(panel width); at least 8 and at most 2^max_depth
               panels

"Shared per node": all terms ‖J_n(z_n) Δ_e‖ of node n are pushed forward around one primal pass, either as
the d columns of J_n (when n has at least d such terms, giving G_n and every term as sqrt(Δᵀ G_n Δ)) or as
its own Δ_e's. JVPs are `TokenDecoder.push_forward` (a vmap of `torch.func.jvp` over tangents that share
a primal, or the decoder's own `jvp` when it has one), in chunks of at most `chunk_elements` decoder output
values, so memory is bounded whatever the number of edges.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.geometry.decoders import TokenDecoder

QUADRATURES = ("midpoint", "simpson", "endpoint", "adaptive")
MIN_DEPTH = 2  # adaptive: every segment is split into at least 8 panels
# Decoder output values per JVP call. 2^18 is 334 MNIST images (or 20 nodes × 16 tangents): on CPU a JVP
# costs ~1.9 forwards per row at 64-512 rows but 2.4-2.7 at 1024-2048, whose activations fall out of cache.
CHUNK_ELEMENTS = 2**18

log = logging.getLogger(__name__)


def check_quadrature(quadrature: str) -> None:
    if quadrature not in QUADRATURES:
        raise GeovqError(f"quadrature {quadrature!r} is unknown; valid: {', '.join(QUADRATURES)}")


def edge_lengths(dec: TokenDecoder, edges: np.ndarray, quadrature: str = "midpoint",
                 metrics: np.ndarray | None = None, **options) -> np.ndarray:
    """(E,) lengths of undirected edges (E, 2) between nodes of one token decoder.

    `metrics`: the nodes' metric tensors (N, d, d) if already computed (`node_metrics`); the endpoint terms
    then cost no decoder call.
    """
    return pair_lengths(dec, edges[:, 0], dec, edges[:, 1], quadrature, metrics_a=metrics, metrics_b=metrics,
                        **options)


def pair_lengths(dec_a: TokenDecoder, a: np.ndarray, dec_b: TokenDecoder, b: np.ndarray,
                 quadrature: str = "midpoint", *, metrics_a: np.ndarray | None = None,
                 metrics_b: np.ndarray | None = None, rtol: float = 1e-3, max_depth: int = 8,
                 chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """L_ab = ½(ℓ_a + ℓ_b) for node a[e] of `dec_a` and node b[e] of `dec_b` (e.g. a query and a landmark).

    `metrics_a`, `metrics_b`: each decoder's node metric tensors when already known (see `own_speeds`).
    """
    check_quadrature(quadrature)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    delta = dec_b.points[b] - dec_a.points[a]
    opts = dict(rtol=rtol, max_depth=max_depth, chunk_elements=chunk_elements)
    one_map = dec_a is dec_b and dec_a.context_free  # ℓ_a = ℓ_b, and a segment's s(1) is b's own term
    if quadrature == "midpoint":  # s(½) only: no endpoint terms
        mid_a = speeds(dec_a, a, dec_a.points[a] + 0.5 * delta, delta, chunk_elements)
        return mid_a if one_map else 0.5 * (mid_a + speeds(dec_b, b, dec_b.points[b] - 0.5 * delta, -delta,
                                                             chunk_elements))
    own_a = own_speeds(dec_a, a, delta, chunk_elements, metrics_a)
    own_b = own_speeds(dec_b, b, delta, chunk_elements, metrics_b)
    if quadrature == "endpoint":
        return 0.5 * (own_a + own_b)
    if one_map:
        return segment_lengths(dec_a, a, delta, quadrature, own_a, own_b, **opts)
    return 0.5 * (segment_lengths(dec_a, a, delta, quadrature, own_a, **opts)
                  + segment_lengths(dec_b, b, -delta, quadrature, own_b, **opts))


def segment_lengths(dec: TokenDecoder, nodes: np.ndarray, deltas: np.ndarray, quadrature: str,
                    f0: np.ndarray, f1: np.ndarray | None = None, *, rtol: float, max_depth: int,
                    chunk_elements: int) -> np.ndarray:
    """Simpson or adaptive ℓ = ∫₀¹ ‖J_n(z_n + tΔ) Δ‖ dt in node n's context; f0 = s(0), f1 = s(1) if known."""
    starts = dec.points[nodes]

    def s(t: float) -> np.ndarray:
        return speeds(dec, nodes, starts + t * deltas, deltas, chunk_elements)

    fm = s(0.5)
    f1 = s(1.0) if f1 is None else f1
    simpson = (f0 + 4.0 * fm + f1) / 6.0
    if quadrature == "simpson":
        return simpson
    return _adaptive_simpson(dec, nodes, starts, deltas, f0, fm, f1, simpson, rtol, max_depth, chunk_elements)


def _adaptive_simpson(dec, nodes, starts, deltas, f0, fm, f1, simpson, rtol, max_depth, chunk_elements):
    """Vectorised adaptive Simpson: every round bisects all panels that are not yet within tolerance."""
    tol = rtol * simpson  # per segment; a panel of width w may use the share tol·w
    total = np.zeros(len(nodes))
    seg = np.arange(len(nodes))
    lo, hi = np.zeros(len(nodes)), np.ones(len(nodes))
    f_lo, f_mid, f_hi, whole = f0, fm, f1, simpson
    for depth in range(max_depth):
        width = hi - lo
        quarter = np.concatenate([lo + 0.25 * width, lo + 0.75 * width])
        both = np.concatenate([seg, seg])
        f_q = speeds(dec, nodes[both], starts[both] + quarter[:, None] * deltas[both], deltas[both],
                     chunk_elements)
        f_left, f_right = np.split(f_q, 2)
        left = width / 12.0 * (f_lo + 4.0 * f_left + f_mid)
        right = width / 12.0 * (f_mid + 4.0 * f_right + f_hi)
        error = left + right - whole
        # a panel may stop only once it is at most 1/2^MIN_DEPTH of the segment: on a wide panel of an
        # oscillating integrand, the two estimates can agree by coincidence while both are wrong
        # |error| / 15 estimates the error of the halves; requiring |error| itself within the panel's share
        # of the tolerance leaves a safety factor of 15 for integrands where that estimate is optimistic
        done = (np.abs(error) <= tol[seg] * width) & (depth >= MIN_DEPTH)
        if depth == max_depth - 1 and not done.all():
            log.warning("adaptive quadrature: %d panels reached max_depth=%d before rtol=%g",
                        int((~done).sum()), max_depth, rtol)
            done[:] = True
        np.add.at(total, seg[done], (left + right + error / 15.0)[done])  # Richardson-corrected
        go = ~done
        if not go.any():
            break
        mid = 0.5 * (lo + hi)
        seg = np.concatenate([seg[go], seg[go]])
        lo, hi = np.concatenate([lo[go], mid[go]]), np.concatenate([mid[go], hi[go]])
        f_lo, f_mid, f_hi = (np.concatenate([f_lo[go], f_mid[go]]), np.concatenate([f_left[go], f_right[go]]),
                             np.concatenate([f_mid[go], f_hi[go]]))
        whole = np.concatenate([left[go], right[go]])
    return total


def speeds(dec: TokenDecoder, nodes: np.ndarray, points: np.ndarray, tangents: np.ndarray,
           chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """‖J_n(p) t‖ for each row (n, p, t), in node n's context: one JVP per row."""
    out = np.empty(len(nodes))
    rows = _rows_per_call(dec, chunk_elements)
    with torch.no_grad():
        for start in range(0, len(nodes), rows):
            sl = slice(start, start + rows)
            jv = dec.push_forward(dec.tensor(points[sl]), dec.tensor(nodes[sl], torch.long),
                                  dec.tensor(tangents[sl])[None])[0]
            out[sl] = jv.double().norm(dim=1).cpu().numpy()
    return out


def own_speeds(dec: TokenDecoder, nodes: np.ndarray, tangents: np.ndarray,
               chunk_elements: int = CHUNK_ELEMENTS, metrics: np.ndarray | None = None) -> np.ndarray:
    """‖J_n(z_n) t‖ for each row (n, t): node n's own point in its own context, one primal pass per node.

    With the nodes' metric tensors `metrics` (N, d, d) from `node_metrics`, no decoder call at all.
    """
    out = np.empty(len(nodes))
    if len(nodes) == 0:
        return out
    if metrics is not None:
        return metric_norms(metrics[nodes], tangents)
    # Rows grouped by node; nodes with many rows first, so that each chunk pads to a similar tangent count.
    by_node = np.argsort(nodes, kind="stable")
    uniq, first, count = np.unique(nodes[by_node], return_index=True, return_counts=True)
    rank = np.arange(len(nodes)) - np.repeat(first, count)  # row's slot among its node's rows
    busiest = np.argsort(-count, kind="stable")
    out_dim = dec.out_dim
    d = dec.dim
    i = 0
    with torch.no_grad():
        while i < len(uniq):
            n_tangents = min(d, int(count[busiest[i]]))
            n_chunk = max(1, chunk_elements // (n_tangents * out_dim))
            chunk = busiest[i:i + n_chunk]
            i += n_chunk
            local = np.repeat(np.arange(len(chunk)), count[chunk])
            sorted_rows = first[chunk][local] + (np.arange(len(local)) - np.cumsum(count[chunk])[local]
                                                 + count[chunk][local])
            rows = by_node[sorted_rows]
            node_t = dec.tensor(uniq[chunk], torch.long)
            z = dec.tensor(dec.points[uniq[chunk]])
            t = tangents[rows]
            if n_tangents == d:  # the node's Jacobian columns: G_n = J_nᵀJ_n gives every term at once
                out[rows] = metric_norms(_metrics_at(dec, node_t, z)[local], t)
            else:  # fewer terms than d: push the node's own tangents, zero-padded to n_tangents
                padded = np.zeros((n_tangents, len(chunk), d))
                padded[rank[sorted_rows], local] = t
                jv = dec.push_forward(z, node_t, dec.tensor(padded))
                norms = jv.double().norm(dim=2).cpu().numpy()  # (n_tangents, nodes)
                out[rows] = norms[rank[sorted_rows], local]
    return out


def node_metrics(dec: TokenDecoder, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """(N, d, d) pull-back metric G_n = J_nᵀJ_n at every node's own point, in its own context.

    d tangent passes per node around one primal pass. Pass the result on as `metrics=` to `edge_lengths`,
    `pair_lengths` or `own_speeds`, whose endpoint terms then need no decoder call.
    """
    d = dec.dim
    per_call = max(1, chunk_elements // (d * dec.out_dim))
    metrics = np.empty((dec.n_nodes, d, d))
    with torch.no_grad():
        for start in range(0, dec.n_nodes, per_call):
            stop = min(start + per_call, dec.n_nodes)
            metrics[start:stop] = _metrics_at(dec, torch.arange(start, stop, device=dec.device),
                                              dec.tensor(dec.points[start:stop]))
    return metrics


def metric_norms(metrics: np.ndarray, tangents: np.ndarray) -> np.ndarray:
    """sqrt(tᵀ G t) row by row, for (n, d, d) metrics and (n, d) tangents."""
    squared = np.matmul(np.matmul(tangents[:, None, :], metrics), tangents[:, :, None])[:, 0, 0]
    return np.sqrt(np.maximum(squared, 0.0))  # rounding can leave -0.0-ish values


def _metrics_at(dec: TokenDecoder, nodes: torch.Tensor, z: torch.Tensor) -> np.ndarray:
    """(B, d, d) J_nᵀJ_n at points z (B, d), from the d columns of J pushed around one primal pass."""
    d = dec.dim
    basis = torch.eye(d, dtype=dec.dtype, device=dec.device)[:, None, :].expand(d, len(nodes), d)
    jac = dec.push_forward(z, nodes, basis).double()  # (d, B, P)
    return torch.einsum("inp,jnp->nij", jac, jac).cpu().numpy()


def _rows_per_call(dec: TokenDecoder, chunk_elements: int) -> int:
    return max(1, chunk_elements // dec.out_dim)
