"""Search spaces of `geovq tune` (geovq/tune_spaces/<dataset>.yaml): parsing, validation, rate allocation, and the
define-by-run sampler that Optuna calls for each trial.

A space names settings geovq already has, so nothing here invents a parameter:
- under `vae:` and `vqvae:`, dotted training settings ("train.lr", "tdc.factor", "vq.decay"), typed and checked
  against the config dataclasses (geovq.config.check_override). `vqvae:` is the end-to-end models' training:
  its train.* settings act on every end-to-end method (VQ-VAE, FSQ, LFQ, residual VQ), its vq.* on the VQ-VAE;
- under `methods.<name>:`, keyword arguments of that method's constructor (a post-hoc quantizer's, or FSQ's,
  LFQ's or residual VQ's: geovq.end_to_end), typed by `hyperparameters()` and checked by the method's own
  `validate()`.
Each parameter is a range `{low, high}` (`log: true`, `step: s` optional), a choice `{choices: [...]}`, or a
plain value (fixed: applied and recorded, never searched).

Every method gets a study of its own (`Study`), so each gets the same number of trials. Conditional parameters
are sampled only where they act: tdc.* only for the TDC VAE, train.beta only for the plain VAE, a method's
parameters only in its own study, vq.* only in the vqvae study.

The rate: at a fixed budget of B bits per image, a study chooses among the (K, d) pairs with
tokens(d) × log2 K = B (tokens(d) = h·w·C/d), those its method admits (residual VQ with 2 stages needs K a
square); under --pareto it chooses d and log2 K freely and bits become a second objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from geovq.config import END_TO_END, VAE_VARIANTS, check_override, check_setting, method_class, typed_setting
from geovq.errors import GeovqError

TOP_KEYS = ("bits", "rate", "sampler", "asha", "max_train_images", "vae", "vqvae", "methods")
RANGE_FIELDS = ("low", "high", "log", "step")
#: Optuna names of the parameters that are not settings: the VAE variant and the rate
VAE_PARAM, RATE_PARAM, DIM_PARAM, LOG2K_PARAM = "vae", "rate", "token_dim", "log2_codes"


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) setting. `name` is its Optuna name ("train.lr", "gq.beta"), `key` the setting it
    sets (a dotted override, or a quantizer keyword such as "beta")."""

    name: str
    key: str
    kind: type  # int, float, str or bool
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    value: Any = None
    fixed: bool = False

    def suggest(self, trial: Any) -> Any:
        if self.fixed:
            return self.value
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self):
        import optuna.distributions as od

        if self.choices is not None:
            return od.CategoricalDistribution(list(self.choices))
        if self.kind is int:
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return od.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> tuple:
        """The values that must each be valid: a range's ends, every choice, or the fixed value."""
        if self.fixed:
            return (self.value,)
        return self.choices if self.choices is not None else (self.low, self.high)


@dataclass(frozen=True)
class Space:
    """A parsed, validated space file (one dataset)."""

    path: str
    latent_grid: tuple[int, int, int]  # (h, w, C) of the dataset's trunk
    bits: int | None  # default --bits
    token_dims: tuple[int, ...]
    min_codes: int
    max_codes: int
    n_startup_trials: int
    multivariate: bool
    grace_period: int
    reduction_factor: float
    max_train_images: int | None
    variants: tuple[str, ...]
    vae: tuple[Param, ...]
    vqvae: tuple[Param, ...] | None  # None: the file does not tune the VQ-VAE
    methods: dict[str, tuple[Param, ...]] = field(default_factory=dict)

    @property
    def method_names(self) -> list[str]:
        """The methods the file tunes: the VQ-VAE where it has a vqvae: section, and those under methods:."""
        return (["vqvae"] if self.vqvae is not None else []) + list(self.methods)

    def end_to_end_training(self, method: str) -> tuple[Param, ...]:
        """The vqvae: section's settings that act on an end-to-end method: all of them on the VQ-VAE, the train.*
        ones on FSQ, LFQ and residual VQ."""
        return tuple(p for p in self.vqvae or () if method == "vqvae" or not p.key.startswith("vq."))

    def own_params(self, method: str) -> tuple[Param, ...]:
        """A study's parameters: an end-to-end method's training settings and hyperparameters, or a post-hoc
        method's VAE settings (all variants; `acts_on` picks per variant) and hyperparameters."""
        first = self.end_to_end_training(method) if method in END_TO_END else self.vae
        return first + self.methods.get(method, ())

    def tokens(self, token_dim: int) -> int:
        h, w, c = self.latent_grid
        return h * w * c // token_dim

    def rates(self, bits: int) -> list[tuple[int, int]]:
        """The (K, d) pairs whose tokens × log2 K equal `bits`, largest d first."""
        out = []
        for d in self.token_dims:
            # log2 K against log2 of the bounds: 2 ** (bits // tokens) of a huge budget would not fit in memory
            log2_k = bits // self.tokens(d)
            if bits % self.tokens(d) == 0 and math.log2(self.min_codes) <= log2_k <= math.log2(self.max_codes):
                out.append((2**log2_k, d))
        return out

    def budgets(self) -> list[int]:
        """Every bit budget some (K, d) pair of this space meets."""
        lo, hi = int(math.log2(self.min_codes)), int(math.log2(self.max_codes))
        return sorted({self.tokens(d) * b for d in self.token_dims for b in range(lo, hi + 1)})

    def check_bits(self, bits: int) -> list[tuple[int, int]]:
        """The rate pairs of a budget, or a one-line error listing the nearest budgets that have some."""
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise GeovqError(f"--bits {bits!r} must be a positive integer (bits per image)")
        rates = self.rates(bits)
        if not rates:
            budgets = self.budgets()
            below = [b for b in budgets if b < bits][-2:]
            above = [b for b in budgets if b > bits][:2]
            h, w, c = self.latent_grid
            raise GeovqError(f"--bits {bits}: no (K, d) pair gives tokens × log2 K = {bits} on the {h}×{w}×{c} "
                             f"latent grid (d in {list(self.token_dims)}, K in [{self.min_codes}, {self.max_codes}]); "
                             f"nearest feasible budgets: {', '.join(map(str, below + above))}")
        return rates

    def study(self, method: str, bits: int | None) -> Study:
        """The define-by-run space of one method: at `bits` per image, or (None) with K free (--pareto)."""
        if method not in self.method_names:
            raise GeovqError(f"{self.path} has no entry for method {method!r}; its methods: "
                             f"{', '.join(self.method_names)}")
        if bits is None:
            study = Study(self, method, None)
            if not study._log2_codes:
                raise GeovqError(f"{method} admits no K in [{self.min_codes}, {self.max_codes}]: "
                                 f"{self.refusal(method, self.min_codes)}")
            return study
        rates = self.check_bits(bits)
        admitted = [(k, d) for k, d in rates if self.admits(method, k)]
        if not admitted:
            raise GeovqError(f"{method} admits none of the rates of --bits {bits} ("
                             + ", ".join(f"K={k} d={d}" for k, d in rates) + f"): {self.refusal(method, rates[0][0])}")
        return Study(self, method, tuple(admitted))

    def admits(self, method: str, n_codes: int) -> bool:
        """Whether the method's rules (with its fixed hyperparameters, the rest at their defaults) admit K codes."""
        return not self.refusal(method, n_codes)

    def refusal(self, method: str, n_codes: int) -> str:
        """Why the method's rules refuse K codes ("" where they admit it)."""
        fixed = {p.key: p.value for p in self.methods.get(method, ()) if p.fixed}
        try:
            method_class(method)(n_codes=n_codes, seed=0, **fixed).validate()
        except GeovqError as e:
            return str(e)
        return ""


@dataclass(frozen=True)
class Candidate:
    """One point of a space as geovq settings: a `config.TUNED_FIELDS` record plus its bits per image."""

    method: str
    n_codes: int
    token_dim: int
    bits: int
    vae: str | None
    vae_overrides: dict[str, Any]
    params: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"n_codes": self.n_codes, "token_dim": self.token_dim, "vae": self.vae,
                "vae_overrides": dict(self.vae_overrides), "params": dict(self.params)}


@dataclass(frozen=True)
class Study:
    """The define-by-run sampler of one method's study (Optuna calls it with a trial; picklable, as Ray
    ships it to the trials). `rates`: the (K, d) pairs at the bit budget; None under --pareto."""

    space: Space
    method: str
    rates: tuple[tuple[int, int], ...] | None

    @property
    def end_to_end(self) -> bool:
        return self.method in END_TO_END

    @property
    def bits(self) -> int | None:
        """The bit budget per image (None under --pareto)."""
        return None if self.rates is None else self.space.tokens(self.rates[0][1]) * int(math.log2(self.rates[0][0]))

    @cached_property
    def _log2_codes(self) -> list[int]:
        """Under --pareto: the log2 K in the space's range that the method admits (rvq with 2 stages: even ones).
        Found once per study (each value validates the method), not once per trial."""
        lo, hi = int(math.log2(self.space.min_codes)), int(math.log2(self.space.max_codes))
        return [b for b in range(lo, hi + 1) if self.space.admits(self.method, 2**b)]

    def _every_log2_codes(self) -> bool:
        return len(self._log2_codes) == int(math.log2(self.space.max_codes / self.space.min_codes)) + 1

    def _rate_labels(self) -> dict[str, tuple[int, int]]:
        return {f"K{k}-d{d}": (k, d) for k, d in self.rates}

    def __call__(self, trial: Any) -> dict[str, Any]:
        # What Optuna did not sample (fixed values, single choices) comes back as constants, so that Tune's
        # trial config is the whole point.
        return self.sample(trial)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Suggest every parameter this method uses, conditional ones only where they act; returns the values."""
        out: dict[str, Any] = {}

        def take(name: str, value: Any) -> None:
            out[name] = value

        if self.rates is not None:
            labels = list(self._rate_labels())
            take(RATE_PARAM, trial.suggest_categorical(RATE_PARAM, labels) if len(labels) > 1 else labels[0])
        else:
            dims = list(self.space.token_dims)
            take(DIM_PARAM, trial.suggest_categorical(DIM_PARAM, dims) if len(dims) > 1 else dims[0])
            log2_codes = self._log2_codes
            take(LOG2K_PARAM, trial.suggest_int(LOG2K_PARAM, log2_codes[0], log2_codes[-1])
                 if self._every_log2_codes() else trial.suggest_categorical(LOG2K_PARAM, log2_codes))
        if self.end_to_end:
            for p in self.space.own_params(self.method):
                take(p.name, p.suggest(trial))
            return out
        variants = list(self.space.variants)
        variant = trial.suggest_categorical(VAE_PARAM, variants) if len(variants) > 1 else variants[0]
        take(VAE_PARAM, variant)
        for p in self.space.vae:
            if acts_on(p.key, variant):
                take(p.name, p.suggest(trial))
        for p in self.space.methods[self.method]:
            take(p.name, p.suggest(trial))
        return out

    def candidate(self, values: dict[str, Any]) -> Candidate:
        """The settings of one sampled point (`values` as `sample` returned them, or as Tune's trial config)."""
        if self.rates is not None:
            k, d = self._rate_labels()[values[RATE_PARAM]]
        else:
            k, d = 2 ** int(values[LOG2K_PARAM]), int(values[DIM_PARAM])
        bits = self.space.tokens(d) * int(math.log2(k))
        if self.end_to_end:  # its params: dotted training settings beside its hyperparameters (end_to_end.split_params)
            params = {p.key: values[p.name] if not p.fixed else p.value for p in self.space.own_params(self.method)}
            return Candidate(self.method, k, d, bits, None, {}, params)
        variant = values[VAE_PARAM]
        vae = {p.key: values[p.name] if not p.fixed else p.value for p in self.space.vae if acts_on(p.key, variant)}
        params = {p.key: values[p.name] if not p.fixed else p.value for p in self.space.methods[self.method]}
        return Candidate(self.method, k, d, bits, variant, vae, params)

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every parameter this study may sample (for an in-memory study afterwards)."""
        import optuna.distributions as od

        out: dict[str, Any] = {}
        if self.rates is not None:
            if len(self.rates) > 1:
                out[RATE_PARAM] = od.CategoricalDistribution(list(self._rate_labels()))
        else:
            if len(self.space.token_dims) > 1:
                out[DIM_PARAM] = od.CategoricalDistribution(list(self.space.token_dims))
            log2_codes = self._log2_codes
            out[LOG2K_PARAM] = (od.IntDistribution(log2_codes[0], log2_codes[-1]) if self._every_log2_codes()
                                else od.CategoricalDistribution(log2_codes))
        if not self.end_to_end and len(self.space.variants) > 1:
            out[VAE_PARAM] = od.CategoricalDistribution(list(self.space.variants))
        params = self.space.own_params(self.method)
        out.update({p.name: p.distribution() for p in params if not p.fixed})
        return out

    def max_epochs(self, default: int) -> int:
        """The most epochs a trial of this study trains (ASHA's max_t); `default`: the dataset's epochs."""
        epochs = [p for p in self.space.own_params(self.method) if p.key == "train.epochs"]
        return int(max(epochs[0].extremes())) if epochs else default

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the space (all its parameters must be choices): the exhaustive grid, with conditional
        parameters only where they act. Enumerated by re-running `sample` along each path of choices."""
        points, stack = [], [()]
        while stack:
            path = stack.pop()
            trial = _GridTrial(path)
            values = self.sample(trial)
            for depth in range(len(path), len(trial.taken)):  # branch at every choice made beyond the path
                stack += [trial.taken[:depth] + (i,) for i in range(1, trial.widths[depth])]
            points.append(values)
        return sorted(points, key=lambda v: [str(v[k]) for k in sorted(v)])


class _GridTrial:
    """A stand-in for an Optuna trial that follows a path of choice indices (index 0 beyond it)."""

    def __init__(self, path: tuple[int, ...]) -> None:
        self.path, self.taken, self.widths = path, (), []

    def suggest_categorical(self, name: str, choices: list) -> Any:
        i = self.path[len(self.taken)] if len(self.taken) < len(self.path) else 0
        self.taken += (i,)
        self.widths.append(len(choices))
        return choices[i]

    def _range(self, name: str, *args: Any, **kwargs: Any) -> Any:
        raise GeovqError(f"an exhaustive grid needs choices; {name} is a range")

    suggest_int = suggest_float = _range


def acts_on(key: str, variant: str) -> bool:
    """Whether a VAE setting acts on a VAE variant: the TDC settings only on the TDC VAE, β only on the plain
    VAE (TDC replaces its KL term)."""
    if key.startswith("tdc."):
        return variant == "tdc"
    if key == "train.beta":
        return variant == "plain"
    return True


# -- parsing -------------------------------------------------------------------------------------------------
def load_space(path: str | Path, latent_grid: tuple[int, int, int]) -> Space:
    """Parse and validate a space file for a trunk with this (h, w, C) latent grid; every mistake is one line
    naming the file and the key."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO or device that reading would block on
        raise GeovqError(f"search space {path} is not a regular file; give a YAML file with --space FILE")
    if not path.is_file():
        raise GeovqError(f"search space {path} does not exist; give one with --space FILE "
                         "(geovq/tune_spaces/ holds one per dataset)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise GeovqError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_space(raw, latent_grid, str(path))


def parse_space(raw: Any, latent_grid: tuple[int, int, int], name: str = "space") -> Space:
    def fail(key: str, message: str) -> GeovqError:
        return GeovqError(f"{name}: {key}: {message}")

    raw = _mapping(raw, name, "the file", fail)
    _known(raw, TOP_KEYS, "", fail)
    h, w, c = latent_grid
    rate = _mapping(raw.get("rate", {}), name, "rate", fail)
    _known(rate, ("token_dims", "min_codes", "max_codes"), "rate.", fail)
    divisors = [d for d in range(c, 0, -1) if c % d == 0]
    dims = rate.get("token_dims", divisors)
    if not isinstance(dims, list) or not dims or any(_bad_int(d) or d not in divisors for d in dims) \
            or len(set(dims)) != len(dims):
        raise fail("rate.token_dims", f"{dims!r} must be a list of distinct divisors of the latent channels "
                                      f"C={c}: {divisors}")
    codes = {}
    for key, default in (("min_codes", 2), ("max_codes", 4096)):
        value = rate.get(key, default)
        if _bad_int(value) or value < 2 or value & (value - 1):
            raise fail(f"rate.{key}", f"{value!r} must be a power of two >= 2")
        codes[key] = value
    if codes["min_codes"] > codes["max_codes"]:
        raise fail("rate", f"min_codes {codes['min_codes']} exceeds max_codes {codes['max_codes']}")
    sampler = _mapping(raw.get("sampler", {}), name, "sampler", fail)
    _known(sampler, ("n_startup_trials", "multivariate"), "sampler.", fail)
    startup = sampler.get("n_startup_trials", 10)
    if _bad_int(startup) or startup < 0:
        raise fail("sampler.n_startup_trials", f"{startup!r} must be an integer >= 0")
    multivariate = sampler.get("multivariate", False)
    if not isinstance(multivariate, bool):
        raise fail("sampler.multivariate", f"{multivariate!r} must be true or false")
    asha = _mapping(raw.get("asha", {}), name, "asha", fail)
    _known(asha, ("grace_period", "reduction_factor"), "asha.", fail)
    grace, factor = asha.get("grace_period", 1), asha.get("reduction_factor", 3)
    if _bad_int(grace) or grace < 1:
        raise fail("asha.grace_period", f"{grace!r} must be an integer >= 1 (epochs)")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise fail("asha.reduction_factor", f"{factor!r} must be a number > 1")
    bits, cap = raw.get("bits"), raw.get("max_train_images")
    if bits is not None and (_bad_int(bits) or bits < 1):
        raise fail("bits", f"{bits!r} must be a positive integer (bits per image)")
    if cap is not None and (_bad_int(cap) or cap < 1):
        raise fail("max_train_images", f"{cap!r} must be a positive integer")

    vae = _mapping(raw.get("vae", {}), name, "vae", fail)
    variants = vae.get("variants", ["plain"])
    if not isinstance(variants, list) or not variants or any(v not in VAE_VARIANTS for v in variants) \
            or len(set(variants)) != len(variants):
        raise fail("vae.variants", f"{variants!r} must be a list of distinct VAE variants: {', '.join(VAE_VARIANTS)}")
    vae_params = []
    for key, spec in vae.items():
        if key == "variants":
            continue
        kind = _setting(key, "vae", fail)
        if key.startswith("vq."):
            raise fail(f"vae.{key}", "acts on the VQ-VAE only; put it under vqvae:")
        only = "tdc" if key.startswith("tdc.") else "plain" if key == "train.beta" else None
        if only is not None and only not in variants:
            raise fail(f"vae.{key}", f"acts only on the {only} VAE, which vae.variants {variants} leaves out")
        vae_params.append(_param(f"vae.{key}", key, key, kind, spec, fail))
    vqvae = None
    if "vqvae" in raw:
        vqvae = []
        for key, spec in _mapping(raw["vqvae"], name, "vqvae", fail).items():
            kind = _setting(key, "vqvae", fail)
            if key.startswith("tdc.") or key == "train.beta":
                raise fail(f"vqvae.{key}", "acts on the Gaussian VAE only; put it under vae:")
            vqvae.append(_param(f"vqvae.{key}", key, key, kind, spec, fail))
    methods: dict[str, tuple[Param, ...]] = {}
    for method, params in _mapping(raw.get("methods", {}), name, "methods", fail).items():
        if method == "vqvae":
            raise fail(f"methods.{method}", "the VQ-VAE's settings are training settings; they go under vqvae:")
        try:
            qcls = method_class(method)
        except GeovqError as e:
            raise fail(f"methods.{method}", str(e)) from None
        hps = qcls.hyperparameters()
        parsed = []
        for key, spec in _mapping(params if params is not None else {}, name, f"methods.{method}", fail).items():
            if key not in hps:
                raise fail(f"methods.{method}.{key}", f"{method} has no hyperparameter {key!r}; valid: "
                                                      f"{', '.join(hps)}")
            p = _param(f"methods.{method}.{key}", f"{method}.{key}", key, hps[key].type, spec, fail)
            for value in p.extremes():  # the method's own rules (gq: β >= 0, rvq: K = K_q ** stages), at some K
                errors = []
                for log2_k in range(int(math.log2(codes["min_codes"])), int(math.log2(codes["max_codes"])) + 1):
                    try:
                        qcls(n_codes=2**log2_k, seed=0, **{key: value}).validate()
                        break
                    except GeovqError as e:
                        errors.append(e)
                else:
                    raise fail(f"methods.{method}.{key}", str(errors[0])) from None
            parsed.append(p)
        methods[method] = tuple(parsed)
    space = Space(name, latent_grid, bits, tuple(dims), codes["min_codes"], codes["max_codes"], startup,
                  multivariate, grace, float(factor), cap, tuple(variants), tuple(vae_params),
                  None if vqvae is None else tuple(vqvae), methods)
    if not space.method_names:
        raise fail("methods", "the space tunes no method; add some under methods: (or a vqvae: section)")
    if bits is not None:
        space.check_bits(bits)
    return space


def _mapping(value: Any, name: str, key: str, fail) -> dict:
    if not isinstance(value, dict):
        raise fail(key, f"must be a mapping of keys to values, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise fail(key, f"key {k!r} must be a string")
    return value


def _known(mapping: dict, valid: tuple[str, ...], prefix: str, fail) -> None:
    for key in mapping:
        if key not in valid:
            raise fail(f"{prefix}{key}", f"unknown key; valid: {', '.join(valid)}")


def _bad_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _setting(key: str, section: str, fail) -> type:
    """The type of a dotted setting; one line naming the key when it is unknown."""
    try:
        return check_override(key)
    except GeovqError as e:
        raise fail(f"{section}.{key}", str(e)) from None


def _param(where: str, name: str, key: str, kind: type, spec: Any, fail) -> Param:
    if isinstance(spec, list):
        raise fail(where, f"a list is ambiguous; write {{choices: {spec}}} to search these values")
    if isinstance(spec, dict):
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise fail(where, "choices cannot be combined with low/high/log/step")
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise fail(where, f"choices {choices!r} must be a non-empty list")
            typed = tuple(_typed(where, kind, c, fail) for c in choices)
            if len(set(typed)) != len(typed):
                raise fail(where, f"choices {choices} list a value twice")
            param = Param(name, key, kind, choices=typed)
        else:
            _known(spec, RANGE_FIELDS, f"{where}.", fail)
            if "low" not in spec or "high" not in spec:
                raise fail(where, "a range needs low and high (or write {choices: [...]}, or a plain value)")
            if kind not in (int, float):
                raise fail(where, f"is a {kind.__name__} setting: give {{choices: [...]}} or a plain value")
            low, high = _typed(where, kind, spec["low"], fail), _typed(where, kind, spec["high"], fail)
            log, step = spec.get("log", False), spec.get("step")
            if not low < high:
                raise fail(where, f"low {low} must be below high {high}")
            if not isinstance(log, bool):
                raise fail(f"{where}.log", f"{log!r} must be true or false")
            if log and low <= 0:
                raise fail(where, f"a log range needs low > 0, got {low}")
            if step is not None:
                step = _typed(f"{where}.step", kind, step, fail)
                if step <= 0 or log:
                    raise fail(f"{where}.step", f"{step} must be > 0, and cannot be combined with log")
            param = Param(name, key, kind, low=low, high=high, log=log, step=step)
    else:
        param = Param(name, key, kind, value=_typed(where, kind, spec, fail), fixed=True)
    for value in param.extremes():
        try:
            check_setting(key, value)
        except GeovqError as e:
            raise fail(where, str(e)) from None
    return param


def _typed(where: str, kind: type, value: Any, fail) -> Any:
    """`value` as the setting's type (`config.typed_setting`); an error names the key."""
    try:
        return typed_setting(kind, value)
    except GeovqError as e:
        raise fail(where, str(e)) from None
