"""Target Divergence Constraint (TDC): train a Gaussian VAE so that every token carries ≈ log2 K bits of KL.

GQ can only represent a token well when its codebook holds about 2^KL codewords "inside" the posterior
(DESIGN.md §3.5): tokens with more KL than T = log2 K bits are quantized badly, tokens with much less waste
rate. TDC (DESIGN.md §3.6) replaces the VAE's KL term by

    0.1 · λ · mean over images of Σ_tokens w · KL_token(bits),
    w = λ_max if KL > T + τ,  1 if |KL − T| <= τ,  λ_min if KL < T − τ   (constants in the gradient)

and adapts the three multipliers after every step from the batch's mean / max / min token KL: λ steers the
mean KL to T, λ_max pushes the upper tail down and λ_min lets the lower tail rise. Typical use:

    tdc = TDCController(target_bits=math.log2(K))
    kl = token_kl_bits(mu, logvar, layout)          # (B, T), differentiable
    loss = recon_nll_per_image.mean() + tdc.loss(kl)
    loss.backward(); opt.step(); tdc.update(kl)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from geovq.config import TDCConfig
from geovq.errors import GeovqError
from geovq.latents import TokenLayout

#: The TDC term's fixed scale beside a reconstruction NLL summed per image.
LOSS_SCALE = 0.1
_DEFAULTS = TDCConfig()


def token_kl_bits(mu: torch.Tensor, logvar: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, T) KL(N(μ, σ²) ‖ N(0, I)) of each token in bits, for channels-first (B, C, h, w) encoder outputs.

    Tokens are cut and ordered exactly as `TokenLayout.grid_to_tokens` (row, column, group), so entry
    [n, i] is the KL of token i of image n in any `LatentSet` built from the same grids.
    """
    expected = (layout.channels, layout.height, layout.width)
    if mu.shape != logvar.shape or mu.ndim != 4 or tuple(mu.shape[1:]) != expected:
        raise GeovqError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (B, C, h, w) = "
                         f"(B, {', '.join(map(str, expected))}) for the token layout")
    kl_per_channel = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)  # (B, C, h, w) nats
    return layout.grid_to_tokens(kl_per_channel.permute(0, 2, 3, 1)).sum(-1) / math.log(2.0)  # (B, T)


@dataclass
class TDCController:
    """The TDC loss and its multiplier state; `state_dict` holds plain floats for weights_only checkpoints.

    Defaults are `geovq.config.TDCConfig`'s; `from_config` builds one from a run's settings.
    """

    target_bits: float
    tolerance: float = _DEFAULTS.tolerance
    factor: float = _DEFAULTS.factor
    lam: float = _DEFAULTS.initial_lambda
    lam_min: float = 1.0
    lam_max: float = 1.0
    lambda_max_limit: float = _DEFAULTS.lambda_max_limit
    lambda_min_limit: float = _DEFAULTS.lambda_min_limit

    def __post_init__(self) -> None:
        TDCConfig(self.tolerance, self.factor, self.lam, self.lambda_max_limit, self.lambda_min_limit
                  ).check(self.target_bits)

    @classmethod
    def from_config(cls, target_bits: float, cfg: TDCConfig) -> TDCController:
        return cls(target_bits, cfg.tolerance, cfg.factor, cfg.initial_lambda,
                   lambda_max_limit=cfg.lambda_max_limit, lambda_min_limit=cfg.lambda_min_limit)

    @property
    def upper(self) -> float:
        return self.target_bits + self.tolerance

    @property
    def lower(self) -> float:
        return self.target_bits - self.tolerance

    def token_weights(self, kl_bits: torch.Tensor) -> torch.Tensor:
        """w per token: λ_max above the band, 1 inside it, λ_min below it; no gradient flows through w."""
        kl = kl_bits.detach()
        weights = torch.ones_like(kl)
        weights[kl > self.upper] = self.lam_max
        weights[kl < self.lower] = self.lam_min
        return weights

    def loss(self, kl_bits: torch.Tensor) -> torch.Tensor:
        """0.1 · λ · mean over images of Σ_tokens w · KL, for kl_bits shaped (B, T) (bits per token)."""
        if kl_bits.ndim != 2:
            raise GeovqError(f"kl_bits must be (images, tokens); got shape {tuple(kl_bits.shape)}")
        weighted = (self.token_weights(kl_bits) * kl_bits).sum(1)
        return LOSS_SCALE * self.lam * weighted.mean()

    @torch.no_grad()
    def update(self, kl_bits: torch.Tensor) -> None:
        """One multiplicative step of λ, λ_max, λ_min from this batch's token KLs (call after each step)."""
        f = self.factor
        mean, low, high = kl_bits.mean().item(), kl_bits.min().item(), kl_bits.max().item()
        self.lam = self.lam * f if mean > self.target_bits else self.lam / f
        self.lam_max = _clip(self.lam_max * f if high > self.upper else self.lam_max / f, 1.0, self.lambda_max_limit)
        self.lam_min = _clip(self.lam_min / f if low < self.lower else self.lam_min * f, self.lambda_min_limit, 1.0)

    def state_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the multipliers; the checkpoint's T, τ and f must equal this controller's."""
        for key in ("target_bits", "tolerance", "factor"):
            if float(state[key]) != getattr(self, key):
                raise GeovqError(f"checkpoint has TDC {key}={state[key]}, but this run asks for "
                                 f"{getattr(self, key)}; resume with the checkpoint's value")
        self.lam, self.lam_min, self.lam_max = float(state["lam"]), float(state["lam_min"]), float(state["lam_max"])


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
