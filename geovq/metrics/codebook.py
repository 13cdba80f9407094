"""Codebook usage on held-out codes (DESIGN.md §4).

Codes of any shape ((N, T) tokens, grids, groups) are pooled into one histogram over the K codes. Usage
on the training set is tautological for medoid methods, so these are meant for test-split codes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import entr  # scipy.stats (for its entropy) costs every trial worker 0.7 s of imports

from geovq.metrics._arrays import check_codes

Codes = np.ndarray | torch.Tensor


def code_histogram(codes: Codes, n_codes: int) -> np.ndarray:
    """(K,) int64 counts of each code over all positions and groups."""
    return np.bincount(check_codes(codes, n_codes), minlength=n_codes)


def plug_in_entropy(counts: np.ndarray) -> float:
    """H (nats) of the distribution the counts give, -sum p log p (0 log 0 = 0)."""
    return float(entr(counts / counts.sum()).sum())


def usage_perplexity(codes: Codes, n_codes: int) -> float:
    """exp(H) with H the plug-in entropy (nats) of the code histogram: the effective number of codes used.

    The plug-in estimate is biased low by about (m−1)/2N nats (m codes seen, N codes counted), so with
    K comparable to N it understates usage; see `usage_perplexity_corrected`.
    """
    return math.exp(plug_in_entropy(code_histogram(codes, n_codes)))


def usage_perplexity_corrected(codes: Codes, n_codes: int) -> float:
    """exp(H + (m−1)/(2N)): Miller–Madow bias correction, m = codes observed, N = codes counted.

    Not clipped: with nearly uniform usage of all K codes it can slightly exceed K.
    """
    counts = code_histogram(codes, n_codes)
    observed = int(np.count_nonzero(counts))
    return math.exp(plug_in_entropy(counts) + (observed - 1) / (2 * int(counts.sum())))


def dead_codes(codes: Codes, n_codes: int) -> int:
    """Number of codes with no hit."""
    return int(np.count_nonzero(code_histogram(codes, n_codes) == 0))
