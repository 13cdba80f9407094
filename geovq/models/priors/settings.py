"""Prior sizes and training settings, with per-dataset defaults. Imports no torch (the CLI reads it).

The defaults are sized for 2 CPU cores (measured; see the README of geovq's priors): one MNIST unit's prior
(7×7 grid, K = 256, 55k training images) trains in under 10 minutes, and on digits (4×4 grid) each prior
of a quick run takes a few seconds. A GPU runs the same settings faster; nothing here depends on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from geovq.config import check_prior_kind
from geovq.errors import GeovqError


@dataclass
class PriorTrainConfig:
    """AdamW with linear warm-up and cosine decay, early-stopped on validation codes."""

    batch_size: int = 64  # code sequences (images) per step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay, on weight matrices and embeddings only
    max_steps: int = 3000  # the cosine schedule's length, and the most steps run
    warmup_steps: int = 100
    eval_every: int = 250  # steps between validation passes (each a possible early stop and resume point)
    patience: int = 4  # validation passes without improvement before stopping
    grad_clip: float = 1.0  # gradient norm clip
    seed: int = 0

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise GeovqError(f"prior training {name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0 or not self.grad_clip > 0:
            raise GeovqError(f"prior training settings {self} need lr > 0, weight_decay >= 0, warmup_steps >= 0 "
                             "and grad_clip > 0")


@dataclass
class PriorConfig:
    """One prior: its kind, its constructor's keywords (`model`), its training, and whether it is
    conditioned on the image's class."""

    kind: str
    model: dict[str, Any] = field(default_factory=dict)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    conditional: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Sizes per dataset (see the module docstring for the budgets they meet).
_DEFAULT = {
    "transformer": PriorConfig("transformer", {"layers": 4, "heads": 4, "dim": 128, "dropout": 0.1},
                               PriorTrainConfig(lr=2e-3, max_steps=1400, eval_every=200)),
    "pixelcnn": PriorConfig("pixelcnn", {"layers": 6, "hidden": 64, "kernel": 3, "dropout": 0.0},
                            PriorTrainConfig(lr=2e-3, max_steps=2200, eval_every=200)),
}
_DIGITS = {
    "transformer": PriorConfig("transformer", {"layers": 1, "heads": 4, "dim": 64, "dropout": 0.0},
                               PriorTrainConfig(batch_size=32, lr=1e-2, max_steps=300, warmup_steps=20, eval_every=30)),
    "pixelcnn": PriorConfig("pixelcnn", {"layers": 3, "hidden": 32, "kernel": 3, "dropout": 0.0},
                            PriorTrainConfig(batch_size=32, lr=5e-3, max_steps=140, warmup_steps=20, eval_every=20)),
}
PRESETS: dict[str, dict[str, PriorConfig]] = {"digits": _DIGITS}


def prior_config(dataset: str, kind: str = "transformer", conditional: bool = False, seed: int = 0) -> PriorConfig:
    """The default prior of `kind` for `dataset` (digits has its own small one), with the unit's seed."""
    base = PRESETS.get(dataset, _DEFAULT)[check_prior_kind(kind)]
    return replace(base, model=dict(base.model), train=replace(base.train, seed=seed), conditional=conditional)
