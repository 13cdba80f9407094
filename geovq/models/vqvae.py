"""End-to-end autoencoders on the same trunk and grid as the Gaussian VAE (DESIGN.md §3.1): the VQ-VAE, and
`QuantizedAE` around the FSQ, LFQ and residual-VQ bottlenecks (geovq.models.bottlenecks). Both map images to
(B, T) codes in [0, K) and codes to images through the same interface (`EndToEndAE`).

The VQ-VAE:

The codebook is learned by exponential moving averages (decay 0.99), initialised by k-means on the first
batches' encoder outputs, and dead codes (EMA usage below a threshold) are restarted from batch latents.
The loss is a per-element mean reconstruction term beside a per-element mean commitment term (β = 0.25):
scaling one as a sum and the other as a mean is what made earlier baselines collapse.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geovq.config import TrunkConfig, VQConfig
from geovq.end_to_end import EndToEndMethod
from geovq.latents import TokenLayout
from geovq.models.trunk import Decoder, Encoder
from geovq.models.vae import reconstruction_nll


class EMACodebook(nn.Module):
    def __init__(self, n_codes: int, dim: int, decay: float, dead_threshold: float) -> None:
        super().__init__()
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, 1e-5
        self.register_buffer("embedding", torch.randn(n_codes, dim))
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword (squared Euclidean) for each row of flat (N, d)."""
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.T + self.embedding.pow(2).sum(1)
        return d2.argmin(1)

    @torch.no_grad()
    def init_from(self, flat: np.ndarray, seed: int) -> None:
        """k-means (k-means++ init, Lloyd to convergence) on encoder outputs."""
        from sklearn.cluster import KMeans

        km = KMeans(self.embedding.shape[0], init="k-means++", n_init=1, random_state=seed).fit(flat)
        centers = torch.as_tensor(km.cluster_centers_, dtype=self.embedding.dtype, device=self.embedding.device)
        self.embedding.copy_(centers)
        self.embed_sum.copy_(centers)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> int:
        """One EMA step on a batch; restarts dead codes from batch vectors. Returns how many restarted."""
        onehot = F.one_hot(codes, self.embedding.shape[0]).type(flat.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps a barely used code from dividing by ~0.
        smoothed = (self.cluster_size + self.eps) / (n + self.embedding.shape[0] * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
            self.embedding[dead] = flat[pick]
            self.embed_sum[dead] = flat[pick] * self.dead_threshold
            self.cluster_size[dead] = self.dead_threshold
        return n_dead


class EndToEndAE(nn.Module):
    """Encoder -> tokens (cut by `layout`) -> K codes -> decoder. Subclasses set `encoder`, `decoder` and implement
    `quantize` and `code_vectors`."""

    layout: TokenLayout
    n_codes: int

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) encoder outputs of images, cut into tokens."""
        return self.layout.grid_to_tokens(self.encoder(x).permute(0, 2, 3, 1))

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) int64 codes of images and the (B, T, d) encoder tokens they quantize."""
        raise NotImplementedError

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) codes -> the (B, T, d) token vectors the decoder receives."""
        raise NotImplementedError

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 codes of images."""
        return self.quantize(x)[0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) codes -> predicted images in [0, 1]."""
        return self.decoder.mean(self._grid(self.code_vectors(codes)))

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, C, h, w) decoder input."""
        return self.layout.tokens_to_grid(tokens).permute(0, 3, 1, 2)


class VQVAE(EndToEndAE):
    """Encoder -> tokens (cut by `layout`) -> nearest of K EMA codewords -> decoder."""

    def __init__(self, cfg: TrunkConfig, layout: TokenLayout, n_codes: int, vq: VQConfig) -> None:
        super().__init__()
        self.cfg, self.layout, self.n_codes, self.vq = cfg, layout, n_codes, vq
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.decoder = Decoder(cfg)
        self.codebook = EMACodebook(n_codes, layout.token_dim, vq.decay, vq.dead_code_threshold)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(x)
        return self.codebook.nearest(tokens.reshape(-1, self.layout.token_dim)).reshape(x.shape[0], -1), tokens

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook.embedding[codes]

    def loss(self, x: torch.Tensor, recon: str) -> dict[str, torch.Tensor]:
        tokens = self.tokens(x)
        flat = tokens.reshape(-1, self.layout.token_dim)
        codes = self.codebook.nearest(flat.detach())
        quantized = self.codebook.embedding[codes].view_as(tokens)
        commit = F.mse_loss(tokens, quantized.detach())  # per-element mean
        straight_through = tokens + (quantized - tokens).detach()
        logits = self.decoder(self._grid(straight_through))
        nll = reconstruction_nll(logits, x, recon).mean()  # per-element mean, like the commitment term
        restarted = self.codebook.ema_update(flat.detach(), codes) if self.training else 0
        return {"loss": nll + self.vq.commitment * commit, "nll": nll, "commit": commit, "logits": logits,
                "codes": codes, "restarted": torch.tensor(float(restarted))}


class QuantizedAE(EndToEndAE):
    """Encoder -> tokens -> an FSQ, LFQ or residual-VQ bottleneck (`method.bottleneck`) -> decoder. The loss is the
    per-element mean reconstruction term plus the bottleneck's own auxiliary loss (LFQ's entropy and commitment
    terms, residual VQ's commitment; none for FSQ)."""

    def __init__(self, cfg: TrunkConfig, layout: TokenLayout, method: EndToEndMethod) -> None:
        super().__init__()
        self.cfg, self.layout, self.n_codes, self.method = cfg, layout, method.n_codes, method
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.decoder = Decoder(cfg)
        self.bottleneck = method.bottleneck(layout.token_dim)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(x)
        return self.bottleneck(tokens)[1], tokens

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return self.bottleneck.code_vectors(codes)

    def loss(self, x: torch.Tensor, recon: str) -> dict[str, torch.Tensor]:
        quantized, codes, aux = self.bottleneck(self.tokens(x))
        logits = self.decoder(self._grid(quantized))
        nll = reconstruction_nll(logits, x, recon).mean()  # per-element mean, as the VQ-VAE's
        return {"loss": nll + aux, "nll": nll, "aux": aux.detach(), "logits": logits, "codes": codes}
