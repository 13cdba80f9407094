"""Autoregressive priors over a unit's codes (DESIGN.md §3.8): p(c) = Π_t p(c_t | c_<t, class).

Codes are (N, T) in geovq's token order (row, column, group; see `geovq.latents.TokenLayout`) on a grid of
`CodeGrid(height, width, groups, n_codes)`. Every prior implements `geovq.models.priors.base.Prior`:
`logits` (teacher-forced), `token_nll`, `log_prob` and `sample` (temperature, top-k, top-p, seeded).

    transformer  decoder-only GPT (pre-LN, learned row/column/group embeddings, a BOS slot)  transformer.py
    pixelcnn     gated PixelCNN, masked convolutions over the grid and over a cell's groups      pixelcnn.py
    unigram      independent codes from each position's marginal (a baseline, fitted by counting) unigram.py

This package and `settings` import no torch (the CLI lists priors without it); `build_prior` imports the model.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from geovq.config import check_prior_kind

#: trained priors, by name (geovq.config.PRIOR_KINDS) -> "module:Class" (imported on use)
PRIORS = {"transformer": "geovq.models.priors.transformer:TransformerPrior",
          "pixelcnn": "geovq.models.priors.pixelcnn:PixelCNNPrior"}


def prior_class(kind: str) -> type:
    module, _, name = PRIORS[check_prior_kind(kind)].partition(":")
    return getattr(import_module(module), name)


def build_prior(config: dict[str, Any]):
    """A prior from the config its checkpoint stores: {"kind", "grid": CodeGrid fields, "n_classes", "model"}."""
    from geovq.models.priors.base import CodeGrid

    return prior_class(config["kind"])(CodeGrid(**config["grid"]), config["n_classes"], **config["model"])
