"""Typed units of work: one Gaussian VAE (`VaeSpec`) and one (method, VAE, K, d, seed, params) cell (`Unit`).

Both are frozen dataclasses. Their identity, and their directory name, is a readable slug plus a short hash
of their full content (`key`), never parsed back: a stage receives the object itself, or its dict
(`to_dict` / `from_dict`) where a process boundary is crossed (a Ray Tune trial). Hyperparameters travel
with the unit (`params`), so a search can run "geodesic with k = 25" beside "geodesic with k = 10" in one
run directory, and a VAE is cached by its configuration: two units that need the same VAE name the same
`VaeSpec`, hence the same directory. No torch here: the driver plans units without it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from geovq.config import END_TO_END, SweepConfig

#: hyperparameters as a sorted tuple of (name, value) pairs: hashable, so units stay frozen and comparable
Params = tuple[tuple[str, Any], ...]


def as_params(values: dict[str, Any] | None) -> Params:
    return tuple(sorted((values or {}).items()))


def _short_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class VaeSpec:
    """One Gaussian VAE. `plain` (β-ELBO) serves every token dim d, so it has none; `tdc` steers tokens of
    `token_dim` channels to `target_bits` = log2 K. `overrides` are dotted training settings over the sweep's
    ("train.lr", "train.epochs", "tdc.factor", ...)."""

    variant: str
    seed: int
    target_bits: float | None = None
    token_dim: int | None = None
    grouping: str | None = None
    overrides: Params = ()
    kind: str = field(default="vae", init=False)

    @property
    def slug(self) -> str:
        if self.variant == "plain":
            return f"plain-seed{self.seed}"
        return f"tdc-T{self.target_bits:g}-d{self.token_dim}-seed{self.seed}"

    @property
    def key(self) -> str:
        """Directory name: readable slug + hash of the full content."""
        return f"{self.slug}-{_short_hash(self.to_dict())}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["overrides"] = dict(self.overrides)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VaeSpec:
        raw = {k: v for k, v in raw.items() if k != "kind"}
        return cls(**{**raw, "overrides": as_params(raw.get("overrides"))})


@dataclass(frozen=True)
class Unit:
    """One method at one rate (K codes of `token_dim` channels) and seed, on one VAE (None: end to end).

    `params`: the method's hyperparameters (a post-hoc quantizer's constructor arguments). `quantizer`: the
    import path ('module:Class') of the quantizer class, so that a worker process finds a method defined
    outside geovq; it says where the code lives, not what it computes, so it is not part of the identity.
    """

    method: str
    n_codes: int
    seed: int
    token_dim: int
    grouping: str
    vae: VaeSpec | None = None
    params: Params = ()
    quantizer: str | None = None
    kind: str = field(default="unit", init=False)

    @property
    def end_to_end(self) -> bool:
        return self.vae is None

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.n_codes)

    @property
    def slug(self) -> str:
        vae = f"-{self.vae.variant}" if self.vae is not None else ""
        return f"{self.method}{vae}-K{self.n_codes}-d{self.token_dim}-seed{self.seed}"

    @property
    def key(self) -> str:
        identity = self.to_dict()
        identity.pop("quantizer")
        return f"{self.slug}-{_short_hash(identity)}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["vae"] = None if self.vae is None else self.vae.to_dict()
        out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Unit:
        raw = {k: v for k, v in raw.items() if k != "kind"}
        vae = None if raw.get("vae") is None else VaeSpec.from_dict(raw["vae"])
        return cls(**{**raw, "vae": vae, "params": as_params(raw.get("params"))})


def work_from_dict(raw: dict[str, Any]) -> VaeSpec | Unit:
    """A VaeSpec or a Unit from its dict (the `kind` field says which)."""
    return VaeSpec.from_dict(raw) if raw["kind"] == "vae" else Unit.from_dict(raw)


def vae_spec(cfg: SweepConfig, variant: str, n_codes: int, seed: int, token_dim: int | None = None,
             overrides: Params = ()) -> VaeSpec:
    """The VAE a post-hoc unit at K = n_codes uses: the plain VAE serves every rate; a TDC VAE targets
    log2 K bits per token of `token_dim` channels (default: the sweep's d). `overrides`: dotted training settings."""
    if variant == "plain":
        return VaeSpec("plain", seed, overrides=overrides)
    return VaeSpec("tdc", seed, target_bits=cfg.tdc_bits or math.log2(n_codes), token_dim=token_dim or cfg.d,
                   grouping=cfg.grouping, overrides=overrides)


def tuned_unit(cfg: SweepConfig, method: str, record: dict[str, Any], seed: int) -> Unit:
    """The unit of one tuned configuration (config.TUNED_FIELDS: a `geovq tune` trial, or its best.yaml record)."""
    from geovq.quantize.base import get_quantizer_class, quantizer_path

    k, d = record["n_codes"], record["token_dim"]
    common = dict(method=method, n_codes=k, seed=seed, token_dim=d, grouping=cfg.grouping,
                  params=as_params(record["params"]))
    if method in END_TO_END:
        return Unit(**common)
    vae = vae_spec(cfg, record["vae"], k, seed, token_dim=d, overrides=as_params(record["vae_overrides"]))
    return Unit(**common, vae=vae, quantizer=quantizer_path(get_quantizer_class(method)))


def plan_units(cfg: SweepConfig) -> list[Unit]:
    """Every unit of a sweep: seeds × K × methods (× VAE variants for post-hoc methods); with --tuned, seeds ×
    methods, each method at its own tuned configuration."""
    from geovq.quantize.base import get_quantizer_class, quantizer_path

    if cfg.tuned:
        return [tuned_unit(cfg, method, cfg.tuned[method], seed) for seed in range(cfg.seeds) for method in cfg.methods]
    units = []
    for seed in range(cfg.seeds):
        for k in cfg.codebook_sizes:
            for method in cfg.methods:
                params = as_params(cfg.method_params.get(method))
                common = dict(method=method, n_codes=k, seed=seed, token_dim=cfg.d, grouping=cfg.grouping,
                              params=params)
                if method in END_TO_END:
                    units.append(Unit(**common))
                else:
                    path = quantizer_path(get_quantizer_class(method))
                    units += [Unit(**common, vae=vae_spec(cfg, v, k, seed), quantizer=path) for v in cfg.vaes]
    return units
