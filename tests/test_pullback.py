"""Pull-back k-means (`pullback`): closed-form centres, the k-means limit, monotone objective, per-token metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import exact_nearest, metric_costs
from geovq.quantize import Quantizer, make_quantizer
from geovq.quantize.pullback import metric_centres, pullback_lloyd
from toy_decoders import ConvDecoder

torch.set_num_threads(1)


class IdentityDecoder(nn.Module):
    """The μ-grid itself: every token's Jacobian selects its own channels, so G_i = I exactly."""

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return grids.reshape(grids.shape[0], -1) * 1.0


class ContextGate(nn.Module):
    """1×2 grids of 2-channel tokens (a, b) -> (s(b) ⊙ a, b), s(u) = (1 + 9σ(4u₀), 1 + 9σ(−4u₀)): token a's
    metric is diag(s(b)²), so its context b decides which of a's directions the decoder sees."""

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        a, b = grids[:, 0, 0], grids[:, 0, 1]  # (B, 2) each
        gate = 1 + 9 * torch.sigmoid(torch.stack([4 * b[:, 0], -4 * b[:, 0]], dim=1))
        return torch.cat([gate * a, b], dim=1)


def grid_latents(mu: np.ndarray, token_dim: int | None = None) -> LatentSet:
    mu = mu.astype(np.float32)
    return LatentSet.from_grids(mu, np.full_like(mu, -1.0), token_dim=token_dim)


def random_metrics(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d, d) positive definite metrics of varied shape and scale."""
    b = rng.standard_normal((n, d, d)) * rng.uniform(0.2, 3.0, (n, 1, 1))
    return b @ b.transpose(0, 2, 1) + 0.05 * np.eye(d)


def brute_force_codes(points, metrics, codebook) -> tuple[np.ndarray, np.ndarray]:
    """argmin_k (c_k − z_i)ᵀ G_i (c_k − z_i) and its value, token by token."""
    delta = codebook[None].astype(np.float64) - points[:, None].astype(np.float64)  # (n, K, d)
    cost = np.einsum("nki,nij,nkj->nk", delta, metrics, delta)
    return cost.argmin(1), cost.min(1)


def token_metrics_by_autograd(decoder: nn.Module, latents: LatentSet) -> np.ndarray:
    """G_i = J_iᵀJ_i of every token in its own image, by torch.autograd (independent of the engine)."""
    flat = latents.mu.reshape(latents.n_images, -1).astype(np.float64)
    out = []
    for token in range(latents.n_tokens):
        image, slot = divmod(token, latents.tokens_per_image)
        channels = latents.layout.flat_positions(np.array([slot]))[0]

        def f(z, image=image, channels=channels):
            grid = torch.as_tensor(flat[image]).clone()
            grid[channels] = z
            return decoder(grid.float().reshape(1, *latents.mu.shape[1:])).reshape(-1).double()

        jac = torch.autograd.functional.jacobian(f, torch.as_tensor(flat[image, channels]))
        out.append((jac.T @ jac).numpy())
    return np.stack(out)


# -- the closed form and the iterations ------------------------------------------------------------
def test_metric_costs_are_each_points_quadratic_form_and_squared_distances_under_the_identity():
    rng = np.random.default_rng(11)
    points, codes = rng.standard_normal((300, 5)), rng.standard_normal((40, 5))
    a = rng.standard_normal((300, 5, 5))
    metrics = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(5)  # SPD, one per point
    delta = codes[None] - points[:, None]  # (n, K, d), by the difference: no cancellation
    direct = np.einsum("nkd,nde,nke->nk", delta, metrics, delta)
    costs = metric_costs(points, metrics, codes)
    np.testing.assert_allclose(costs, direct, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(costs.argmin(1), direct.argmin(1))
    squared, ids = exact_nearest(codes, points, k=1)  # G = I: the Euclidean nearest code and its distance²
    identity = metric_costs(points, np.broadcast_to(np.eye(5), (300, 5, 5)).copy(), codes)
    np.testing.assert_array_equal(identity.argmin(1), ids[:, 0])
    np.testing.assert_allclose(identity.min(1), squared[:, 0], rtol=1e-5)


def test_closed_form_centre_is_the_numerical_minimiser():
    rng = np.random.default_rng(0)
    d, n = 3, 40
    points, metrics = rng.standard_normal((n, d)), random_metrics(rng, n, d)
    labels = rng.integers(0, 3, n)
    centres, regularised, fallback, _, _ = metric_centres(points, metrics, labels, 4, ridge=1e-6)
    assert not regularised.any() and not fallback.any()
    assert np.isnan(centres[3]).all()  # no members
    for k in range(3):
        members = labels == k

        def objective(c):
            delta = c - points[members]
            return np.einsum("ni,nij,nj->", delta, metrics[members], delta)

        best = minimize(objective, points[members].mean(0), method="BFGS", options={"gtol": 1e-10})
        np.testing.assert_allclose(centres[k], best.x, atol=1e-6)
        assert objective(centres[k]) <= best.fun + 1e-9
        # and it is not the Euclidean mean: the metric matters
        assert np.abs(centres[k] - points[members].mean(0)).max() > 1e-2


def test_near_singular_summed_metrics_are_pulled_to_the_euclidean_mean_and_counted():
    rng = np.random.default_rng(1)
    n = 30
    points = rng.standard_normal((n, 2))
    g = rng.uniform(0.5, 2.0, n)
    metrics = np.zeros((n, 2, 2))
    metrics[:, 0, 0] = g  # the decoder sees only the first coordinate
    labels = np.zeros(n, dtype=np.int64)
    labels[20:] = 1
    metrics[20:] = 0.0  # cluster 1: the decoder ignores its members entirely
    ridge = 1e-6
    centres, regularised, fallback, _, _ = metric_centres(points, metrics, labels, 2, ridge=ridge)
    assert regularised.tolist() == [True, False] and fallback.tolist() == [False, True]
    first = slice(0, 20)
    lam = ridge * g[first].sum() / 2
    # the minimiser of Σ (c−z)ᵀG(c−z) + λ‖c − mean‖²: metric-weighted where the metric sees, mean elsewhere
    mean = points[first].mean(0)
    want_x = ((g[first] * points[first, 0]).sum() + lam * mean[0]) / (g[first].sum() + lam)
    np.testing.assert_allclose(centres[0], [want_x, mean[1]], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(centres[1], points[20:].mean(0), rtol=1e-12)


def test_objective_never_increases_and_is_the_exact_assignment_cost():
    rng = np.random.default_rng(2)
    n, d, k = 400, 3, 12
    points = rng.standard_normal((n, d)) * rng.uniform(0.5, 2, (1, d))
    metrics = random_metrics(rng, n, d)
    start = points[rng.choice(n, k, replace=False)] + 0.5
    start[0] = 50.0  # far from every token: empty after the first assignment, so it is re-seeded
    result = pullback_lloyd(points, metrics, start, max_iter=200, tol=0.0)
    objectives = [row["objective"] for row in result.trace]
    assert len(objectives) > 3 and np.all(np.diff(objectives) < 0)
    assert result.converged and result.reseeded >= 1 and result.trace[1]["reseeded"] >= 1
    labels, best = brute_force_codes(points, metrics, result.centres)
    np.testing.assert_array_equal(result.labels, labels)
    assert result.objective == pytest.approx(best.sum(), rel=1e-12)
    # at convergence, the centres are the closed forms of their clusters (or kept: never worse)
    centres, *_ = metric_centres(points, metrics, result.labels, k, ridge=1e-6)
    full = ~np.isnan(centres[:, 0])
    np.testing.assert_allclose(result.centres[full], centres[full], atol=1e-5)


# -- the quantizer ------------------------------------------------------------------------------------
def test_identity_metric_reproduces_kmeans_exactly():
    """G_i = I: the same start as the kmeans quantizer, then Lloyd's iterations to k-means' fixed point."""
    rng = np.random.default_rng(3)
    blobs = rng.standard_normal((8, 2)) * 4  # 8 clusters of 2-d tokens, some of them close
    tokens = blobs[rng.integers(0, 8, 60 * 8)] + 0.3 * rng.standard_normal((60 * 8, 2))
    mu = tokens.reshape(60, 2, 2, 4)  # 2×2×4 grids, tokens of d=2: 8 per image
    train, test = grid_latents(mu[:40], 2), grid_latents(mu[40:], 2)
    q = make_quantizer("pullback", 8, seed=5, decoder=IdentityDecoder()).fit(train)
    assert q.fit_info_["tokens"] == train.n_tokens  # all of them: the same points as k-means
    kmeans = make_quantizer("kmeans", 8, seed=5).fit(train)
    np.testing.assert_array_equal(q.kmeans_codebook_, kmeans.codebook_)  # same start
    # scikit-learn stopped on its centre-shift tolerance here; run to convergence it is the same as pullback
    assert q.fit_info_["iterations"] > 0
    converged = make_quantizer("kmeans", 8, seed=5, tol=0.0).fit(train)
    np.testing.assert_allclose(q.codebook_, converged.codebook_, rtol=0, atol=1e-6)
    assert q.fit_info_["objective"] == pytest.approx(converged.fit_info_["inertia"], rel=1e-5)
    for split in (train, test):
        np.testing.assert_array_equal(q.encode(split), converged.encode(split))
    # from k-means' fixed point no step lowers the objective, so none is taken: the codebook stays exactly
    blobs = np.array([[0, 0], [0, 20], [20, 0], [20, 20], [40, 0], [40, 20], [0, 40], [20, 40]])  # far apart
    tokens = blobs[np.arange(480) % 8] + 0.3 * rng.standard_normal((480, 2))
    train = grid_latents(tokens.reshape(60, 2, 2, 4), 2)
    kmeans = make_quantizer("kmeans", 8, seed=5).fit(train)
    q = make_quantizer("pullback", 8, seed=5, decoder=IdentityDecoder()).fit(train)
    assert q.fit_info_["iterations"] == 0 and q.fit_info_["converged"]
    np.testing.assert_array_equal(q.codebook_, kmeans.codebook_)
    assert q.fit_info_["objective"] == pytest.approx(q.fit_info_["objective_kmeans"], rel=1e-12)
    np.testing.assert_array_equal(q.encode(train), kmeans.encode(train))


def test_each_token_follows_its_own_metric_in_its_own_context():
    rng = np.random.default_rng(4)
    decoder = ContextGate()
    train = grid_latents(rng.standard_normal((150, 1, 2, 2)))
    test = grid_latents(rng.standard_normal((30, 1, 2, 2)))
    q = make_quantizer("pullback", 6, decoder=decoder, max_tokens=200).fit(train)
    info = q.fit_info_
    assert info["tokens"] == 200 and info["images"] == 150  # stratified: every image gives 1 or 2
    assert np.all(np.diff([row["objective"] for row in info["trace"]]) < 0)
    assert info["objective"] < info["objective_kmeans"]
    # every test token's code is the argmin of its own metric, taken by autograd in its own image
    metrics = token_metrics_by_autograd(decoder, test)
    points = test.token_mu.astype(np.float64)
    want, _ = brute_force_codes(points, metrics, q.codebook_)
    codes = q.encode(test).ravel()
    np.testing.assert_array_equal(codes, want)
    euclidean, _ = brute_force_codes(points, np.broadcast_to(np.eye(2), metrics.shape), q.codebook_)
    assert (codes != euclidean).mean() > 0.1  # the two rules really disagree here
    # one token, the same μ in two images: the context alone decides its code
    q.codebook_ = np.array([[1, 0], [0, 1.5], [9, 9], [-9, 9], [9, -9], [-9, -9]], dtype=np.float32)
    mu = np.zeros((2, 1, 2, 2))
    mu[0, 0, 1] = [3, 0]  # context of image 0 makes the decoder see the first coordinate: G ≈ diag(100, 1)
    mu[1, 0, 1] = [-3, 0]  # ... and of image 1 the second: G ≈ diag(1, 100)
    codes = q.encode(grid_latents(mu))
    assert codes[0, 0] == 1 and codes[1, 0] == 0  # while the Euclidean-nearest code is 0 for both


def test_rerank_over_every_code_takes_the_true_in_context_decode_error():
    torch.manual_seed(0)
    decoder = ConvDecoder(4)
    rng = np.random.default_rng(5)
    mu = 1.5 * rng.standard_normal((36, 3, 3, 4))
    train, test = grid_latents(mu[:30], 2), grid_latents(mu[30:], 2)  # grouped: 18 tokens of d=2 per image
    q = make_quantizer("pullback", 8, decoder=decoder, max_tokens=300, rerank=8).fit(train)
    codes, info = q.encode_with_info(test)
    json.dumps(info, allow_nan=False)  # the pipeline copies it into a results row
    assert info["tokens"] == test.n_tokens and info["forward_seconds_per_image"] > 0
    assert info["encode_forward_equivalents_per_token"] > 0
    # brute force: each test image decoded with one token replaced by each code, against the image as is
    with torch.no_grad():
        reference = decoder(torch.as_tensor(test.mu)).reshape(len(test.mu), -1).double().numpy()
        errors = np.empty((test.n_tokens, 8))
        for token in range(test.n_tokens):
            image, slot = divmod(token, test.tokens_per_image)
            channels = test.layout.flat_positions(np.array([slot]))[0]
            grids = np.repeat(test.mu[image].reshape(1, -1), 8, axis=0)
            grids[:, channels] = q.codebook_
            out = decoder(torch.as_tensor(grids.reshape(8, *test.mu.shape[1:]))).reshape(8, -1).double().numpy()
            errors[token] = ((out - reference[image]) ** 2).sum(1)
    np.testing.assert_array_equal(codes.ravel(), errors.argmin(1))
    linearised = make_quantizer("pullback", 8, decoder=decoder)
    linearised.layout_, linearised.codebook_ = q.layout_, q.codebook_
    plain = linearised.encode(test).ravel()
    assert info["rerank_changed"] == (plain != codes.ravel()).sum() > 0  # a nonlinear decoder: some change
    assert info["rerank_sq_error"] == pytest.approx(errors.min(1).mean(), rel=1e-5)
    assert info["rerank_sq_error_linearised"] == pytest.approx(errors[np.arange(len(plain)), plain].mean(), rel=1e-5)


def test_save_load_encode_gives_identical_codes(tmp_path):
    torch.manual_seed(1)
    decoder = ConvDecoder(4)
    rng = np.random.default_rng(6)
    mu = rng.standard_normal((30, 3, 3, 4))
    train, test = grid_latents(mu[:24], 2), grid_latents(mu[24:], 2)
    q = make_quantizer("pullback", 10, seed=3, decoder=decoder, max_tokens=250).fit(train)
    codes = q.encode(test)
    q.save(tmp_path / "pullback.npz")
    loaded = Quantizer.load(tmp_path / "pullback.npz", decoder=decoder)
    np.testing.assert_array_equal(loaded.encode(test), codes)
    assert loaded.get_params() == q.get_params() and loaded.fit_info_ == q.fit_info_
    np.testing.assert_array_equal(loaded.kmeans_codebook_, q.kmeans_codebook_)
    assert q.decode(codes).shape == (6, 18, 2)


def test_exact_encode_in_chunks_gives_the_same_codes_and_logs_its_progress(monkeypatch, caplog):
    import geovq.quantize.base as base
    import geovq.quantize.pullback as pullback

    torch.manual_seed(1)
    decoder = ConvDecoder(4)
    mu = np.random.default_rng(6).standard_normal((30, 3, 3, 4))
    train, test = grid_latents(mu[:24], 2), grid_latents(mu[24:], 2)  # test: 6 images × 18 tokens
    q = make_quantizer("pullback", 10, seed=3, decoder=decoder, max_tokens=250).fit(train)
    whole = q.encode(test)
    monkeypatch.setattr(pullback, "ENCODE_CHUNK", 20)
    monkeypatch.setattr(base, "PROGRESS_LOG_SECONDS", -1.0)  # a line after every chunk
    with caplog.at_level("INFO", logger="geovq"):
        np.testing.assert_array_equal(q.encode(test), whole)
    done = [int(r.getMessage().split()[3]) for r in caplog.records if "pullback exact encode" in r.getMessage()]
    assert done == [20, 40, 60, 80, 100, 108]
    assert all(" of 108 tokens" in r.getMessage() for r in caplog.records if "exact encode" in r.getMessage())



def test_large_splits_borrow_metrics_and_are_measured_against_the_exact_rule(tmp_path):
    torch.manual_seed(1)
    decoder = ConvDecoder(4)
    rng = np.random.default_rng(7)
    mu = rng.standard_normal((60, 3, 3, 4))
    train, test = grid_latents(mu[:40], 2), grid_latents(mu[40:], 2)  # test: 20 images × 18 tokens
    q = make_quantizer("pullback", 10, seed=3, decoder=decoder, max_tokens=500, exact_encode_limit=359,
                       check_tokens=360).fit(train)
    codes, info = q.encode_with_info(test)
    assert info["rule"] == "borrowed" and info["check_tokens"] == 360  # every token checked: the split is small
    exact = make_quantizer("pullback", 10, seed=3, decoder=decoder, max_tokens=500).fit(train)
    exact_codes, exact_info = exact.encode_with_info(test)
    assert exact_info["rule"] == "exact"
    np.testing.assert_array_equal(exact.codebook_, q.codebook_)  # the rule changes encoding only
    assert info["agreement"] == pytest.approx((codes == exact_codes).mean())
    assert 0.3 < info["agreement"] < 1  # an approximation, and a useful one
    assert info["linearised_error_exact"] <= info["linearised_error_borrowed"]  # exact minimises it per token
    q.save(tmp_path / "q.npz")  # the borrowing pool travels with the quantizer
    loaded = Quantizer.load(tmp_path / "q.npz", decoder=decoder)
    np.testing.assert_array_equal(loaded.encode(test), codes)


# -- bad input ----------------------------------------------------------------------------------------
class SqrtDecoder(nn.Module):
    """sqrt|z|: finite values, but no finite derivative where a channel is 0."""

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(grids.abs()).reshape(grids.shape[0], -1)


def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(7)
    latents = grid_latents(rng.standard_normal((10, 2, 2, 2)) + 3)  # 40 tokens of d=2
    decoder = ConvDecoder(2)
    with pytest.raises(GeovqError, match="exceeds the 40 training tokens"):
        make_quantizer("pullback", 41, decoder=decoder).fit(latents)
    with pytest.raises(GeovqError, match="max_tokens=20 .*raise max_tokens to at least 30"):
        make_quantizer("pullback", 30, decoder=decoder, max_tokens=20).fit(latents)
    with pytest.raises(GeovqError, match="needs decoder="):
        make_quantizer("pullback", 4).fit(latents)
    for bad in ({"max_tokens": 1}, {"ridge": 0.0}, {"tol": -1.0}, {"rerank": 1}, {"chunk_elements": 0}):
        with pytest.raises(GeovqError):
            make_quantizer("pullback", 4, **bad)
    mu = latents.mu.copy()
    mu[7, 1, 0] = 0.0  # a token of image 7 where sqrt|z| has no finite derivative (the engine probes tokens
    # 0 and 1 only); forward mode gives 0/0 there for every tangent of image 7, so its 4 tokens are reported
    with pytest.raises(GeovqError, match=r"Jacobian is NaN or inf at 4 of 40 tokens \(first: token 28\)"):
        make_quantizer("pullback", 4, decoder=SqrtDecoder()).fit(grid_latents(mu))
    q = make_quantizer("pullback", 4, decoder=SqrtDecoder()).fit(latents)
    with pytest.raises(GeovqError, match="NaN or inf"):
        q.encode(grid_latents(mu))


# -- the probed rule (issue 26) --------------------------------------------------------------------------
def probed_setup(channels: int, grid: int, n_codes: int, seed: int = 8):
    torch.manual_seed(seed)
    decoder = ConvDecoder(channels)
    mu = np.random.default_rng(seed).standard_normal((40, grid, grid, channels))
    train, test = grid_latents(mu[:30]), grid_latents(mu[30:])
    return decoder, make_quantizer("pullback", n_codes, seed=3, decoder=decoder, max_tokens=400).fit(train), test


def test_a_full_frame_of_output_probes_gives_every_tokens_exact_metric_and_codes():
    from geovq.geometry.probes import image_probes

    decoder, q, test = probed_setup(4, 3, 10)  # 9 tokens of d = 4 per image, 6×6 = 36 output values
    grads = image_probes(decoder, test.mu.astype(np.float64), 36, seed=0)  # s = P: the identity frame
    assert grads.shape == (10, 36, 3, 3, 4)
    per_token = grads.reshape(10, 36, 9, 4).transpose(0, 2, 1, 3).reshape(90, 36, 4)
    metrics = token_metrics_by_autograd(decoder, test)  # independent: torch.autograd, token by token
    np.testing.assert_allclose(np.einsum("nsi,nsj->nij", per_token, per_token), metrics, rtol=1e-4, atol=1e-9)
    q.probes = 0
    exact = q.encode(test).ravel()
    q.probes = 36
    np.testing.assert_array_equal(q.encode_probed(test), exact)


def test_the_probed_rule_settles_unsure_tokens_exactly_and_reports_its_agreement():
    decoder, q, test = probed_setup(8, 4, 12)  # 16 tokens of d = 8 per image: 128 tangent passes, P = 64
    q.probes, q.check_tokens = 32, test.n_tokens
    assert q.rule_for(test) == "probed"  # 32 probes + as many exact passes < 128
    q.probes = 0
    exact = q.encode(test).ravel()
    q.probes = 32
    codes, info = q.encode_with_info(test)
    json.dumps(info, allow_nan=False)
    assert info["rule"] == "probed" and info["probes"] == 32 and info["check_tokens"] == test.n_tokens
    assert info["agreement"] == pytest.approx((codes.ravel() == exact).mean())
    assert 0 < info["unsure_fraction"] < 1 and info["verify_passes_per_token"] >= info["unsure_fraction"]
    assert info["encode_forward_equivalents_per_token"] > 0
    # no confidence test: the probes' estimate alone, which 32 probes of 64 outputs often get wrong here (a random
    # decoder's metrics are nearly isotropic: many near-ties)
    q.confidence = 0.0
    estimate = q.encode_probed(test)
    assert q._encode_stats["unsure"] == 0 and (estimate != exact).mean() > 0.05
    # every code unsure (K = 12 <= the shortlist): each token's code is settled by its exact costs alone
    q.confidence = float("inf")
    np.testing.assert_array_equal(q.encode_probed(test), exact)
    assert q._encode_stats["unsure"] == test.n_tokens
    # the default confidence agrees at least as well as the bare estimate
    q.confidence = 2.0
    assert (q.encode_probed(test) == exact).mean() >= max(info["agreement"] - 1e-9, (estimate == exact).mean())


def test_encode_alone_makes_the_codes_without_the_records_checks(monkeypatch):
    """`encode` (what `geovq compress` calls) gives encode_with_info's codes without measuring the rule against the
    exact one: that check costs 2,000 tokens' exact metrics, more than the codes of a few images."""
    decoder, q, test = probed_setup(8, 4, 12)
    q.probes = 32
    codes, info = q.encode_with_info(test)
    assert "agreement" in info
    monkeypatch.setattr(type(q), "_check_against_exact", lambda *a: pytest.fail("encode ran the check"))
    np.testing.assert_array_equal(q.encode(test), codes)


def test_the_probed_rule_refuses_bad_input():
    decoder, q, test = probed_setup(8, 4, 12)
    q.probes = 8
    with pytest.raises(GeovqError, match="empty split"):
        q.encode_probed(test.subset(np.array([], dtype=np.int64)))
    mu = test.mu.copy()
    mu[3, 1, 2] = 0.0
    q.decoder = lambda grids: torch.sqrt(grids.abs()).reshape(grids.shape[0], -1)  # no derivative at 0
    with pytest.raises(GeovqError, match=r"NaN or inf in images 0\.\.9"):
        q.encode_probed(grid_latents(mu))
    for bad, message in (({"probes": -1}, "probes >= 0"), ({"confidence": -1.0}, "probes >= 0"),
                         ({"confidence": float("nan")}, "confidence=nan must be a number")):
        with pytest.raises(GeovqError, match=message):
            make_quantizer("pullback", 4, **bad)
