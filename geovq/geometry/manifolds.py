"""Analytic manifolds with closed-form geodesic distances, in any latent dimension d: accuracy checks.

Each case is a decoder f: R^d -> R^D (a torch function of (B, d) latents, any float dtype) whose pull-back
metric JᵀJ has known geodesics, and a sampler of latents whose *intrinsic* region is geodesically convex, so
that the distance along the sampled region and the distance in the whole latent space agree:

- `warped_flat(d)`: z ↦ u = R z (a fixed rotation), y_k = sinh(s_k u_k)/s_k (a monotone warp per coordinate,
  s_k ∈ [0.5, 2]), then an isometric embedding that rolls each coordinate pair (y_1, y_2) into a cylinder
  (r cos(y_1/r), r sin(y_1/r), y_2). The metric is flat but anisotropic and varies along every curve, and its
  eigen-directions are not the latent axes. y is a global diffeomorphism of R^d, so the geodesic distance is
  ‖y_a − y_b‖; latents are drawn uniformly in the y-cube [−1.5, 1.5]^d (convex).
- `sphere(d)`: inverse stereographic projection z ↦ (2z, |z|² − 1)/(|z|² + 1) onto the unit sphere S^d ⊂
  R^{d+1}: a conformal metric 4/(1 + |z|²)² I, curved; the distance is the great-circle angle. Latents are the
  projections of points drawn uniformly on the southern hemisphere (a convex cap), i.e. |z| ≤ 1.
- `warped_sphere(d)`: the sphere behind the same rotation-and-warp (z ↦ stereographic⁻¹(y(z)), y ∈ unit
  ball): curved and anisotropic; the distance is still the great-circle angle of the images.

`MANIFOLDS` names them; `make(name, d)` builds one. Tests and benches use the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from geovq.errors import GeovqError

#: half-width of the y-cube warped_flat samples in (large enough that the warp is strongly nonlinear)
FLAT_HALF_WIDTH = 1.5
#: radius of the cylinders warped_flat rolls coordinate pairs into (chords then differ from arcs)
ROLL_RADIUS = 1.0


@dataclass(frozen=True)
class AnalyticManifold:
    """A decoder with closed-form geodesic distances. `intrinsic(z)` maps latents (n, d) to coordinates in
    which the distance is closed-form: Euclidean for flat cases, the unit sphere (angles) for spherical ones."""

    name: str
    dim: int
    decoder: Callable[[torch.Tensor], torch.Tensor]  # (B, d) -> (B, D)
    intrinsic: Callable[[np.ndarray], np.ndarray]  # (n, d) latents -> (n, D') coordinates
    spherical: bool  # distance = angle between intrinsic unit vectors (else Euclidean distance)
    draw: Callable[[int, np.random.Generator], np.ndarray]  # n latents (n, d) of the convex sampled region

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.draw(n, rng)

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n,) geodesic distance between row i of latents `a` and row i of `b` (n, d)."""
        xa, xb = self.intrinsic(np.asarray(a, np.float64)), self.intrinsic(np.asarray(b, np.float64))
        if self.spherical:
            return np.arccos(np.clip((xa * xb).sum(1), -1.0, 1.0))
        return np.linalg.norm(xa - xb, axis=1)

    def pairwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) geodesic distances between all rows of `a` and of `b`."""
        xa, xb = self.intrinsic(np.asarray(a, np.float64)), self.intrinsic(np.asarray(b, np.float64))
        if self.spherical:
            return np.arccos(np.clip(xa @ xb.T, -1.0, 1.0))
        return np.sqrt(np.maximum((xa**2).sum(1)[:, None] + (xb**2).sum(1)[None] - 2 * xa @ xb.T, 0.0))


class _Warp:
    """y = sinh(s ∘ (R z)) / s: a fixed random rotation R, then a monotone warp per coordinate."""

    def __init__(self, d: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]  # orthogonal
        self.scale = rng.uniform(0.5, 2.0, d)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        rotation = torch.as_tensor(self.rotation, dtype=z.dtype, device=z.device)
        scale = torch.as_tensor(self.scale, dtype=z.dtype, device=z.device)
        return torch.sinh((z @ rotation.T) * scale) / scale

    def forward(self, z: np.ndarray) -> np.ndarray:
        return np.sinh((z @ self.rotation.T) * self.scale) / self.scale

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return (np.arcsinh(y * self.scale) / self.scale) @ self.rotation


def _roll(y: torch.Tensor) -> torch.Tensor:
    """Isometric embedding R^d -> R^{d + d//2}: each pair (y_1, y_2) -> (r cos(y_1/r), r sin(y_1/r), y_2)."""
    parts = []
    for k in range(0, y.shape[1] - 1, 2):
        a, b = y[:, k] / ROLL_RADIUS, y[:, k + 1]
        parts += [ROLL_RADIUS * torch.cos(a), ROLL_RADIUS * torch.sin(a), b]
    if y.shape[1] % 2:
        parts.append(y[:, -1])
    return torch.stack(parts, dim=1)


def _stereographic_inverse(y: torch.Tensor) -> torch.Tensor:
    """R^d -> S^d ⊂ R^{d+1}: (2y, |y|² − 1) / (|y|² + 1)."""
    sq = (y * y).sum(1, keepdim=True)
    return torch.cat([2 * y, sq - 1], dim=1) / (sq + 1)


def _stereographic_inverse_np(y: np.ndarray) -> np.ndarray:
    sq = (y * y).sum(1, keepdims=True)
    return np.concatenate([2 * y, sq - 1], axis=1) / (sq + 1)


def _southern_hemisphere(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n points (n, d) whose stereographic images are uniform on the southern hemisphere of S^d (|y| <= 1)."""
    x = rng.standard_normal((n, d + 1))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[:, -1] = -np.abs(x[:, -1])
    return x[:, :-1] / (1 - x[:, -1:])  # stereographic projection from the north pole


def warped_flat(d: int, seed: int = 0) -> AnalyticManifold:
    warp = _Warp(d, seed)

    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        return warp.inverse(rng.uniform(-FLAT_HALF_WIDTH, FLAT_HALF_WIDTH, (n, d)))

    return AnalyticManifold("warped_flat", d, lambda z: _roll(warp(z)), warp.forward, False, draw)


def sphere(d: int, seed: int = 0) -> AnalyticManifold:
    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        return _southern_hemisphere(n, d, rng)

    return AnalyticManifold("sphere", d, _stereographic_inverse, _stereographic_inverse_np, True, draw)


def warped_sphere(d: int, seed: int = 0) -> AnalyticManifold:
    warp = _Warp(d, seed)

    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        return warp.inverse(_southern_hemisphere(n, d, rng))

    return AnalyticManifold("warped_sphere", d, lambda z: _stereographic_inverse(warp(z)),
                            lambda z: _stereographic_inverse_np(warp.forward(z)), True, draw)


MANIFOLDS: dict[str, Callable[..., AnalyticManifold]] = {
    "warped_flat": warped_flat, "sphere": sphere, "warped_sphere": warped_sphere}


def make(name: str, d: int, seed: int = 0) -> AnalyticManifold:
    if name not in MANIFOLDS:
        raise GeovqError(f"analytic manifold {name!r} is unknown; valid: {', '.join(MANIFOLDS)}")
    if d < 1:
        raise GeovqError(f"latent dimension d={d} must be >= 1")
    return MANIFOLDS[name](d, seed)
