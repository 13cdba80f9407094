"""The one interface every post-hoc quantizer implements, and the registry that names them.

Like a scikit-learn estimator: construct with hyper-parameters, `fit(train_latents) -> self`, then
`encode(latents) -> (N, T) int codes` for any split and `decode(codes) -> (..., d) token vectors`.
`save`/`load` round-trip through one .npz file (no pickle). A quantizer that needs the decoder receives it
at construction (and again at `load`); `save` records which checkpoint it belongs to.

Adding a method = adding one module in this package that defines a `Quantizer` subclass decorated with
`@register("name")`; `geovq.quantize` imports every module of the package, so nothing else changes.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np

from geovq.errors import GeovqError
from geovq.io import save_npz
from geovq.latents import LatentSet, TokenLayout

QUANTIZERS: dict[str, type["Quantizer"]] = {}
Q = TypeVar("Q", bound="Quantizer")


def register(name: str):
    def wrap(cls: type[Q]) -> type[Q]:
        if name in QUANTIZERS:
            raise RuntimeError(f"quantizer {name!r} registered twice")
        cls.name = name
        QUANTIZERS[name] = cls
        return cls

    return wrap


class Quantizer(ABC):
    """Base class. Subclasses implement `_fit`, `_encode_tokens`, and list extra saved arrays."""

    name: ClassVar[str] = ""
    #: whether the constructor takes a `decoder=` argument (geometry-aware methods)
    needs_decoder: ClassVar[bool] = False

    def __init__(self, n_codes: int, seed: int = 0) -> None:
        if int(n_codes) < 2:
            raise GeovqError(f"codebook size K={n_codes} must be at least 2")
        self.n_codes = int(n_codes)
        self.seed = int(seed)
        self.codebook: np.ndarray | None = None  # (K, d): what `decode` returns for each code
        self.layout: TokenLayout | None = None
        self.fit_info: dict[str, Any] = {}  # diagnostics of the fit (iterations, objective, …)

    # -- the estimator interface ------------------------------------------------------------------
    def fit(self: Q, latents: LatentSet) -> Q:
        if self.n_codes > latents.n_tokens:
            raise GeovqError(
                f"codebook size K={self.n_codes} exceeds the {latents.n_tokens} training tokens; "
                f"choose K <= {latents.n_tokens}"
            )
        self.layout = latents.layout
        self._fit(latents)
        assert self.codebook is not None and self.codebook.shape == (self.n_codes, latents.token_dim)
        return self

    def encode(self, latents: LatentSet) -> np.ndarray:
        """(N_images, tokens_per_image) int64 codes in [0, K)."""
        self._check_fitted()
        if latents.layout.token_dim != self.layout.token_dim or latents.layout.grouping != self.layout.grouping:
            raise GeovqError(f"latents have layout {latents.layout}, but this quantizer was fit on {self.layout}")
        codes = self._encode_tokens(latents)
        return codes.reshape(latents.n_images, latents.tokens_per_image).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Token vectors of shape codes.shape + (d,)."""
        self._check_fitted()
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise GeovqError(f"codes must lie in [0, {self.n_codes}); got [{codes.min()}, {codes.max()}]")
        return self.codebook[codes]

    # -- persistence ------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that `load` passes back."""
        return {"n_codes": self.n_codes, "seed": self.seed}

    def state(self) -> dict[str, np.ndarray]:
        """Fitted arrays beyond the codebook; override to add more."""
        return {}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    def save(self, path: str | os.PathLike) -> None:
        self._check_fitted()
        header = {"format": "geovq-quantizer", "version": 1, "method": self.name, "params": self.params(),
                  "layout": self.layout.as_dict(), "fit_info": self.fit_info}
        save_npz(path, header=np.array(json.dumps(header)), codebook=self.codebook,
                 **{f"state_{k}": v for k, v in self.state().items()})

    @staticmethod
    def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            with np.load(path, allow_pickle=False) as f:
                header = json.loads(str(f["header"]))
                arrays = {k: f[k] for k in f.files}
        except (OSError, KeyError, ValueError) as e:
            raise GeovqError(f"{path} is not a geovq quantizer file ({e})") from e
        if header.get("format") != "geovq-quantizer":
            raise GeovqError(f"{path} is not a geovq quantizer file (format {header.get('format')!r})")
        return header, arrays

    @staticmethod
    def load_class(path: str | os.PathLike) -> type["Quantizer"]:
        """The registered class a saved quantizer file belongs to (e.g. to see if it needs a decoder)."""
        return get_quantizer_class(Quantizer._read(path)[0]["method"])

    @classmethod
    def load(cls, path: str | os.PathLike, **runtime: Any) -> "Quantizer":
        """Load any registered quantizer; `runtime` passes what is not stored (e.g. `decoder=`)."""
        header, arrays = cls._read(path)
        qcls = get_quantizer_class(header["method"])
        if cls is not Quantizer and qcls is not cls:
            raise GeovqError(f"{path} holds a {header['method']!r} quantizer, not {cls.name!r}")
        q = qcls(**header["params"], **runtime)
        q.layout = TokenLayout(**header["layout"])
        q.fit_info = header["fit_info"]
        q.codebook = arrays["codebook"]
        q.set_state({k[len("state_"):]: v for k, v in arrays.items() if k.startswith("state_")})
        return q

    # -- for subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, latents: LatentSet) -> None:
        """Set `self.codebook` (K, d) and anything `_encode_tokens` needs."""

    @abstractmethod
    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        """(N·T,) codes for the tokens of `latents`, in token order."""

    def _check_fitted(self) -> None:
        if self.codebook is None:
            raise GeovqError(f"{self.name} quantizer is not fitted: call fit(train_latents) first")


def get_quantizer_class(name: str) -> type[Quantizer]:
    from geovq import quantize  # noqa: F401  (imports every method module, filling the registry)

    if name not in QUANTIZERS:
        raise GeovqError(f"unknown quantizer {name!r}; valid: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def make_quantizer(name: str, n_codes: int, seed: int = 0, **kwargs: Any) -> Quantizer:
    """Construct a registered quantizer by name, e.g. `make_quantizer("kmeans", 256)`."""
    return get_quantizer_class(name)(n_codes=n_codes, seed=seed, **kwargs)
