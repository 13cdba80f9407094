"""Gaussian Quant: the Sobol-Gaussian codebook and the β selection rule against scipy's own densities."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.quantize import Quantizer, make_quantizer
from geovq.quantize.gq import GaussianQuant, gq_select, sobol_gaussian_codebook

torch.set_num_threads(1)


def random_latents(n_images: int, channels: int, token_dim: int, grouping: str = "interleaved",
                   seed: int = 0) -> LatentSet:
    """2×2 grids whose σ² spans (e^-4, e^1): some scalars lie past σ² = 1/β for β = 0.5 and 1."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 1.5, size=(n_images, 2, 2, channels))
    logvar = rng.uniform(-4.0, 1.0, size=mu.shape)
    return LatentSet.from_grids(mu, logvar, token_dim=token_dim, grouping=grouping)


def test_codebook_is_deterministic_in_k_d_seed():
    a = sobol_gaussian_codebook(256, 3, seed=7)
    assert a.shape == (256, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, sobol_gaussian_codebook(256, 3, seed=7))
    assert not np.array_equal(a, sobol_gaussian_codebook(256, 3, seed=8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codebook_moments_match_standard_normal(seed):
    # For K = 4096 i.i.d. N(0, 1) draws the standard errors are 0.016 (mean), 0.022 (variance) and 0.016
    # (covariance); the tolerances below are 3-8x tighter, so only a balanced (Sobol) codebook passes.
    c = sobol_gaussian_codebook(4096, 6, seed)
    cov = np.cov(c.T, bias=True)
    assert np.abs(c.mean(0)).max() < 2e-3
    assert np.abs(np.diag(cov) - 1.0).max() < 5e-3
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 5e-3


def test_codebook_marginals_are_stratified():
    # Sobol balance: in every coordinate, each of the K equal-probability slices of N(0, 1) holds one codeword.
    k = 1024
    slices = np.floor(norm.cdf(sobol_gaussian_codebook(k, 4, seed=3)) * k).astype(int)
    for column in slices.T:
        np.testing.assert_array_equal(np.sort(column), np.arange(k))


@pytest.mark.parametrize("token_dim", [1, 2, 4])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_selection_matches_scipy_log_density_argmax(beta, token_dim):
    latents = random_latents(150, channels=4, token_dim=token_dim)
    q = GaussianQuant(64, seed=1, beta=beta).fit(latents)
    codes = q.encode(latents)
    # The rule as a log-density ratio: argmax_k Σ log N(c_k; μ, σ²) − β Σ log N(c_k; 0, 1).
    c = q.codebook_.astype(np.float64)[None]  # (1, K, d)
    mu, sigma = latents.token_mu[:, None], latents.token_sigma.astype(np.float64)[:, None]  # (N, 1, d)
    score = norm.logpdf(c, mu, sigma).sum(-1) - beta * norm.logpdf(c).sum(-1)
    expected = score.argmax(1).reshape(latents.n_images, latents.tokens_per_image)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(q.decode(codes), q.codebook_[expected])


def test_beta_changes_the_choice():
    # Guard against a rule that ignores β: the importance-weight rule pulls codes towards the prior's bulk.
    latents = random_latents(150, channels=4, token_dim=2)
    near = GaussianQuant(64, beta=0.0).fit(latents).encode(latents)
    weighted = GaussianQuant(64, beta=1.0).fit(latents).encode(latents)
    assert 0.05 < (near != weighted).mean() < 0.95


def test_chunked_selection_equals_one_block_at_k_2_16():
    rng = np.random.default_rng(0)
    codebook = sobol_gaussian_codebook(2**16, 2, seed=0)
    mu, logvar = rng.normal(size=(300, 2)), rng.uniform(-5, 0, size=(300, 2))
    one_block = gq_select(codebook, mu, logvar, beta=1.0, chunk_tokens=300)
    np.testing.assert_array_equal(gq_select(codebook, mu, logvar, beta=1.0, chunk_tokens=7), one_block)
    np.testing.assert_array_equal(gq_select(codebook, mu, logvar, beta=1.0), one_block)  # default budget


def test_fit_info_rate_diagnostics():
    latents = random_latents(100, channels=4, token_dim=2)
    q = GaussianQuant(256, beta=0.5).fit(latents)
    kl_bits = 0.5 * (latents.token_mu**2 + np.exp(latents.token_logvar) - 1 - latents.token_logvar).sum(1) / np.log(2)
    assert q.fit_info_["log2_codes"] == 8.0
    assert q.fit_info_["mean_token_kl_bits"] == pytest.approx(kl_bits.mean(), rel=1e-6)
    assert q.fit_info_["rate_gap_bits"] == pytest.approx(8.0 - kl_bits.mean(), rel=1e-6)
    frac = (np.exp(latents.token_logvar.astype(np.float64)) >= 2.0).mean()  # σ² >= 1/β
    assert 0 < frac < 1 and q.fit_info_["frac_scalars_sigma2_ge_1_over_beta"] == pytest.approx(frac)
    assert GaussianQuant(256, beta=0.0).fit(latents).fit_info_["frac_scalars_sigma2_ge_1_over_beta"] == 0.0


@pytest.mark.parametrize("bad_k, valid", [(100, "64 or 128"), (3, "2 or 4"), (1000, "512 or 1024")])
def test_k_not_power_of_two_is_rejected(bad_k, valid):
    with pytest.raises(GeovqError, match=f"K={bad_k}.*{valid}"):
        GaussianQuant(bad_k).validate()  # scikit-learn style: the constructor only stores its arguments


@pytest.mark.parametrize("beta", [-0.1, float("nan")])
def test_negative_beta_is_rejected(beta):
    with pytest.raises(GeovqError, match="beta"):
        GaussianQuant(64, beta=beta).validate()
    with pytest.raises(GeovqError, match="beta"):
        gq_select(np.zeros((4, 1)), np.zeros((2, 1)), np.zeros((2, 1)), beta=beta)


def test_save_load_round_trip(tmp_path):
    latents = random_latents(50, channels=4, token_dim=2, grouping="contiguous")
    q = make_quantizer("gq", 128, seed=3, beta=0.5).fit(latents)
    q.save(tmp_path / "gq.npz")
    loaded = Quantizer.load(tmp_path / "gq.npz")
    assert isinstance(loaded, GaussianQuant) and loaded.beta == 0.5 and loaded.seed == 3
    assert loaded.fit_info_ == q.fit_info_ and loaded.layout_ == q.layout_
    np.testing.assert_array_equal(loaded.codebook_, q.codebook_)
    np.testing.assert_array_equal(loaded.encode(latents), q.encode(latents))


def test_load_rejects_a_codebook_that_does_not_regenerate(tmp_path):
    latents = random_latents(50, channels=4, token_dim=2)
    q = GaussianQuant(128, seed=3).fit(latents)
    q.codebook_ = q.codebook_ + np.float32(1e-3)  # what another Sobol scrambling would look like
    q.save(tmp_path / "gq.npz")
    with pytest.raises(GeovqError, match="regenerates"):
        Quantizer.load(tmp_path / "gq.npz")
