"""What every prior shares: the code grid, the teacher-forced likelihood, and seeded filtered sampling.

A subclass provides two things:
- `logits(codes, labels) -> (N, T, K)`: position t's logits given c_<t (teacher forcing; the codes at
  positions ≥ t must not change them: tests check this for every prior);
- `next_logits(codes, labels)`: a generator for sampling that yields position t's (B, K) logits and then
  reads codes[:, t], which the caller has filled in meanwhile (a Transformer keeps its key/value cache
  between the two; a PixelCNN simply reruns on the partly filled grid).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from geovq.errors import GeovqError
from geovq.latents import TokenLayout

#: sequences per batch when sampling or scoring outside training
SAMPLE_BATCH = 1024


@dataclass(frozen=True)
class CodeGrid:
    """Where the T = height·width·groups codes of an image sit, and how many values (K) each takes."""

    height: int
    width: int
    groups: int
    n_codes: int

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.groups) < 1 or self.n_codes < 2:
            raise GeovqError(f"code grid {self} needs height, width, groups >= 1 and K >= 2")

    @classmethod
    def from_layout(cls, layout: TokenLayout, n_codes: int) -> CodeGrid:
        return cls(layout.height, layout.width, layout.groups, n_codes)

    @property
    def tokens(self) -> int:
        return self.height * self.width * self.groups

    def positions(self) -> torch.Tensor:
        """(T, 3) long: the (row, column, group) of each token, in token order."""
        rows, cols, groups = torch.meshgrid(torch.arange(self.height), torch.arange(self.width),
                                            torch.arange(self.groups), indexing="ij")
        return torch.stack([rows, cols, groups], -1).reshape(-1, 3)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_sampling(n: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line errors for sampling controls that mean nothing."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise GeovqError(f"number of samples n={n!r} must be a positive integer")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise GeovqError(f"temperature {temperature!r} must be > 0 (small values approach greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GeovqError(f"top-k {top_k!r} must be a positive integer (or none)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GeovqError(f"top-p {top_p!r} must lie in (0, 1] (or none)")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """(B, K) logits scaled by 1/temperature, then -inf outside the top-k and outside the nucleus: the
    smallest set of most likely codes whose probability reaches top_p (the most likely code always stays)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # A code stays while the mass strictly before it is below top_p: the nucleus is then minimal.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    return logits


class Prior(nn.Module):
    """p(c | class) over (N, T) codes on `grid`; `n_classes` = 0: unconditional."""

    def __init__(self, grid: CodeGrid, n_classes: int = 0) -> None:
        super().__init__()
        if n_classes < 0:
            raise GeovqError(f"n_classes {n_classes} must be >= 0 (0: unconditional)")
        self.grid, self.n_classes = grid, n_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) codes -> (N, T, K) logits of p(c_t | c_<t, label)."""
        raise NotImplementedError

    def next_logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> Iterator[torch.Tensor]:
        """Yield (B, K) logits of position t = 0, 1, …; after each yield codes[:, t] holds the chosen code."""
        raise NotImplementedError

    def _check(self, codes: torch.Tensor | None, labels: torch.Tensor | None, n: int) -> None:
        if codes is not None and (codes.ndim != 2 or codes.shape[1] != self.grid.tokens):
            raise GeovqError(f"codes must be (N, {self.grid.tokens}) for grid {self.grid}, got {tuple(codes.shape)}")
        if codes is not None and codes.numel() and (codes.min() < 0 or codes.max() >= self.grid.n_codes):
            raise GeovqError(f"codes must lie in [0, {self.grid.n_codes}), got [{int(codes.min())}, {int(codes.max())}]")
        if self.n_classes and labels is None:
            raise GeovqError(f"this prior is class-conditional ({self.n_classes} classes): give labels")
        if not self.n_classes and labels is not None:
            raise GeovqError("this prior is unconditional: give no labels")
        if labels is not None and (labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.n_classes):
            raise GeovqError(f"labels must be ({n},) in [0, {self.n_classes}), got {tuple(labels.shape)}")

    def token_nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) −log p(c_t | c_<t, label) in nats."""
        self._check(codes, labels, len(codes))
        logits = self.logits(codes, labels)
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")

    def log_prob(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) log p(codes | label) in nats: −(what an arithmetic coder spends, in nats)."""
        return -self.token_nll(codes, labels).sum(1)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
               batch_size: int = SAMPLE_BATCH) -> torch.Tensor:
        """(n, T) long codes on the prior's device, drawn in batches, in eval mode. `generator` (on the same
        device) makes the draw reproducible; `labels` (n,) are required exactly when the prior is conditional."""
        check_sampling(n, temperature, top_k, top_p)
        self._check(None, labels, n)
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            codes = torch.zeros(b, self.grid.tokens, dtype=torch.long, device=self.device)
            batch_labels = None if labels is None else labels[start:start + b].to(self.device)
            for t, logits in enumerate(self.next_logits(codes, batch_labels)):
                probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
                codes[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
            out.append(codes)
        self.train(was_training)
        return torch.cat(out)
