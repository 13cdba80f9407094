"""End-to-end methods: the quantizer sits inside the autoencoder and is trained with it (DESIGN.md §3.1), on the
same trunk and token grid as the Gaussian VAE the post-hoc methods quantize, at the same bits per image.

- `vqvae`: nearest of K EMA codewords (geovq.models.vqvae.VQVAE; its codebook settings are the `vq.*` training
  settings, which `--set vq.commitment=...` and a search space's `vqvae:` section name);
- `fsq`: finite scalar quantization (Mentzer et al. 2023): each of a few projected dimensions rounded to one of
  L_i levels, prod L_i = K;
- `lfq`: lookup-free quantization (Yu et al. 2023, MAGVIT-v2): log2 K projected dimensions, each its sign;
- `rvq`: residual VQ (Zeghidour et al. 2021): Q stages of K_q EMA codewords, each quantizing what the stages
  before it left, K_q ** Q = K.

fsq, lfq and rvq are vector-quantize-pytorch's, wrapped by `geovq.models.bottlenecks` to give one code in [0, K)
per token, so that priors, samples and every column treat them like any other method. A projection a baseline
needs to its own dimension (FSQ's len(levels), LFQ's log2 K) is part of that baseline and counted in its
parameters.

Like a post-hoc quantizer, a method's hyperparameters are its constructor's keyword arguments (`Configurable`):
options (`--fsq-levels`), search-space entries (`methods.fsq.levels`) and the run configuration derive from the
signature. An end-to-end unit's params hold those beside dotted training settings ("train.lr"; `split_params`).
Light module: no torch at import, as the CLI imports it to derive its options.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from geovq.config import END_TO_END
from geovq.errors import GeovqError
from geovq.quantize.base import Configurable, check_method_name, power_of_two_bits

if TYPE_CHECKING:
    from torch import nn

#: the most levels FSQ's default rule gives one dimension (the paper's level sets stay at or below 8)
FSQ_MAX_LEVEL_BITS = 3


class EndToEndMethod(Configurable):
    """One end-to-end method at K codes: its hyperparameters, their rules, and the bottleneck it builds."""

    #: whether the model it trains is the VQ-VAE (whose codebook VQVAE builds from VQConfig)
    is_vqvae: ClassVar[bool] = False

    def bottleneck(self, token_dim: int) -> nn.Module:
        """A `geovq.models.bottlenecks.Bottleneck` over tokens of `token_dim` channels (torch imported here)."""
        raise NotImplementedError


END_TO_END_METHODS: dict[str, type[EndToEndMethod]] = {}


def register_end_to_end(name: str):
    def wrap(cls: type[EndToEndMethod]) -> type[EndToEndMethod]:
        check_method_name(name)
        assert name in END_TO_END, f"{name} must be listed in geovq.config.END_TO_END"
        cls.name = name
        END_TO_END_METHODS[name] = cls
        return cls

    return wrap


def _power_of_two_bits(method: str, n_codes: int) -> int:
    """log2 K, or a GeovqError naming K and the nearest valid sizes (`quantize.base.power_of_two_bits`)."""
    return power_of_two_bits(n_codes, f"{method} at K={n_codes}: K must be a power of two (its codes are whole bits)")


@register_end_to_end("vqvae")
class VQVAEMethod(EndToEndMethod):
    """The EMA VQ-VAE. No constructor hyperparameters: its settings are `vq.*` (geovq.config.VQConfig)."""

    is_vqvae = True


@register_end_to_end("fsq")
class FSQMethod(EndToEndMethod):
    def __init__(self, n_codes: int, seed: int = 0, levels: str | None = None) -> None:
        super().__init__(n_codes, seed)
        self.levels = levels  # comma-separated levels per dimension, multiplying to K (default: log2 K bits spread evenly over dimensions of at most 8 levels, K=256 -> 8,8,4)

    def level_list(self) -> list[int]:
        """The levels per dimension. Default: n = ceil(log2 K / 3) dimensions sharing log2 K bits as evenly as
        possible (K=16 -> [4, 4], 128 -> [8, 4, 4], 256 -> [8, 8, 4], 1024 -> [8, 8, 4, 4]): exactly K codes,
        so the row is at the same bits as every other, and no dimension below 4 levels where K allows (the FSQ
        paper finds levels >= 5 best; its own sets, e.g. [8, 6, 5] = 240, do not multiply to a power of two)."""
        if self.levels is not None:
            return [int(v) for v in self.levels.split(",")]
        bits = _power_of_two_bits("fsq", self.n_codes)
        dims = max(1, math.ceil(bits / FSQ_MAX_LEVEL_BITS))
        shares = [bits // dims + (i < bits % dims) for i in range(dims)]
        return [2**b for b in shares]

    def _validate_params(self) -> None:
        if self.levels is not None:
            parts = self.levels.split(",")
            if not all(p.strip().isdigit() and int(p) >= 2 for p in parts):
                raise GeovqError(f"fsq levels={self.levels!r} must be comma-separated integers >= 2, e.g. 8,8,4")
            if math.prod(int(p) for p in parts) != self.n_codes:
                raise GeovqError(f"fsq levels={self.levels!r} multiply to {math.prod(int(p) for p in parts)}, not "
                                 f"K={self.n_codes}: every row must carry log2 K bits per token")
        else:
            self.level_list()  # K a power of two

    def bottleneck(self, token_dim: int) -> nn.Module:
        from geovq.models.bottlenecks import FSQBottleneck

        return FSQBottleneck(token_dim, self.level_list())


@register_end_to_end("lfq")
class LFQMethod(EndToEndMethod):
    def __init__(self, n_codes: int, seed: int = 0, entropy_weight: float = 0.1, commitment: float = 0.25,
                 diversity_gamma: float = 1.0) -> None:
        super().__init__(n_codes, seed)
        self.entropy_weight = entropy_weight  # weight of the entropy penalty (MAGVIT-v2: 0.1)
        self.commitment = commitment  # weight of the commitment term (MAGVIT-v2: 0.25)
        self.diversity_gamma = diversity_gamma  # weight of the codebook-entropy (diversity) part of the penalty

    def _validate_params(self) -> None:
        _power_of_two_bits("lfq", self.n_codes)
        for name in ("entropy_weight", "commitment", "diversity_gamma"):
            if getattr(self, name) < 0:
                raise GeovqError(f"lfq {name}={getattr(self, name)} must be >= 0")

    def bottleneck(self, token_dim: int) -> nn.Module:
        from geovq.models.bottlenecks import LFQBottleneck

        return LFQBottleneck(token_dim, self.n_codes, self.entropy_weight, self.commitment, self.diversity_gamma)


@register_end_to_end("rvq")
class RVQMethod(EndToEndMethod):
    def __init__(self, n_codes: int, seed: int = 0, stages: int = 2, decay: float = 0.99, commitment: float = 0.25,
                 dead_code_ratio: float = 0.1) -> None:
        super().__init__(n_codes, seed)
        self.stages = stages  # Q residual stages of K ** (1/Q) codes each (K=256, Q=2: two stages of 16)
        self.decay = decay  # EMA decay of each stage's codebook (as the VQ-VAE's)
        self.commitment = commitment  # β of the commitment term (as the VQ-VAE's)
        self.dead_code_ratio = dead_code_ratio  # a code whose EMA usage falls below this fraction of the mean code's is restarted from batch tokens

    def stage_codes(self) -> int:
        """K_q, the codes of each stage: K_q ** Q = K."""
        k_q = round(self.n_codes ** (1 / self.stages))
        if k_q < 2 or k_q**self.stages != self.n_codes:
            valid = [q for q in range(1, int(math.log2(self.n_codes)) + 1)
                     if round(self.n_codes ** (1 / q)) ** q == self.n_codes]
            raise GeovqError(f"rvq stages={self.stages} at K={self.n_codes}: K must be K_q ** stages for a whole "
                             f"K_q >= 2; valid stages: {', '.join(map(str, valid))}")
        return k_q

    def _validate_params(self) -> None:
        if self.stages < 1:
            raise GeovqError(f"rvq stages={self.stages} must be >= 1")
        self.stage_codes()
        if not 0 <= self.decay < 1:
            raise GeovqError(f"rvq decay={self.decay} must be in [0, 1)")
        if self.commitment < 0:
            raise GeovqError(f"rvq commitment={self.commitment} must be >= 0")
        if not 0 <= self.dead_code_ratio < 1:
            raise GeovqError(f"rvq dead_code_ratio={self.dead_code_ratio} must be in [0, 1) (0: no restarts)")

    def bottleneck(self, token_dim: int) -> nn.Module:
        from geovq.models.bottlenecks import RVQBottleneck

        return RVQBottleneck(token_dim, self.stage_codes(), self.stages, self.decay, self.commitment,
                             self.dead_code_ratio)


def end_to_end_class(name: str) -> type[EndToEndMethod]:
    if name not in END_TO_END_METHODS:
        raise GeovqError(f"unknown end-to-end method {name!r}; valid: {', '.join(END_TO_END_METHODS)}")
    return END_TO_END_METHODS[name]


def split_params(params: Any) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """An end-to-end unit's params -> (its dotted training settings, e.g. ("train.lr", 1e-3), as
    SweepConfig.settings takes them; its method's constructor hyperparameters)."""
    items = dict(params).items()
    return tuple((k, v) for k, v in items if "." in k), {k: v for k, v in items if "." not in k}


def end_to_end_method(name: str, n_codes: int, seed: int, params: Any = ()) -> EndToEndMethod:
    """The validated method of an end-to-end unit (its params' constructor part)."""
    return end_to_end_class(name)(n_codes=n_codes, seed=seed, **split_params(params)[1]).validate()
