"""Gaussian Quant (GQ): a training-free codebook of prior samples and the β selection rule (DESIGN.md §3.5).

The codebook is K points of N(0, I_d): scrambled Sobol points pushed through the inverse normal CDF, so
its marginals are stratified (one codeword per 1/K of prior mass in each coordinate) instead of merely
random. It is a pure function of (K, d, seed), so it is regenerated rather than learned; `save` keeps the
copy the base class writes only as a check that the regenerated codebook is the same.

A token (μ, σ) is encoded to

    argmin_k  Σ_j (c_kj − μ_j)² / σ_j²  −  β c_kj²
  = argmax_k  log q(c_k | μ, σ) − β log p(c_k)        (p = N(0, I), up to constants in k)

β = 1 picks the codeword with the largest importance weight q/p; β = 0 is σ-weighted nearest neighbour.
For σ_j² < 1/β the rule is σ-weighted nearest neighbour to μ_j / (1 − βσ_j²), not to μ_j: with β > 0 and
wide posteriors the chosen codeword sits beyond μ_j, away from 0, however large K is (bench/gq_theory.py).

Caveat (β > 0): in a coordinate where σ_j² ≥ 1/β the coefficient of c_kj² is 1/σ_j² − β ≤ 0, so the score
no longer grows away from μ_j and the rule favours the most extreme codewords in that coordinate (the
posterior there is at least as wide as the prior scaled by β). A VAE whose tokens carry KL ≈ log2 K bits
rarely has such coordinates; `fit_info["frac_scalars_sigma2_ge_1_over_beta"]` measures how often it happens
on the training latents, and no clamping is applied, so the rule is exactly the one above.
"""

from __future__ import annotations

import math

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.quantize.base import Quantizer, power_of_two_bits, register

#: Sobol points are integers times 2^-SOBOL_BITS; see `sobol_gaussian_codebook` for why this matters.
SOBOL_BITS = 30
#: Upper bound on the float64 score block of one chunk (K × tokens), so that K = 2^16 stays bounded.
SCORE_BLOCK_BYTES = 64 << 20


def check_power_of_two(n_codes: int) -> int:
    """log2 K, or a GeovqError naming K and the nearest valid sizes (Sobol balance needs K = 2^m)."""
    return power_of_two_bits(n_codes, "gq needs a codebook size K that is a power of two (scrambled Sobol points "
                                      "are balanced only then)")


def check_beta(beta: float) -> float:
    if not beta >= 0:  # also rejects NaN
        raise GeovqError(f"gq beta={beta} must be >= 0 (0: sigma-weighted nearest neighbour, 1: importance weight)")
    return float(beta)


def sobol_gaussian_codebook(n_codes: int, dim: int, seed: int) -> np.ndarray:
    """(K, d) float64 codebook: the first K scrambled Sobol points in [0, 1)^d through the inverse normal CDF."""
    from scipy.special import ndtri
    from scipy.stats import qmc

    m = check_power_of_two(n_codes)
    if dim < 1:
        raise GeovqError(f"codeword dimension d={dim} must be at least 1")
    uniform = qmc.Sobol(dim, scramble=True, bits=SOBOL_BITS, seed=seed).random_base2(m)
    # Scrambled points are multiples of 2^-30 and may be exactly 0, where ndtri is -inf. Moving every
    # point to the middle of its 2^-30 cell keeps it inside the same Sobol stratum (strata are multiples of
    # 2^-m, m <= 30) and makes the grid symmetric under u -> 1 - u.
    return ndtri(uniform + 2.0 ** -(SOBOL_BITS + 1))


def gq_select(codebook: np.ndarray, mu: np.ndarray, logvar: np.ndarray, beta: float,
              chunk_tokens: int | None = None) -> np.ndarray:
    """(N,) int64 index of argmin_k Σ_j (c_kj − μ_j)²/σ_j² − β c_kj² for tokens mu, logvar of shape (N, d).

    Expanding the square and dropping Σ μ²/σ² (constant in k), each chunk of tokens is one matrix product
    [c∘c, c] · [1/σ² − β, −2μ/σ²]ᵀ. It is computed as its transpose, (n, 2d) × (2d, K), because the argmin
    along contiguous rows is ~3× faster than down columns. Float64 throughout, so near-ties resolve the
    same way as a direct evaluation of the rule.
    """
    codebook = np.asarray(codebook, np.float64)
    mu = np.asarray(mu, np.float64)
    inv_var = np.exp(-np.asarray(logvar, np.float64))
    n_codes, dim = codebook.shape
    if mu.ndim != 2 or mu.shape[1] != dim or inv_var.shape != mu.shape:
        raise GeovqError(f"tokens mu {mu.shape} / logvar {inv_var.shape} must be (N, {dim}) for a (K, {dim}) codebook")
    check_beta(beta)
    code_features = np.concatenate([codebook**2, codebook], axis=1).T  # (2d, K)
    token_weights = np.concatenate([inv_var - beta, -2.0 * mu * inv_var], axis=1)  # (N, 2d)
    chunk = chunk_tokens or max(1, SCORE_BLOCK_BYTES // (8 * n_codes))
    codes = np.empty(len(mu), np.int64)
    for start in range(0, len(mu), chunk):
        stop = start + chunk
        codes[start:stop] = np.argmin(token_weights[start:stop] @ code_features, axis=1)
    return codes


@register("gq")
class GaussianQuant(Quantizer):
    """Training-free GQ: a fixed Sobol-Gaussian codebook and the β selection rule."""

    def __init__(self, n_codes: int, seed: int = 0, beta: float = 1.0) -> None:
        super().__init__(n_codes, seed)
        self.beta = beta  # 1: importance weights q/p; 0: σ-weighted nearest neighbour

    def _validate_params(self) -> None:
        check_power_of_two(self.n_codes)
        check_beta(self.beta)

    def _fit(self, latents: LatentSet) -> None:
        # Nothing is learned: the training latents only fix the layout and give the rate diagnostics.
        self.codebook_ = self._regenerate(latents.token_dim)
        kl_bits = latents.token_kl_bits()
        log2_k = math.log2(self.n_codes)
        # σ² >= 1/β  <=>  log σ² >= −ln β: where the rule's c² coefficient is <= 0 (see module docstring).
        flipped = float((latents.token_logvar >= -math.log(self.beta)).mean()) if self.beta > 0 else 0.0
        self.fit_info_ = {
            "log2_codes": log2_k,
            "mean_token_kl_bits": float(kl_bits.mean()),
            "rate_gap_bits": log2_k - float(kl_bits.mean()),
            "frac_scalars_sigma2_ge_1_over_beta": flipped,
        }

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return gq_select(self.codebook_, latents.token_mu, latents.token_logvar, self.beta)

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        # Called by `load` after it restored the saved codebook: regenerate it and insist they agree, since a
        # different scipy could scramble Sobol points differently and silently change every code.
        regenerated = self._regenerate(self.layout_.token_dim)
        if not np.array_equal(regenerated, self.codebook_):
            raise GeovqError(
                f"the saved gq codebook (K={self.n_codes}, d={self.layout_.token_dim}, seed={self.seed}) differs "
                f"from the one this scipy regenerates; re-fit the quantizer with this environment"
            )
        self.codebook_ = regenerated

    def _regenerate(self, dim: int) -> np.ndarray:
        # Stored and decoded as float32 like the latents; encode scores the same float32 values.
        return sobol_gaussian_codebook(self.n_codes, dim, self.seed).astype(np.float32)
