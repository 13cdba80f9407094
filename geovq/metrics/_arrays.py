"""Input checks shared by the metric modules: numpy or torch in, float64/int64 numpy out."""

from __future__ import annotations

import numpy as np
import torch

from geovq.errors import GeovqError


def to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view of `x` (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_same_shape(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, names: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise GeovqError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_codes(codes: np.ndarray | torch.Tensor, n_codes: int) -> np.ndarray:
    """Flatten integer codes of any shape after checking that every one lies in [0, n_codes)."""
    if isinstance(n_codes, bool) or not isinstance(n_codes, (int, np.integer)) or n_codes < 1:
        raise GeovqError(f"n_codes must be a positive integer (the codebook size K), got {n_codes!r}")
    flat = to_numpy(codes).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise GeovqError(f"codes must be integers, got dtype {flat.dtype}")
    if flat.size == 0:
        raise GeovqError("codes is empty: usage needs at least one code")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= n_codes:
        raise GeovqError(f"codes must lie in [0, {n_codes}) for K={n_codes}, found values in [{lo}, {hi}]")
    return flat.astype(np.int64, copy=False)
