"""geovq.geometry.curves against closed-form geodesics, invariants of the curve energy, and bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from geovq.errors import GeovqError
from geovq.geometry import FlatTokenDecoder, GridTokenDecoder, geodesic_distances
from geovq.geometry.curves import (nearest_in_context, refine_curves, refine_pairs, resample_paths,
                                  straight_curves, subdivide)
from geovq.geometry.manifolds import make
from geovq.geometry.paths import path_nodes, shortest_path_trees
from geovq.latents import LatentSet

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def relative_errors(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.abs(estimate / truth - 1)


@pytest.mark.parametrize("name", ["warped_flat", "sphere", "warped_sphere"])
@pytest.mark.parametrize("d", [2, 16])
def test_refined_pairs_match_closed_form_geodesics(name, d):
    manifold = make(name, d)
    rng = np.random.default_rng(d)
    a, b = manifold.sample(24, rng), manifold.sample(24, rng)
    dec = FlatTokenDecoder(manifold.decoder, np.concatenate([a, b]))
    curves = refine_pairs(dec, np.arange(24), np.arange(24, 48))
    truth = manifold.distances(a, b)
    assert np.median(relative_errors(curves.lengths, truth)) <= 0.005
    assert curves.converged.all()
    # the closed form is the minimum over all curves: a curve's length can only undershoot it by the error
    # of its length estimate (chords, extrapolated), a small fraction of the resolution
    assert (curves.lengths >= truth * (1 - 0.005)).all()
    if d == 16:
        assert np.median(relative_errors(curves.initial_lengths, truth)) > 2 * np.median(
            relative_errors(curves.lengths, truth))


def test_refined_geodesic_distances_fix_the_graph_overestimate_in_16_dims():
    """geodesic_distances(refine=True) on a 16-D sphere: the graph overestimates, the refined curves do not."""
    manifold = make("sphere", 16)
    rng = np.random.default_rng(0)
    latents = manifold.sample(1500, rng)
    sources, targets = np.array([0, 1, 2]), np.arange(100, 130)
    truth = manifold.pairwise(latents[sources], latents[targets])
    graph = geodesic_distances(latents, manifold.decoder, sources, k=10, targets=targets)
    refined = geodesic_distances(latents, manifold.decoder, sources, k=10, targets=targets, refine=True)
    assert np.median(relative_errors(graph, truth)) > 0.2  # what refinement is for
    assert np.median(relative_errors(refined, truth)) <= 0.005
    straight = geodesic_distances(latents, manifold.decoder, sources, k=10, targets=targets, refine=True,
                                  init="straight")
    assert np.median(relative_errors(straight, truth)) <= 0.005
    # the unrefined call still returns the plain graph distances of every node
    full = geodesic_distances(latents, manifold.decoder, sources, k=10)
    np.testing.assert_array_equal(full[:, targets], graph)
    assert refined[0, 0] > 0 and geodesic_distances(latents, manifold.decoder, [5], targets=[5], refine=True)[0, 0] == 0


def test_linear_decoder_straight_segment_is_the_geodesic_from_any_start():
    """Under z -> Az every geodesic is straight with length ‖AΔ‖, also from a zig-zag starting polyline."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 3)) * np.array([10.0, 1.0, 0.3])  # anisotropic
    points = rng.standard_normal((20, 3))
    dec = FlatTokenDecoder(lambda z: z @ torch.as_tensor(a, dtype=z.dtype).T, points)
    src, tgt = np.arange(10), np.arange(10, 20)
    truth = np.linalg.norm((points[tgt] - points[src]) @ a.T, axis=1)
    np.testing.assert_allclose(refine_pairs(dec, src, tgt).lengths, truth, rtol=1e-9)
    zigzag = straight_curves(points[src], points[tgt], 8) + 0.3 * rng.standard_normal((10, 9, 3))
    zigzag[:, 0], zigzag[:, -1] = points[src], points[tgt]
    curves = refine_curves(zigzag, [(dec, src)], tol=1e-6)
    np.testing.assert_allclose(curves.lengths, truth, rtol=1e-4)
    assert np.median(curves.initial_lengths / truth) > 1.5  # a real detour to undo


def test_a_curve_already_at_its_minimum_is_left_once_no_decrease_is_resolvable(monkeypatch):
    """Under a linear map computed in float32 with an offset (as a decoder's outputs are rounded), the straight
    segment is the geodesic and E's rounding hides any decrease a step could make. The line search stops
    cutting once the model's predicted decrease is below E's resolution (the curve is at a numerical minimum:
    converged), where cutting on to MAX_BACKTRACKS cost 3.5× the evaluations for the same lengths."""
    import geovq.geometry.curves as curves_module

    rng = np.random.default_rng(1)
    a = torch.as_tensor(rng.standard_normal((6, 3)) * np.array([10.0, 1.0, 0.3]), dtype=torch.float32)
    points = rng.standard_normal((40, 3))
    dec = FlatTokenDecoder(lambda z: (z.float() @ a.T + 1e3).double(), points)
    src, tgt = np.arange(20), np.arange(20, 40)
    truth = np.linalg.norm((points[tgt] - points[src]) @ a.double().numpy().T, axis=1)
    curves = refine_pairs(dec, src, tgt, n_segments=4)
    monkeypatch.setattr(curves_module, "DECREASE_RESOLUTION", 0.0)  # cut until MAX_BACKTRACKS
    exhaustive = refine_pairs(dec, src, tgt, n_segments=4)
    np.testing.assert_allclose(curves.lengths, truth, rtol=1e-4)  # the float32 map's own accuracy
    np.testing.assert_allclose(curves.lengths, exhaustive.lengths, rtol=1e-7)
    assert curves.converged.all()
    assert curves.evaluations < exhaustive.evaluations / 3


def test_coarse_curves_are_subdivided_until_chords_follow_the_decoder():
    """f(t) = (cos kt, sin kt): winding round a circle. Chords of 8 segments cut across it; the length is k|Δt|."""
    k = 20.0
    dec = FlatTokenDecoder(lambda z: torch.cat([torch.cos(k * z), torch.sin(k * z)], 1), np.array([[0.0], [1.3]]))
    curves = refine_pairs(dec, np.array([0]), np.array([1]), n_segments=8)
    assert len(curves.points[0]) - 1 > 8
    np.testing.assert_allclose(curves.lengths, [k * 1.3], rtol=0.005)
    coarse = refine_pairs(dec, np.array([0]), np.array([1]), n_segments=8, max_segments=8)
    assert len(coarse.points[0]) == 9 and abs(coarse.lengths[0] / (k * 1.3) - 1) > 0.01  # chords cut across


class TinyGridDecoder(nn.Module):
    """A small conv decoder (B, h, w, C) -> (B, 1, 2h, 2w) with a sigmoid, like the trunk's mean."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(),
                                 nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1))

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(grids.permute(0, 3, 1, 2)))


def grid_decoder() -> GridTokenDecoder:
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((6, 3, 3, 4)).astype(np.float32)
    latents = LatentSet.from_grids(mu, np.zeros_like(mu), 4, "contiguous")
    return GridTokenDecoder.from_latents(TinyGridDecoder(4).double(), latents)


def test_in_context_curves_use_their_own_images():
    dec = grid_decoder()
    src, tgt = np.array([0, 10, 20, 30]), np.array([50, 40, 9, 1])
    one = refine_pairs(dec, src, tgt, context="source", tol=1e-6)
    # a single context: the curve is no shorter than the chord in the source's image, and (up to the
    # speed changes that minimising energy trades for length) no longer than the straight segment
    with torch.no_grad():
        nodes = dec.tensor(src, torch.long)
        chord = (dec.decode(dec.tensor(dec.points[src]), nodes) - dec.decode(dec.tensor(dec.points[tgt]), nodes)
                 ).norm(dim=1).numpy()
    assert (one.lengths >= chord * (1 - 1e-9)).all() and (one.lengths <= one.initial_lengths * (1 + 1e-3)).all()
    # the other image gives another length: contexts matter
    other = refine_pairs(dec, src, tgt, context="target", tol=1e-6)
    assert np.abs(other.lengths / one.lengths - 1).max() > 0.01
    # "both": the mean of the two maps' lengths of its own final curve
    both = refine_pairs(dec, src, tgt, context="both", tol=1e-6)
    per_map = [refine_curves(np.stack(both.points), [(dec, nodes)], max_iter=0).lengths for nodes in (src, tgt)]
    np.testing.assert_allclose(both.lengths, 0.5 * (per_map[0] + per_map[1]), rtol=1e-6)


def test_chunks_and_reused_outputs_change_no_number():
    """refine_curves measures, minimises and re-measures chunk by chunk, handing the ends its first measurement
    decoded to the minimiser and measuring the final curves from the outputs the minimiser's last step
    decoded. Chunks of one curve (every output decoded afresh for each) must give the same numbers, and the
    reported length must be the final curve's, measured again from scratch."""
    from geovq.geometry.curves import _extrapolated, _midpoint_lengths

    dec = grid_decoder()
    src, tgt = np.array([0, 10, 20, 30, 5]), np.array([50, 40, 9, 1, 33])
    starts = straight_curves(dec.points[src], dec.points[tgt])
    whole = refine_curves(starts, [(dec, src), (dec, tgt)])
    one_by_one = refine_curves(starts, [(dec, src), (dec, tgt)], chunk_elements=1)
    np.testing.assert_allclose(one_by_one.lengths, whole.lengths, rtol=1e-12)
    np.testing.assert_allclose(one_by_one.energies, whole.energies, rtol=1e-12)
    for b in range(len(src)):
        coarse, fine, _ = _midpoint_lengths(whole.points[b][None], [(dec, src[b:b + 1]), (dec, tgt[b:b + 1])],
                                            chunk_elements=1)
        np.testing.assert_allclose(whole.lengths[b], _extrapolated(coarse, fine)[0], rtol=1e-12)


def test_nearest_in_context_prunes_to_the_choice_of_refining_every_candidate():
    """Against brute force: every (node, candidate) curve refined from the straight segment in the node's own
    context, argmin per node. Pruning (chords, then straight lengths) must not change a choice, and the
    refined lengths of the survivors are those of refining them alone; lengths=False decides the rows that
    pruning leaves with one candidate without refining them."""
    dec = grid_decoder()
    rng = np.random.default_rng(5)
    nodes = np.arange(0, dec.n_nodes, 2)
    targets = dec.points[rng.integers(0, dec.n_nodes, (len(nodes), 5))] + 0.05 * rng.standard_normal((len(nodes), 5, 4))
    n, s, d = targets.shape
    every = refine_curves(straight_curves(np.repeat(dec.points[nodes], s, 0), targets.reshape(-1, d)),
                          [(dec, np.repeat(nodes, s))]).lengths.reshape(n, s)
    best, dist, refined = nearest_in_context(dec, nodes, targets)
    np.testing.assert_array_equal(best, every.argmin(1))
    np.testing.assert_allclose(dist, every.min(1), rtol=1e-6)
    assert n <= refined < n * s  # pruning refined fewer than all, and at least one per node
    quick, upper, fewer = nearest_in_context(dec, nodes, targets, lengths=False)
    np.testing.assert_array_equal(quick, best)
    assert fewer < refined and (upper >= dist * (1 - 1e-6)).all()  # unrefined rows report a straight length


def test_bounded_curves_stay_in_their_box():
    dec = grid_decoder()
    src, tgt = np.arange(10), np.arange(20, 30)
    lo, hi = np.minimum(dec.points[src], dec.points[tgt]), np.maximum(dec.points[src], dec.points[tgt])
    curves = refine_pairs(dec, src, tgt, context="source", bounds=(lo, hi))
    for b, curve in enumerate(curves.points):
        assert (curve >= lo[b] - 1e-12).all() and (curve <= hi[b] + 1e-12).all()


def test_paths_are_walked_and_resampled_at_equal_length():
    edges = np.array([[0, 1], [1, 2], [2, 3], [0, 4]])
    lengths = np.array([1.0, 1.0, 2.0, 5.0])
    graph = sp.csr_matrix((np.r_[lengths, lengths], (np.r_[edges[:, 0], edges[:, 1]], np.r_[edges[:, 1], edges[:, 0]])),
                          shape=(5, 5))
    dist, pred = shortest_path_trees(graph, np.array([0, 3]))
    paths = path_nodes(pred, np.array([0, 0, 1]), np.array([3, 4, 0]))
    np.testing.assert_array_equal(paths, [[0, 1, 2, 3], [0, 4, 4, 4], [3, 2, 1, 0]])
    points = np.array([[0.0, 0], [1, 0], [2, 0], [2, 2], [0, 5]])
    resampled = resample_paths(points[paths[:1]], 4, dist[0][paths[:1]])  # cumulative 0, 1, 2, 4
    np.testing.assert_allclose(resampled[0], [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]])
    np.testing.assert_allclose(subdivide(resampled)[0, 1], [0.5, 0])


def test_bad_inputs_raise_geovq_errors():
    manifold = make("sphere", 2)
    points = manifold.sample(10, np.random.default_rng(0))
    dec = FlatTokenDecoder(manifold.decoder, points)
    for tol in (0.0, -1e-3):
        with pytest.raises(GeovqError, match="tol"):
            refine_pairs(dec, np.array([0]), np.array([1]), tol=tol)
        with pytest.raises(GeovqError, match="tol"):
            geodesic_distances(points, manifold.decoder, [0], k=3, refine=True, tol=tol)

    data = torch.as_tensor(points)

    def nan_between_the_data(z):  # finite at the data points (the ends), NaN along the curves
        on_data = torch.isin(z, data.to(z.dtype)).all(1, keepdim=True)
        return manifold.decoder(z) + torch.where(on_data, 0.0, torch.nan)

    nan_dec = FlatTokenDecoder(nan_between_the_data, points)
    with pytest.raises(GeovqError, match="NaN or inf"):
        refine_pairs(nan_dec, np.array([0]), np.array([1]))
    with pytest.raises(GeovqError, match="context"):
        refine_pairs(dec, np.array([0]), np.array([1]), context="mine")
    with pytest.raises(GeovqError, match="node ids"):
        refine_pairs(dec, np.array([0]), np.array([10]))
    with pytest.raises(GeovqError, match="init"):
        geodesic_distances(points, manifold.decoder, [0], k=3, refine=True, init="random")


def test_a_line_search_step_into_an_overflowing_region_is_shortened_not_fatal():
    """A warp that overflows far out (here: inf beyond radius 3) is finite on every curve the minimiser keeps;
    only trial steps of the line search reach the overflow, and those are rejected and shortened."""
    overflowed = []

    def warp(z):  # per-coordinate monotone: a flat manifold, geodesic (-1,0)-(1,0) straight, length 2(1 + 0.3)
        far = z.norm(dim=1, keepdim=True) > 3
        overflowed.append(int(far.sum()))
        return torch.where(far, torch.inf, z + 0.3 * z**3)

    points = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.8]])
    curves = refine_pairs(FlatTokenDecoder(warp, points), np.array([0]), np.array([1]), n_segments=8,
                          paths=np.array([[0, 2, 1]]))  # start bent up to radius 2.8
    assert sum(overflowed) > 0  # a trial step did overflow
    assert abs(curves.lengths[0] / 2.6 - 1) < 1e-3
