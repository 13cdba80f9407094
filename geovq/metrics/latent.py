"""Quantization error in latent space (DESIGN.md §4): how far the code ẑ lands from the posterior (μ, σ).

‖ẑ−μ‖ is in the latent's own units; |ẑ−μ|/σ measures it against the posterior's width, which is what
Gaussian Quant's theory bounds: P(|ẑ−μ| ≥ σ) should be tiny when log2 K exceeds the token's KL in bits.
"""

from __future__ import annotations

import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.metrics._arrays import check_same_shape, to_numpy

Tokens = np.ndarray | torch.Tensor


def quantization_error(mu_hat: Tokens, mu: Tokens, sigma: Tokens) -> dict:
    """Errors of decoded codes `mu_hat` against posterior means `mu` and std-devs `sigma`, all (Ntok, d).

    Returns latent_error (mean over tokens of ‖ẑ−μ‖₂), latent_error_sigma (mean over scalars of |ẑ−μ|/σ)
    and frac_beyond_sigma (fraction of scalars with |ẑ−μ| ≥ σ).
    """
    check_same_shape(mu_hat, mu, "mu_hat and mu")
    check_same_shape(sigma, mu, "sigma and mu")
    if len(mu.shape) != 2 or mu.shape[0] == 0:
        raise GeovqError(f"tokens must be a non-empty (Ntok, d) array, got shape {tuple(mu.shape)}")
    mu_hat, mu, sigma = (to_numpy(x).astype(np.float64) for x in (mu_hat, mu, sigma))
    if not (np.isfinite(mu_hat).all() and np.isfinite(mu).all()):
        raise GeovqError("mu_hat and mu must be finite")
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise GeovqError(f"sigma must be finite and > 0, found values in [{sigma.min():.4g}, {sigma.max():.4g}]")
    abs_error = np.abs(mu_hat - mu)
    return {
        "latent_error": float(np.linalg.norm(mu_hat - mu, axis=1).mean()),
        "latent_error_sigma": float((abs_error / sigma).mean()),
        "frac_beyond_sigma": float((abs_error >= sigma).mean()),
    }
