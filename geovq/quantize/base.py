"""The one interface every post-hoc quantizer implements, and the registry that names them.

Like a scikit-learn estimator:
- hyperparameters are the keyword arguments of the constructor, each stored unchanged as an attribute of
  the same name; `get_params()` reads them back through the signature, and `hyperparameters()` lists them
  with their defaults and types. The CLI options (`--gq-beta`), the run configuration and search spaces are
  all derived from that signature, so adding a setting touches only the quantizer's own file;
- validation happens in one place, `_validate_params`, run by `validate()` (the CLI calls it before anything
  is written) and again by `fit`;
- `fit(train_latents) -> self`, then `encode(latents) -> (N, T) int codes` for any split and
  `decode(codes) -> (..., d)` token vectors;
- fitted state ends in `_` (`codebook_`, `layout_`, `fit_info_`, ...);
- `save`/`load` round-trip through one .npz file (no pickle). A quantizer that needs the decoder receives it
  at construction (and again at `load`): it is a runtime object, not a hyperparameter.

Adding a method = one module defining a `Quantizer` subclass decorated with `@register("name")`. Methods in
`geovq.quantize` register on import; one defined elsewhere is found by its import path
(`quantizer_path`), which run units carry, so a Ray worker can import it too. Module-level imports of a
quantizer file stay light (numpy, the base): the CLI imports every quantizer to derive its options.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from geovq.errors import GeovqError
from geovq.io import save_npz
from geovq.latents import LatentSet, TokenLayout

QUANTIZERS: dict[str, type["Quantizer"]] = {}
Q = TypeVar("Q", bound="Quantizer")
C = TypeVar("C", bound="Configurable")
#: a method name: lower-case letters, digits, '_' and '-', starting with a letter or digit
METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
#: constructor arguments that are not hyperparameters: the rate (K), the run seed, runtime objects
NOT_HYPERPARAMETERS = frozenset({"self", "n_codes", "seed", "decoder"})
FORMAT = "geovq-quantizer"
#: seconds between progress lines of a long encode (to the "geovq" logger: a sweep's sweep.log)
PROGRESS_LOG_SECONDS = 60.0

log = logging.getLogger("geovq")


class EncodeProgress:
    """A line at most every PROGRESS_LOG_SECONDS while an encode works through a split's tokens in chunks. A
    sweep redirected to a file draws no bars, and an MNIST split can take a core most of an hour."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        """`done` of `total` tokens are encoded."""
        now = time.perf_counter()
        if now - self.last > PROGRESS_LOG_SECONDS:
            self.last, spent = now, now - self.start
            log.info("%s: %d of %d tokens, %.0f s, about %.0f s left", self.what, done, self.total, spent,
                     spent * (self.total / done - 1))


def power_of_two_bits(n_codes: int, needs: str) -> int:
    """log2 K where K is a power of two; else a GeovqError of `needs` (what requires it, and why) naming K and the
    nearest valid sizes. The one rule of gq (Sobol balance), fsq and lfq (codes of whole bits)."""
    n_codes = int(n_codes)
    if n_codes < 2 or n_codes & (n_codes - 1):
        below = 1 << max(n_codes.bit_length() - 1, 1)
        above = 1 << max(n_codes.bit_length(), 1)
        raise GeovqError(f"{needs}; got K={n_codes}, nearest valid: {below} or {above}")
    return n_codes.bit_length() - 1


def check_method_name(name: str) -> str:
    if not isinstance(name, str) or not METHOD_NAME.fullmatch(name):
        raise GeovqError(f"method name {name!r} is not valid; names match [a-z0-9][a-z0-9_-]* (e.g. w2-fast)")
    return name


def register(name: str):
    """Class decorator: make a Quantizer subclass available as method `name`."""
    check_method_name(name)

    def wrap(cls: type[Q]) -> type[Q]:
        if QUANTIZERS.get(name, cls) is not cls:
            raise GeovqError(f"quantizer {name!r} registered twice ({quantizer_path(QUANTIZERS[name])} and "
                             f"{quantizer_path(cls)})")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor keyword of a quantizer: its default and its (scalar) type."""

    name: str
    default: Any
    type: type  # int, float, str or bool
    optional: bool  # None is allowed
    help: str = ""  # the comment on its `self.name = name` line in the constructor


class Configurable:
    """What every method shares, post-hoc quantizer or end-to-end bottleneck (`geovq.end_to_end`): a rate of K
    codes, a seed, and hyperparameters declared once, as the constructor's keyword arguments. The command-line
    options, the run configuration and search spaces derive from that signature."""

    name: ClassVar[str] = ""

    def __init__(self, n_codes: int, seed: int = 0) -> None:
        self.n_codes = n_codes
        self.seed = seed

    # -- hyperparameters ----------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict[str, Hyperparameter]:
        """The constructor's keyword arguments that are hyperparameters, in signature order."""
        namespace = vars(sys.modules[cls.__module__])
        out = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in NOT_HYPERPARAMETERS or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            # one annotation at a time: runtime arguments may name types (torch) that are not imported
            hint = eval(param.annotation, namespace) if isinstance(param.annotation, str) else param.annotation
            kind, optional = _scalar_type(hint, f"{cls.__name__}.{name}")
            out[name] = Hyperparameter(name, param.default, kind, optional, _comments(cls).get(name, ""))
        return out

    def get_params(self) -> dict[str, Any]:
        """n_codes, seed and every hyperparameter, as set (JSON-serialisable); what `load` passes back."""
        return {"n_codes": self.n_codes, "seed": self.seed,
                **{name: getattr(self, name) for name in self.hyperparameters()}}

    def validate(self: C) -> C:
        """Check every parameter; raise GeovqError naming the bad value and what would be valid."""
        if isinstance(self.n_codes, bool) or not isinstance(self.n_codes, (int, np.integer)) or self.n_codes < 2:
            raise GeovqError(f"codebook size K={self.n_codes} must be an integer >= 2")
        for name, hp in self.hyperparameters().items():
            value = getattr(self, name)
            if value is None and hp.optional:
                continue
            ok = isinstance(value, hp.type) and not (hp.type is not bool and isinstance(value, bool))
            if hp.type is float and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise GeovqError(f"{self.name} {name}={value!r} must be {hp.type.__name__}"
                                 + (" or None" if hp.optional else ""))
            if hp.type is float and math.isnan(value):  # every comparison with NaN is False: no rule below sees it
                raise GeovqError(f"{self.name} {name}=nan must be a number")
        self._validate_params()
        return self

    def _validate_params(self) -> None:
        """Method-specific checks of the hyperparameters (and of K); override in subclasses."""


class Quantizer(Configurable, ABC):
    """Base class. Subclasses declare hyperparameters in `__init__`, implement `_fit` and `_encode_tokens`,
    and may add `_validate_params`, `_encode_info`, `state`/`set_state`."""

    #: whether the constructor takes a `decoder=` argument (geometry-aware methods). Their encodes run the
    #: decoder for every token (metric tensors, curves): on a cluster the Ray Data codes stage shards them
    needs_decoder: ClassVar[bool] = False

    def _check_decoder(self) -> None:
        """For geometry-aware methods: the decoder is a runtime argument, not a hyperparameter, so it is
        checked where it is used (fit, encode), not in `_validate_params`."""
        if self.needs_decoder and getattr(self, "decoder", None) is None:
            raise GeovqError(f"the {self.name} quantizer needs decoder=: a callable from μ-grids (B, h, w, C) to "
                             "images")

    # -- the estimator interface ------------------------------------------------------------------
    def fit(self: Q, latents: LatentSet, **fit_options: Any) -> Q:
        self.validate()
        if self.n_codes > latents.n_tokens:
            raise GeovqError(
                f"codebook size K={self.n_codes} exceeds the {latents.n_tokens} training tokens; "
                f"choose K <= {latents.n_tokens}"
            )
        self.layout_ = latents.layout
        self.fit_info_: dict[str, Any] = {}
        self._fit(latents, **fit_options)
        assert self.codebook_.shape == (self.n_codes, latents.token_dim)
        return self

    def encode(self, latents: LatentSet) -> np.ndarray:
        """(N_images, tokens_per_image) int64 codes in [0, K). Without `encode_with_info`'s record, whose checks
        can cost more than the codes of a few images (pull-back measures its rule against the exact one on 2,000
        tokens): `geovq compress` encodes this way."""
        self._check_layout(latents)
        return self._encode_tokens(latents).reshape(latents.n_images, latents.tokens_per_image).astype(np.int64)

    def encode_with_info(self, latents: LatentSet) -> tuple[np.ndarray, dict[str, Any]]:
        """The codes and a JSON-safe record of how they were made: `seconds` (the encode itself) plus
        whatever the method adds (`_encode_info`, e.g. how an approximate rule agrees with the exact one)."""
        self._check_layout(latents)
        t0 = time.perf_counter()
        codes = self._encode_tokens(latents)
        info = self.encode_record(latents, codes, time.perf_counter() - t0, self.encode_stats())
        return codes.reshape(latents.n_images, latents.tokens_per_image).astype(np.int64), info

    def encode_stats(self) -> dict[str, float]:
        """Additive figures of the last encode (seconds of its steps, tokens it settled exactly, ...), which its
        record reports; when shards of a split are encoded apart (the Ray Data codes stage), their sum: a method's
        encode keeps them in `self._encode_stats` ({} unless it keeps some)."""
        return {k: float(v) for k, v in getattr(self, "_encode_stats", {}).items()}

    def encode_record(self, latents: LatentSet, codes: np.ndarray, seconds: float, stats: dict[str, float]
                      ) -> dict[str, Any]:
        """`encode_with_info`'s record of `codes` of `latents` made in `seconds` with `stats` (`encode_stats`,
        summed over shards): also for codes made elsewhere, e.g. by the Ray Data codes stage's actors."""
        self._set_encode_stats(dict(stats))
        return {"seconds": seconds, **self._encode_info(latents, np.asarray(codes).reshape(-1))}

    def _set_encode_stats(self, stats: dict[str, float]) -> None:
        """Take `stats` as the last encode's (see `encode_stats`)."""
        self._encode_stats = stats

    def _check_layout(self, latents: LatentSet) -> None:
        self._check_fitted()
        if latents.layout.token_dim != self.layout_.token_dim or latents.layout.grouping != self.layout_.grouping:
            raise GeovqError(f"latents have layout {latents.layout}, but this quantizer was fit on {self.layout_}")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Token vectors of shape codes.shape + (d,)."""
        self._check_fitted()
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise GeovqError(f"codes must lie in [0, {self.n_codes}); got [{codes.min()}, {codes.max()}]")
        return self.codebook_[codes]

    # -- persistence ------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Fitted arrays beyond the codebook; override to add more."""
        return {}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what `state` returned (called by `load` after the codebook and layout are set)."""

    def save(self, path: str | os.PathLike) -> None:
        self._check_fitted()
        header = {"format": FORMAT, "version": 2, "method": self.name, "class": quantizer_path(type(self)),
                  "params": self.get_params(), "layout": self.layout_.as_dict(), "fit_info": self.fit_info_}
        save_npz(path, header=np.array(json.dumps(header)), codebook=self.codebook_,
                 **{f"state_{k}": v for k, v in self.state().items()})

    @staticmethod
    def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            with np.load(path, allow_pickle=False) as f:
                header = json.loads(str(f["header"]))
                arrays = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise GeovqError(f"quantizer file {path} does not exist") from None
        except Exception as e:  # zip, JSON or array errors: corrupt or foreign. Never suggest allow_pickle.
            raise GeovqError(f"{path} is not a readable geovq quantizer file ({type(e).__name__}); delete it "
                             "and the unit is fitted again") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise GeovqError(f"{path} is not a geovq quantizer file (no '{FORMAT}' header)")
        return header, arrays

    @staticmethod
    def load_class(path: str | os.PathLike) -> type["Quantizer"]:
        """The class a saved quantizer file belongs to (e.g. to see if it needs a decoder)."""
        header = Quantizer._read(path)[0]
        return get_quantizer_class(header["method"], header.get("class"))

    @classmethod
    def load(cls, path: str | os.PathLike, **runtime: Any) -> "Quantizer":
        """Load any registered quantizer; `runtime` passes what is not stored (e.g. `decoder=`)."""
        header, arrays = cls._read(path)
        qcls = get_quantizer_class(header["method"], header.get("class"))
        if cls is not Quantizer and qcls is not cls:
            raise GeovqError(f"{path} holds a {header['method']!r} quantizer, not {cls.name!r}")
        q = qcls(**header["params"], **runtime)
        q.layout_ = TokenLayout(**header["layout"])
        q.fit_info_ = header["fit_info"]
        q.codebook_ = arrays["codebook"]
        q.set_state({k[len("state_"):]: v for k, v in arrays.items() if k.startswith("state_")})
        return q

    # -- for subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, latents: LatentSet) -> None:
        """Set `self.codebook_` (K, d), `self.fit_info_`, and anything `_encode_tokens` needs."""

    @abstractmethod
    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        """(N·T,) codes for the tokens of `latents`, in token order."""

    def _encode_info(self, latents: LatentSet, codes: np.ndarray) -> dict[str, Any]:
        """Method-specific figures of an encode (JSON-safe); none by default."""
        return {}

    def _check_fitted(self) -> None:
        if getattr(self, "codebook_", None) is None:
            raise GeovqError(f"{self.name} quantizer is not fitted: call fit(train_latents) first")


def _scalar_type(hint: Any, where: str) -> tuple[type, bool]:
    """(int/float/str/bool, whether None is allowed) of a hyperparameter's annotation."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"hyperparameter {where} must be annotated int, float, str or bool (optionally | None); "
                        f"got {hint!r}")
    return kinds[0], optional


def _comments(cls: type[Configurable]) -> dict[str, str]:
    """{name: comment} of the constructor's `self.name = name  # comment` lines (help texts, said once)."""
    try:
        source = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"self\.(\w+) = \w+\s*#\s*(.+)", source)
    return {name: text.strip() for name, text in found}


def quantizer_path(cls: type[Quantizer]) -> str:
    """'module:QualName': where a worker process imports the class from."""
    return f"{cls.__module__}:{cls.__qualname__}"


def get_quantizer_class(name: str, path: str | None = None) -> type[Quantizer]:
    """The class registered as `name`; `path` ('module:Class') imports it first where it lives outside
    geovq (a worker process has not imported the user's module)."""
    from geovq import quantize  # noqa: F401  (imports every method module, filling the registry)

    if name not in QUANTIZERS and path:
        module = path.partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise GeovqError(f"quantizer {name!r} lives in module {module!r}, which cannot be imported here ({e}); "
                             "install it (or put it on PYTHONPATH) on every node") from None
    if name not in QUANTIZERS:
        raise GeovqError(f"unknown quantizer {name!r}; valid: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def make_quantizer(name: str, n_codes: int, seed: int = 0, **kwargs: Any) -> Quantizer:
    """Construct (and validate) a registered quantizer by name, e.g. `make_quantizer("kmeans", 256)`."""
    return get_quantizer_class(name)(n_codes=n_codes, seed=seed, **kwargs).validate()
