"""A results row: one unit's test scores through one decoder (its VAE's, the one fine-tuned on its codebook, or
the VQ-VAE's own).

Its typed fields say what was measured: the unit (method, VAE, rate, seed, settings) and which decoder. What
was measured is held by name in `metrics`: the test image metrics, code usage, the stages' diagnostics and
timings, and, once the unit's prior was trained, the prior's rate and sample metrics. On disk (row.json,
row_finetuned.json; `RunDir` writes and reads them) and in results.json a row is one flat record (`as_dict`).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING as dataclass_missing
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePath
from typing import Any

from geovq.errors import GeovqError

#: the test metrics a report averages: numbers (or null where a metric could not be measured, e.g. LPIPS)
NUMERIC_METRICS = ("psnr", "ssim", "lpips", "mse", "usage_perplexity", "dead_codes")
#: metrics that name files of the run, relative to its directory
PATH_METRICS = ("codes_path", "samples_path")


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

    @classmethod
    def checked(cls, record: Any) -> Row:
        """A row read back from a file: every typed field present with its type, and the report's metrics
        numbers or null (a GeovqError naming the first that is not)."""
        if not isinstance(record, dict):
            raise GeovqError(f"a results row must be a JSON object, got {type(record).__name__}")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name == "metrics":
                continue
            if f.name not in record:
                if f.default is dataclass_missing and f.default_factory is dataclass_missing:
                    raise GeovqError(f"a results row needs {f.name!r}")
                continue
            if not _is_a(record[f.name], hints[f.name]):
                hint = hints[f.name]
                raise GeovqError(f"{f.name} {record[f.name]!r} is not a valid {getattr(hint, '__name__', hint)}")
        for name in ("unit", "vae_key"):  # a unit's and a VAE's folder names: one path component each
            value = record.get(name)
            if isinstance(value, str) and (value in ("", ".", "..") or "/" in value or "\\" in value):
                raise GeovqError(f"{name} {value!r} must be a folder name inside the run")
        for name in PATH_METRICS:  # files the report reads: inside the run directory
            value = record.get(name)
            if value is not None and (not isinstance(value, str) or PurePath(value).is_absolute()
                                      or ".." in PurePath(value).parts):
                raise GeovqError(f"{name} {value!r} must be a path inside the run directory")
        for name in NUMERIC_METRICS:
            value = record.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise GeovqError(f"{name} {value!r} must be a number or null")
        return cls.from_dict(record)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (str, int, float, bool, dict, or X | None)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        option = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option in (str, bool, dict) and isinstance(value, option):
            return True
    return False
