"""The continuous Gaussian VAE: q(z|x) = N(μ(x), diag σ²(x)) on an h×w×C grid, prior N(0, I)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geovq.config import TrunkConfig
from geovq.models.trunk import Decoder, Encoder


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element reconstruction loss of the decoder's predicted mean sigmoid(logits) against x."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    if kind == "mse":
        return (torch.sigmoid(logits) - x) ** 2
    raise ValueError(f"unknown reconstruction loss {kind!r}; valid: bce, mse")


class GaussianVAE(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels)  # μ and log σ²
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) posterior mean and log-variance (clamped so σ stays in a sane numeric range)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), mu, logvar

    def loss(self, x: torch.Tensor, recon: str, beta: float) -> dict[str, torch.Tensor]:
        """Negative ELBO per image: reconstruction NLL summed per image + β·KL summed per image."""
        logits, mu, logvar = self(x)
        nll = reconstruction_nll(logits, x, recon).flatten(1).sum(1).mean()
        kl_elems = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)  # (B, C, h, w) nats
        kl = kl_elems.flatten(1).sum(1).mean()
        return {"loss": nll + beta * kl, "nll": nll, "kl": kl, "kl_elems": kl_elems, "logits": logits,
                "mu": mu, "logvar": logvar}
