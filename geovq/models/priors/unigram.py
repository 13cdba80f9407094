"""The unigram baseline: every position's code drawn independently from that position's marginal.

It is the reference a trained prior must beat (on rate and on sample quality): it knows which codes each
grid position uses, and nothing of how they go together. Fitted by counting the training codes.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn

from geovq.models.priors.base import CodeGrid, Prior


class UnigramPrior(Prior):
    """p(c) = Π_t q_t(c_t), with q_t the Laplace-smoothed (add `alpha`) frequency of each code at position t."""

    def __init__(self, grid: CodeGrid, codes: np.ndarray, alpha: float = 1.0) -> None:
        super().__init__(grid)
        self._check(torch.as_tensor(codes), None, len(codes))
        counts = np.stack([np.bincount(col, minlength=grid.n_codes) for col in np.asarray(codes, np.int64).T])
        probs = (counts + alpha) / (counts + alpha).sum(1, keepdims=True)  # (T, K)
        self.log_probs = nn.Parameter(torch.as_tensor(np.log(probs), dtype=torch.float32), requires_grad=False)

    def logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_probs.expand(len(codes), -1, -1)

    def next_logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> Iterator[torch.Tensor]:
        for t in range(self.grid.tokens):
            yield self.log_probs[t].expand(len(codes), -1)
