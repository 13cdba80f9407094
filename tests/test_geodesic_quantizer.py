"""The geometry-aware quantizers: `geodesic` (graph k-medoids under the decoder metric) and `wasserstein`."""

from __future__ import annotations

import json
from dataclasses import replace

import faiss
import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist
from torch import nn

from geovq.errors import GeovqError
from geovq.geometry import geodesic_distances, stratified_tokens
from geovq.latents import LatentSet
from geovq.quantize import Quantizer, make_quantizer
from geovq.quantize.geodesic import CONTEXT_WEIGHT, POSITION_WEIGHT, context_features
from geovq.quantize.wasserstein import w2_points
from toy_decoders import ConvDecoder

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


class FlatGrid(nn.Module):
    """A flat decoder seen as a grid decoder: 1×1 μ-grids (B, 1, 1, C) -> outputs of the flat map."""

    def __init__(self, flat: nn.Module) -> None:
        super().__init__()
        self.flat = flat

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return self.flat(grids.reshape(grids.shape[0], -1))


def flat_latents(points: np.ndarray) -> LatentSet:
    mu = points.astype(np.float32)[:, None, None, :]
    return LatentSet.from_grids(mu, np.full_like(mu, -2.0))


def test_geodesic_quantizer_runs_on_the_same_engine_as_geodesic_distances():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    latents = flat_latents(np.random.default_rng(0).standard_normal((400, 3)))
    q = make_quantizer("geodesic", 8, decoder=FlatGrid(flat), k=6, paths="graph", max_landmarks=400).fit(latents)
    assert q.quadrature == "endpoint"  # the quantizer's default; geodesic_distances' is midpoint
    points = latents.token_mu.astype(np.float64)
    dist = geodesic_distances(points, flat, q.medoid_landmarks_, k=6, quadrature="endpoint")  # (K, N)
    np.testing.assert_allclose(q.landmark_distance_, dist.min(0), rtol=1e-9, atol=1e-12)
    assert (q.landmark_code_ == dist.argmin(0)).mean() > 0.99  # exact ties aside
    np.testing.assert_array_equal(q.codebook_, latents.token_mu[q.medoid_landmarks_])
    # a training token that is a landmark is encoded to its own landmark's code
    np.testing.assert_array_equal(q.encode(latents).ravel(), q.landmark_code_)


class Cylinder(nn.Module):
    """Isometric bending of the plane: the pull-back metric is the identity, so L_qj = ‖z_q − z_j‖."""

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        z = grids.reshape(grids.shape[0], 2).double()
        return torch.stack([torch.cos(z[:, 0]), torch.sin(z[:, 0]), z[:, 1]], dim=1)


def test_graph_insertion_rule_matches_brute_force():
    """code(q) = label[argmin_{j in kNN(q)} (L_qj + D(j))], with L_qj the Euclidean length here."""
    rng = np.random.default_rng(1)
    train = flat_latents(rng.uniform(0, 3, (600, 2)))
    test = flat_latents(rng.uniform(0, 3, (300, 2)))
    q = make_quantizer("geodesic", 10, decoder=Cylinder(), k=8, paths="graph", max_landmarks=600).fit(train)
    landmarks = q.landmarks_.points
    queries = test.token_mu.astype(np.float64)
    dist = np.linalg.norm(queries[:, None] - landmarks[None], axis=-1)
    near = np.argsort(dist, axis=1)[:, :8]
    cost = np.take_along_axis(dist, near, 1) + q.landmark_distance_[near]
    want = q.landmark_code_[near[np.arange(300), cost.argmin(1)]]
    codes = q.encode(test).ravel()
    assert (codes == want).mean() >= 0.99  # float32 ties at the k-th neighbour aside
    # with a constant metric, borrowing the nearest landmark's metric tensor changes nothing
    assert (q.encode_tokens(test, rule="landmark_metric") == want).mean() >= 0.99
    approx = q.encode_tokens(test, rule="nearest_landmark")
    assert (approx == q.landmark_code_[dist.argmin(1)]).all() and (approx != codes).any()


def test_grid_quantizer_fits_encodes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    decoder = ConvDecoder(4)
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((80, 4, 4, 4)).astype(np.float32)
    train = LatentSet.from_grids(mu[:60], np.full_like(mu[:60], -1.0), token_dim=2)
    test = LatentSet.from_grids(mu[60:], np.full_like(mu[60:], -1.0), token_dim=2)
    q = make_quantizer("geodesic", 12, decoder=decoder, k=6, max_landmarks=600, quadrature="endpoint").fit(train)
    info = q.fit_info_
    assert info["landmarks"] == 600 and info["graph"]["undirected_edges"] >= 600 * 6 // 2
    assert np.bincount(q.landmarks_.image).tolist() == [10] * 60  # stratified: 10 tokens from every image
    assert 0 <= info["coverage"] <= 1 and info["coverage_tokens"] == 60 * 32 - 600
    assert sum(info["quotas"]) == 12 and info["converged"]
    objective = [t["objective"] for t in info["trace"] if t["start"] == "k-means++"]
    assert np.all(np.diff(objective) <= 1e-9)
    tokens = {tuple(row) for row in train.token_mu.tolist()}
    assert all(tuple(row) in tokens for row in q.codebook_.tolist())  # medoids are training μ
    codes = q.encode(test)
    assert codes.shape == (20, 32) and codes.min() >= 0 and codes.max() < 12
    assert q.decode(codes).shape == (20, 32, 2)
    assert 0 <= q.coverage(test) <= 1
    q.save(tmp_path / "geodesic.npz")
    loaded = Quantizer.load(tmp_path / "geodesic.npz", decoder=decoder)
    np.testing.assert_array_equal(loaded.encode(test), codes)
    assert loaded.get_params() == q.get_params() and loaded.fit_info_ == q.fit_info_


def grid_quantizer_and_test(n_test: int, **config):
    """A geodesic quantizer fit on 60 images of 4×4×4 μ-grids (tokens of d=2: 32 per image), and a test split."""
    torch.manual_seed(0)
    decoder = ConvDecoder(4)
    rng = np.random.default_rng(2)
    mu = rng.standard_normal((60 + n_test, 4, 4, 4)).astype(np.float32)
    train = LatentSet.from_grids(mu[:60], np.full_like(mu[:60], -1.0), token_dim=2)
    test = LatentSet.from_grids(mu[60:], np.full_like(mu[60:], -1.0), token_dim=2)
    q = make_quantizer("geodesic", 12, decoder=decoder, k=6, max_landmarks=600, **config).fit(train)
    return q, decoder, test


def psnr_db(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    mse = ((images - reference) ** 2).reshape(len(images), -1).mean(1)
    return 10 * np.log10(1 / mse)


@pytest.mark.parametrize("rule", ["landmark_metric", "nearest_landmark"])
def test_large_splits_are_encoded_approximately_and_checked_against_the_exact_rule(rule):
    # 640 test tokens; the approximations are checked against the graph rule here
    q, decoder, test = grid_quantizer_and_test(20, exact_encode_limit=639, approx_rule=rule, paths="graph")
    codes, info = q.encode_with_info(test)
    json.dumps(info, allow_nan=False)  # the pipeline copies it into a results row
    assert info["rule"] == rule and info["tokens"] == 640
    # coverage of the test split, by brute force: nearest landmark within the median k-NN edge
    nearest = cdist(test.token_mu.astype(np.float64), q.landmarks_.points).min(1)
    assert info["landmark_coverage"] == pytest.approx((nearest <= q.fit_info_["median_knn_edge"]).mean(), abs=1e-9)
    assert 0 < info["landmark_coverage"] < 1
    # a split smaller than check_tokens is checked on all of its tokens
    assert info["check_tokens"] == 640 and info["check_images"] == 20
    exact = q.encode_tokens(test, rule="graph").reshape(20, 32)
    assert info["agreement"] == pytest.approx((codes == exact).mean())
    assert 0.3 < info["agreement"] < 1  # a real approximation, not the exact rule under another name
    sq = ((q.decode(codes) - q.decode(exact)) ** 2).sum(-1)
    assert info["latent_sq_diff"] == pytest.approx(sq.mean(), rel=1e-5)
    # every token of an image sampled: its grid with all tokens replaced, decoded, against its decoded μ-grid
    with torch.no_grad():
        def decode(grids):
            return decoder(torch.as_tensor(grids, dtype=torch.float32)).double().numpy()
        reference = decode(test.mu)
        images = {name: decode(test.layout.tokens_to_grid(q.decode(c))) for name, c in [("exact", exact), ("approx", codes)]}
    psnr_exact, psnr_approx = psnr_db(images["exact"], reference), psnr_db(images["approx"], reference)
    assert info["psnr_exact_db"] == pytest.approx(psnr_exact.mean(), abs=1e-3)
    assert info["delta_psnr_db"] == pytest.approx(psnr_approx.mean() - psnr_exact.mean(), abs=1e-3)
    differs = (codes != exact).any(1)
    assert info["differing_images"] == differs.sum()
    assert info["psnr_between_db"] == pytest.approx(psnr_db(images["approx"][differs], images["exact"][differs]).mean(),
                                                    abs=1e-3)


def test_small_splits_get_the_exact_rule_and_large_samples_are_stratified():
    q, _, test = grid_quantizer_and_test(100, exact_encode_limit=3200, paths="graph")  # 3200 test tokens
    codes, info = q.encode_with_info(test)
    assert info["rule"] == "graph" and "agreement" not in info
    np.testing.assert_array_equal(codes.ravel(), q.encode_tokens(test, rule="graph"))
    q.exact_encode_limit = 3199
    approx, info = q.encode_with_info(test)
    assert info["rule"] == "landmark_metric" and info["check_tokens"] == 2000 and info["check_images"] == 100
    np.testing.assert_array_equal(approx.ravel(), q.encode_tokens(test, rule="landmark_metric"))
    # the documented sample: 20 tokens of each image, drawn with the quantizer's seed
    sample = stratified_tokens(100, 32, 2000, np.random.default_rng(q.seed))
    assert (np.bincount(sample // 32) == 20).all()
    assert info["agreement"] == pytest.approx((approx.ravel()[sample] == codes.ravel()[sample]).mean())


def test_context_features_are_the_token_its_3x3_neighbourhood_and_its_place():
    mu = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4)
    latents = LatentSet.from_grids(mu, np.zeros_like(mu), token_dim=2)  # 18 tokens per image
    token = 18 + 2 * 0 + 1  # image 1, cell (0, 0), second group: channels 2, 3
    image, slot = np.divmod(np.array([token]), latents.tokens_per_image)
    got = context_features(latents.mu, image, latents.layout.flat_positions(slot))[0]
    window = np.zeros((3, 3, 4), dtype=np.float32)
    window[1:, 1:] = mu[1, :2, :2]  # cells (-1, ·) and (·, -1) lie outside the grid
    want = np.concatenate([mu[1, 0, 0, 2:], CONTEXT_WEIGHT * window.ravel(), POSITION_WEIGHT * np.array([0.0, 0.0])])
    np.testing.assert_allclose(got, want)
    centre = 18 + 2 * 4  # image 1, cell (1, 1), first group
    got = context_features(latents.mu, np.array([1]), latents.layout.flat_positions(np.array([8])))[0]
    want = np.concatenate([mu[1, 1, 1, :2], CONTEXT_WEIGHT * mu[1].ravel(), POSITION_WEIGHT * np.array([1.0, 1.0])])
    np.testing.assert_allclose(got, want)
    assert latents.token_mu[centre].tolist() == mu[1, 1, 1, :2].tolist()


def test_geodesic_quantizer_bad_inputs():
    latents = flat_latents(np.random.default_rng(3).standard_normal((50, 2)))
    with pytest.raises(GeovqError, match="decoder"):
        make_quantizer("geodesic", 4).fit(latents)
    with pytest.raises(GeovqError, match="quadrature"):
        make_quantizer("geodesic", 4, decoder=Cylinder(), quadrature="trapezium")
    with pytest.raises(GeovqError, match="landmarks"):
        make_quantizer("geodesic", 20, decoder=Cylinder(), max_landmarks=10).fit(latents)
    q = make_quantizer("geodesic", 4, decoder=Cylinder(), k=5).fit(latents)
    with pytest.raises(GeovqError, match="encode rule"):
        q.encode_tokens(latents, rule="nearest")
    with pytest.raises(GeovqError, match="approx_rule"):
        make_quantizer("geodesic", 4, decoder=Cylinder(), approx_rule="graph")
    with pytest.raises(GeovqError, match="check_tokens"):
        make_quantizer("geodesic", 4, decoder=Cylinder(), check_tokens=500)
    with pytest.raises(GeovqError, match="paths"):
        make_quantizer("geodesic", 4, decoder=Cylinder(), paths="mixed")
    with pytest.raises(GeovqError, match="shortlist"):
        make_quantizer("geodesic", 4, decoder=Cylinder(), paths="context", shortlist=0)


# -- wasserstein -------------------------------------------------------------------------------------------


def gaussian_latents(n_images: int, seed: int) -> LatentSet:
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n_images, 2, 2, 3)).astype(np.float32)
    logvar = rng.uniform(-3, 0.5, mu.shape).astype(np.float32)
    return LatentSet.from_grids(mu, logvar)


def test_w2_points_give_the_gaussian_w2_closed_form():
    latents = gaussian_latents(2, seed=4)
    points = w2_points(latents)
    mu, var = latents.token_mu.astype(np.float64), np.exp(latents.token_logvar.astype(np.float64))
    for a, b in [(0, 1), (2, 7), (3, 5)]:
        s1, s2 = np.diag(var[a]), np.diag(var[b])
        root = sqrtm(s2)
        w2_sq = np.sum((mu[a] - mu[b]) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(root @ s1 @ root)).real
        assert np.linalg.norm(points[a] - points[b]) == pytest.approx(np.sqrt(w2_sq), rel=1e-6)  # σ is float32


def test_wasserstein_medoids_are_swap_optimal_and_encode_to_the_nearest(tmp_path):
    train, test = gaussian_latents(30, seed=5), gaussian_latents(20, seed=6)  # 120 training tokens
    q = make_quantizer("wasserstein", 4).fit(train)
    points = w2_points(train)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    medoids = [int(np.flatnonzero((points[:, :3] == q.codebook_[c]).all(1) & (points[:, 3:] == q.sigma_[c]).all(1))[0])
               for c in range(4)]
    objective = dist[:, medoids].min(1).sum()
    assert q.fit_info_["objective"] == pytest.approx(objective, rel=1e-9)
    for i in range(4):  # no single medoid/non-medoid swap improves: real swap iterations, not one assignment
        for x in set(range(120)) - set(medoids):
            swapped = medoids[:i] + [x] + medoids[i + 1:]
            assert dist[:, swapped].min(1).sum() >= objective - 1e-9
    test_points = w2_points(test)
    want = np.linalg.norm(test_points[:, None] - points[medoids][None], axis=-1).argmin(1)
    codes = q.encode(test)
    assert (codes.ravel() == want).mean() >= 0.99  # float32 faiss ties aside
    np.testing.assert_array_equal(q.decode(codes), q.codebook_[codes])
    q.save(tmp_path / "w2.npz")
    loaded = Quantizer.load(tmp_path / "w2.npz")
    np.testing.assert_array_equal(loaded.sigma_, q.sigma_)
    np.testing.assert_array_equal(loaded.encode(test), codes)


def test_wasserstein_at_scale_never_increases_its_objective():
    latents = gaussian_latents(300, seed=7)  # 1200 tokens
    q = make_quantizer("wasserstein", 16, exact_limit=200, block_size=400, max_points=1000).fit(latents)
    objective = [t["objective"] for t in q.fit_info_["trace"]]
    assert q.fit_info_["points"] == 1000 and q.fit_info_["converged"]
    assert np.all(np.diff(objective) < 0) and len(objective) > 2


def test_in_context_rule_on_an_isometric_decoder_is_the_nearest_medoid():
    """Under the cylinder the pull-back metric is the identity, so d_i(c) = ‖c − z_i‖ in every context:
    paths="context" must assign every landmark (and encode every query) to its Euclidean-nearest medoid."""
    rng = np.random.default_rng(5)
    train = flat_latents(rng.uniform(0, 3, (500, 2)))
    test = flat_latents(rng.uniform(0, 3, (200, 2)))
    q = make_quantizer("geodesic", 10, decoder=Cylinder(), k=8, max_landmarks=500, paths="context").fit(train)
    info = q.fit_info_
    assert info["paths"] == "context" and info["context"]["rounds"][0]["round"] == 0
    codes = q.codebook_.astype(np.float64)
    landmarks = q.landmarks_.points
    nearest = cdist(landmarks, codes)
    np.testing.assert_array_equal(q.landmark_code_, nearest.argmin(1))
    np.testing.assert_allclose(q.landmark_distance_, nearest.min(1), rtol=1e-6, atol=1e-9)
    objectives = [r["objective"] for r in info["context"]["rounds"] if r.get("accepted", True)]
    assert np.all(np.diff(objectives) < 0)  # accepted rounds lower Σ_i d_i
    np.testing.assert_allclose(info["context"]["objective"], q.landmark_distance_.sum())
    assert (q.encode(test).ravel() == cdist(test.token_mu, codes).argmin(1)).all()
    assert q.rule_for(test) == "context"
    graph = make_quantizer("geodesic", 10, decoder=Cylinder(), k=8, paths="graph", max_landmarks=500).fit(train)
    assert graph.fit_info_["paths"] == "graph" and "context" not in graph.fit_info_


def test_in_context_codes_are_the_nearest_refined_curves_and_survive_saving(tmp_path):
    """With a shortlist of all K codes, the pruned rule equals the argmin of every code's refined curve."""
    from geovq.geometry import GridTokenDecoder, refine_curves, straight_curves

    q, decoder, test = grid_quantizer_and_test(2, shortlist=12, paths="context", context_iterations=1)
    tokens = np.arange(0, 64, 4)
    codes = q.encode_tokens(test, tokens, rule="context")
    queries = GridTokenDecoder.from_latents(decoder, test, tokens)
    rows = np.repeat(np.arange(len(tokens)), 12)
    curves = straight_curves(queries.points[rows], np.tile(q.codebook_.astype(np.float64), (len(tokens), 1)))
    lengths = refine_curves(curves, [(queries, rows)], bounds=q._box()).lengths.reshape(len(tokens), 12)
    picked = lengths[np.arange(len(tokens)), codes]
    np.testing.assert_allclose(picked, lengths.min(1), rtol=2e-3)  # ties within the curves' tolerance aside
    q.save(tmp_path / "context.npz")
    loaded = Quantizer.load(tmp_path / "context.npz", decoder=decoder)
    assert loaded.paths == "context"
    np.testing.assert_array_equal(loaded.encode_tokens(test, tokens), codes)


@pytest.mark.parametrize("paths", ["graph", "context"])
def test_encode_in_chunks_gives_the_same_codes_and_logs_its_progress(paths, monkeypatch, caplog):
    import geovq.quantize.base as base
    import geovq.quantize.geodesic as geodesic

    q, _, test = grid_quantizer_and_test(3, paths=paths)  # 96 test tokens
    whole = q.encode(test)
    monkeypatch.setattr(geodesic, "ENCODE_CHUNK", 40)
    monkeypatch.setattr(base, "PROGRESS_LOG_SECONDS", -1.0)  # a line after every chunk
    with caplog.at_level("INFO", logger="geovq"):
        np.testing.assert_array_equal(q.encode(test), whole)
    lines = [r.getMessage() for r in caplog.records if "encode:" in r.getMessage()]
    assert [int(line.split()[3]) for line in lines] == [40, 80, 96]
    assert all(line.startswith(f"geodesic {q.exact_rule} encode: ") and " of 96 tokens" in line for line in lines)


def own_metrics(decoder, latents: LatentSet) -> np.ndarray:
    """(n, d, d) each token's metric J_iᵀJ_i in its own image, from the decoder's full Jacobian by autograd (an
    implementation independent of the probes and of the engine's tangent passes)."""
    out = []
    for image in latents.mu:
        grid = torch.as_tensor(image[None], dtype=torch.float32)
        jac = torch.autograd.functional.jacobian(lambda g: decoder(g).reshape(-1), grid)
        jac = jac.reshape(jac.shape[0], -1).double().numpy()  # (P, h·w·C)
        for cols in latents.layout.flat_positions(np.arange(latents.tokens_per_image)):
            out.append(jac[:, cols].T @ jac[:, cols])
    return np.stack(out)


def test_the_probed_in_context_rule_keeps_a_first_order_code_only_where_its_margin_holds():
    """context_probed with a full frame of probes (each token's exact metric): a token it keeps has the nearest
    code under its own metric, with every other code more than `margin` times farther at first order; the other
    tokens are settled by curves among the codes left, and get the exact rule's code. With margin = inf every
    token is settled so, among its `shortlist` cheapest codes, as the exact rule "context" settles it."""
    from geovq.nearest import metric_costs

    q, decoder, test = grid_quantizer_and_test(6, paths="context", probes=100_000, margin=1.2)
    calls = []  # the tokens the rule leaves to curves
    settle = q._settle_by_curves
    q._settle_by_curves = lambda latents, tokens, *rest: (calls.append(tokens.copy()), settle(latents, tokens, *rest))[1]
    codes = q.encode_tokens(test, rule="context_probed")
    q._settle_by_curves = settle
    sent = np.concatenate(calls)
    kept = np.setdiff1d(np.arange(test.n_tokens), sent)
    assert 0 < len(sent) < test.n_tokens  # the margin decides some tokens, curves the others
    costs = metric_costs(test.token_mu.astype(np.float64), own_metrics(decoder, test), q.codebook_)
    ordered = np.sort(costs, axis=1)
    np.testing.assert_array_equal(codes[kept], costs[kept].argmin(1))
    assert (np.sqrt(ordered[kept, 1] / ordered[kept, 0]) > 1.2).all()
    exact = q.encode_tokens(test, rule="context")
    np.testing.assert_array_equal(codes[sent], exact[sent])
    assert (np.sqrt(ordered[:, 1] / ordered[:, 0]) <= 1.2)[sent].any()  # the rule sent tokens it had to
    q.margin = np.inf
    np.testing.assert_array_equal(q.encode_tokens(test, rule="context_probed"), exact)
    assert q.encode_stats()["curve_tokens"] == test.n_tokens


def test_a_large_split_gets_the_probed_in_context_rule_its_figures_and_the_same_codes_in_shards():
    q, _, test = grid_quantizer_and_test(8, paths="context", probes=8, exact_encode_limit=100)  # 256 test tokens
    codes, info = q.encode_with_info(test)
    assert info["rule"] == "context_probed" and info["probes"] == 8 and info["margin"] == 1.2
    assert 0 < info["curve_fraction"] < 1 and info["encode_forward_equivalents_per_token"] > 0
    exact = q.encode_tokens(test, rule="context").reshape(codes.shape)
    assert info["agreement"] == pytest.approx((codes == exact).mean())  # a split this small is all checked
    # two shards, each image probed by its index in the split: the split's codes
    halves = [np.arange(0, 3), np.arange(3, 8)]
    shards = [q.encode(replace(test.subset(images), split_images=8)) for images in halves]
    np.testing.assert_array_equal(np.concatenate(shards), codes)
    q.probed_encode_limit = 255  # auto: a split above it gets the first-order rule, without any decoder call
    assert q.encode_with_info(test)[1]["rule"] == "landmark_metric"
    q.probed_encode_limit, q.probes = 256, 64  # and so do images with no more metric directions (32 × 2) than probes
    assert q.rule_for(test) == "landmark_metric"
    q.probes = 63
    assert q.rule_for(test) == "context_probed"


@pytest.mark.parametrize("params, message", [
    ({"paths": "graph", "approx_rule": "context_probed"}, "needs paths='context'"),
    ({"probes": 0}, "probes >= 1, margin >= 1 and probed_encode_limit >= 0; got probes=0"),
    ({"probed_encode_limit": -1}, "probed_encode_limit=-1"),
    ({"margin": 0.9}, "margin=0.9"),
    ({"margin": float("nan")}, "margin=nan"),
])
def test_bad_probed_rule_settings_are_one_line(params, message):
    with pytest.raises(GeovqError, match=message):
        make_quantizer("geodesic", 4, decoder=ConvDecoder(4), **params)
