"""A results row: one unit's test scores through one decoder (its VAE's, the one fine-tuned on its codebook, or
the VQ-VAE's own).

Its typed fields say what was measured: the unit (method, VAE, rate, seed, settings) and which decoder. What
was measured is held by name in `metrics`: the test image metrics, code usage, the stages' diagnostics and
timings, and, once the unit's prior was trained, the prior's rate and sample metrics. On disk (row.json,
row_finetuned.json; `RunDir` writes and reads them) and in results.json a row is one flat record (`as_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(kw_only=True)
class Row:
    dataset: str
    method: str
    vae: str | None  # the VAE variant (plain, tdc); None: trained end to end
    finetuned: bool  # decoded by the VAE's decoder fine-tuned on the codebook
    K: int  # codebook size: K is the column name of every table
    token_dim: int
    grouping: str
    tokens_per_image: int
    bits_per_image: float
    bpp: float
    seed: int
    params: dict[str, Any]  # the method's hyperparameters
    #: the VAE's dotted training overrides (rows written before tuned units lack them: none)
    vae_overrides: dict[str, Any] = field(default_factory=dict)
    unit: str  # the unit's key, its directory's name
    vae_key: str | None
    metrics: dict[str, Any] = field(default_factory=dict)

    def with_metrics(self, metrics: dict[str, Any]) -> Row:
        """This row with `metrics` added (a name it holds already keeps its place and takes the new value)."""
        return replace(self, metrics={**self.metrics, **metrics})

    def as_dict(self) -> dict[str, Any]:
        """The flat record: the typed fields, then the metrics."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}, **self.metrics}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Row:
        typed = {f.name for f in fields(cls)} - {"metrics"}
        return cls(**{k: v for k, v in record.items() if k in typed},
                   metrics={k: v for k, v in record.items() if k not in typed})
