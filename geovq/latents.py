"""The latent set: posterior means and log-variances on an h×w×C grid, cut into tokens.

A token is a group of `token_dim` (d) channels at one grid cell (DESIGN.md §2). With d = C there is one
token per cell; with d < C a cell holds C/d tokens, grouped `contiguous` (channels [g·d, (g+1)·d)) or
`interleaved` (channels g, g+G, g+2G, … with G = C/d). Tokens are ordered image-major, then row, column,
group, so every token can be put back in its image: `image_index`, `cell` and `group` say where it lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from geovq.errors import GeovqError
from geovq.io import save_npz

GROUPINGS = ("contiguous", "interleaved")


@dataclass(frozen=True)
class TokenLayout:
    """How a grid h×w×C is cut into tokens of d channels; shared by every method so rates match."""

    height: int
    width: int
    channels: int
    token_dim: int
    grouping: str = "contiguous"

    def __post_init__(self) -> None:
        if self.token_dim < 1 or self.channels % self.token_dim:
            raise GeovqError(
                f"token_dim d={self.token_dim} must divide the latent channels C={self.channels} "
                f"(valid: {[d for d in range(1, self.channels + 1) if self.channels % d == 0]})"
            )
        if self.grouping not in GROUPINGS:
            raise GeovqError(f"grouping {self.grouping!r} is unknown; valid: {', '.join(GROUPINGS)}")

    @property
    def groups(self) -> int:
        return self.channels // self.token_dim

    @property
    def tokens_per_image(self) -> int:
        return self.height * self.width * self.groups

    def group_channels(self) -> np.ndarray:
        """(groups, d) array: the channel indices that make up each group."""
        g, d = self.groups, self.token_dim
        if self.grouping == "contiguous":
            return np.arange(self.channels).reshape(g, d)
        return np.arange(self.channels).reshape(d, g).T

    # The one token-layout permutation. Every place that cuts a grid into tokens or puts tokens back
    # (latent sets, the VQ-VAE, TDC's per-token KL, the geometry's token decoders) goes through these, so
    # token i means the same channels everywhere. They accept numpy arrays and torch tensors alike
    # (indexing with a numpy permutation works on both and keeps autograd).
    def grid_to_tokens(self, grid):
        """(N, h, w, C) channels-last grid -> (N, T, d), tokens ordered row, column, group."""
        n = grid.shape[0]
        return grid[..., self.group_channels().reshape(-1)].reshape(n, self.tokens_per_image, self.token_dim)

    def tokens_to_grid(self, tokens):
        """(N, T, d) or (N·T, d) -> (N, h, w, C): the inverse of `grid_to_tokens`."""
        if not hasattr(tokens, "device"):  # a torch tensor stays one; anything else becomes numpy
            tokens = np.asarray(tokens)
        per_cell = tokens.reshape(-1, self.height, self.width, self.channels)  # channels in token order
        return per_cell[..., np.argsort(self.group_channels().reshape(-1))]

    def flat_positions(self, slot_in_image: np.ndarray) -> np.ndarray:
        """(n, d) positions in a grid flattened to h·w·C of the tokens at `slot_in_image` (token order)."""
        cell, group = np.divmod(np.asarray(slot_in_image), self.groups)
        return cell[:, None] * self.channels + self.group_channels()[group]

    def with_token_dim(self, token_dim: int | None, grouping: str | None = None) -> TokenLayout:
        """The same grid cut into tokens of `token_dim` channels (None: keep)."""
        return TokenLayout(self.height, self.width, self.channels, token_dim or self.token_dim,
                           grouping or self.grouping)

    def as_dict(self) -> dict:
        return dict(height=self.height, width=self.width, channels=self.channels,
                    token_dim=self.token_dim, grouping=self.grouping)


@dataclass
class LatentSet:
    """Posterior (μ, log σ²) grids of one split, plus the token layout."""

    mu: np.ndarray  # (N, h, w, C) float32
    logvar: np.ndarray  # (N, h, w, C) float32
    layout: TokenLayout
    #: (N,) each image's index in its whole split, where this set is a shard of it (None: 0..N−1). What draws
    #: per image are seeded by (pull-back's output probes), so that a shard's codes are the whole split's.
    image_ids: np.ndarray | None = None
    #: the number of images of the whole split this set is a shard of (None: this set is the split). Methods whose
    #: encode rule depends on a split's size (pull-back, geodesic: `rule_for`) give a shard its split's rule.
    split_images: int | None = None

    def __post_init__(self) -> None:
        if self.image_ids is not None and np.shape(self.image_ids) != (self.mu.shape[0],):
            raise GeovqError(f"image_ids {np.shape(self.image_ids)} must give one index per image ({self.mu.shape[0]})")
        if self.mu.shape != self.logvar.shape or self.mu.ndim != 4:
            raise GeovqError(f"mu {self.mu.shape} and logvar {self.logvar.shape} must be equal (N, h, w, C) grids")
        if self.mu.shape[1:] != (self.layout.height, self.layout.width, self.layout.channels):
            raise GeovqError(f"latent grid {self.mu.shape[1:]} does not match layout {self.layout}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.logvar).all()):
            raise GeovqError("latents contain NaN or inf values")

    @classmethod
    def from_grids(cls, mu: np.ndarray, logvar: np.ndarray, token_dim: int | None = None,
                   grouping: str = "contiguous") -> LatentSet:
        n, h, w, c = mu.shape
        layout = TokenLayout(h, w, c, token_dim or c, grouping)
        return cls(np.asarray(mu, np.float32), np.asarray(logvar, np.float32), layout)

    @property
    def n_images(self) -> int:
        return self.mu.shape[0]

    @property
    def ids(self) -> np.ndarray:
        """(N,) each image's index in its whole split."""
        return np.arange(self.n_images) if self.image_ids is None else np.asarray(self.image_ids)

    @property
    def split_tokens(self) -> int:
        """Tokens of the whole split this set belongs to (`split_images`; this set's own when it is the split)."""
        return (self.n_images if self.split_images is None else self.split_images) * self.tokens_per_image

    @property
    def tokens_per_image(self) -> int:
        return self.layout.tokens_per_image

    @property
    def n_tokens(self) -> int:
        return self.n_images * self.tokens_per_image

    @property
    def token_dim(self) -> int:
        return self.layout.token_dim

    @cached_property
    def token_mu(self) -> np.ndarray:
        """(N·T, d) token means."""
        return self.layout.grid_to_tokens(self.mu).reshape(-1, self.token_dim)

    @cached_property
    def token_logvar(self) -> np.ndarray:
        return self.layout.grid_to_tokens(self.logvar).reshape(-1, self.token_dim)

    @property
    def token_sigma(self) -> np.ndarray:
        return np.exp(0.5 * self.token_logvar)

    @property
    def image_index(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_images), self.tokens_per_image)

    @property
    def cell(self) -> np.ndarray:
        """(N·T, 2) grid (row, column) of each token."""
        lay = self.layout
        rows, cols = np.divmod(np.arange(lay.height * lay.width), lay.width)
        per_image = np.repeat(np.stack([rows, cols], 1), lay.groups, axis=0)
        return np.tile(per_image, (self.n_images, 1))

    @property
    def group(self) -> np.ndarray:
        return np.tile(np.arange(self.layout.groups), self.n_images * self.layout.height * self.layout.width)

    def token_kl_bits(self) -> np.ndarray:
        """(N·T,) KL(q(z|x) ‖ N(0, I)) of each token in bits, summed over its d channels."""
        mu, lv = self.token_mu.astype(np.float64), self.token_logvar.astype(np.float64)
        return 0.5 * (mu**2 + np.exp(lv) - 1.0 - lv).sum(1) / np.log(2.0)

    def token_kl_bits_grid(self) -> np.ndarray:
        """(N, h, w, groups) the same KLs placed at their images' grid cells (token order is row, column, group)."""
        lay = self.layout
        return self.token_kl_bits().reshape(self.n_images, lay.height, lay.width, lay.groups)

    def subset(self, images: np.ndarray) -> LatentSet:
        return LatentSet(self.mu[images], self.logvar[images], self.layout, self.ids[images])

    def with_tokens(self, token_dim: int | None, grouping: str | None = None) -> LatentSet:
        """The same grids cut into tokens of `token_dim` channels (a VAE's latents serve any d)."""
        return LatentSet(self.mu, self.logvar, self.layout.with_token_dim(token_dim, grouping), self.image_ids,
                         self.split_images)

    def save(self, path: str | os.PathLike) -> None:
        save_npz(path, mu=self.mu, logvar=self.logvar, layout=np.array(
            [self.layout.height, self.layout.width, self.layout.channels, self.layout.token_dim]),
            grouping=np.array(self.layout.grouping))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentSet:
        try:
            with np.load(path, allow_pickle=False) as f:
                h, w, c, d = (int(v) for v in f["layout"])
                return cls(f["mu"], f["logvar"], TokenLayout(h, w, c, d, str(f["grouping"])))
        except (OSError, KeyError, ValueError) as e:
            raise GeovqError(f"{path} is not a geovq latent file ({e})") from e
