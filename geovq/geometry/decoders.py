"""Token decoders: every graph node is a latent point with a decoder map in its own context.

The edge-length engine never sees images or grids. It sees N nodes, node n having a point z_n (d,) and a
map z ↦ Dec_n(z) whose Jacobian defines the pull-back metric at that node (DESIGN.md §3.3b):
- `FlatTokenDecoder`: a flat decoder (B, d) -> (B, ...); every node shares one map (the 1-token case).
- `GridTokenDecoder`: a grid decoder (B, h, w, C) -> images plus the μ-grids the tokens live in. Node n is
  token i of image n(i); Dec_n(z) decodes image n(i)'s μ-grid with token i's channels replaced by z, so a
  token is never decoded alone or on an artificial background.

Both put nn.Module decoders in eval mode (BatchNorm/dropout in train mode make the Jacobian depend on the
batch) and check, once, that the decoder keeps the batch size, is differentiable by `torch.func.jvp`, and
decodes each row independently of the others. They compute on the decoder's own device (an nn.Module's
parameters', or a wrapper's `device` attribute); numbers come back to the caller as numpy arrays.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from geovq.errors import GeovqError
from geovq.latents import LatentSet

Decoder = Callable[[torch.Tensor], torch.Tensor]

# torch.func.jvp's first call imports torch's forward-mode decompositions, which call the deprecated
# torch.jit.script inside torch itself (torch 2.14): a FutureWarning in every worker that is torch's to fix,
# not ours. Import that module once here with exactly that warning silenced; any other warning stays.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

log = logging.getLogger(__name__)


class TokenDecoder:
    """N nodes: `points` (N, d) float64 and `decode(z, nodes)`, node-wise decoder maps."""

    points: np.ndarray
    dtype: torch.dtype
    device: torch.device
    out_dim: int
    #: every node has the same map, so a segment's length does not depend on which end's context it is in
    context_free: bool

    def __init__(self, decoder: Decoder, points: np.ndarray, dtype: torch.dtype) -> None:
        if isinstance(decoder, nn.Module):
            decoder.eval()
        self.decoder = decoder
        self.points = points
        self.dtype = dtype
        self.device = _module_device(decoder)

    def tensor(self, values, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`values` as a tensor on the decoder's device, in its dtype (or `dtype`, e.g. torch.long for ids)."""
        return torch.as_tensor(values, dtype=dtype or self.dtype, device=self.device)

    @property
    def n_nodes(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def decode(self, z: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """(B, d) points, (B,) node ids -> (B, P) flattened decoder outputs, each in its node's context."""
        inputs = self._inputs(z, nodes)
        out = self.decoder(inputs)
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != z.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GeovqError(
                f"the decoder returned {shape} for a batch of {z.shape[0]} inputs of shape {tuple(inputs.shape)}; "
                f"it must return a tensor whose first dimension is the batch size"
            )
        return out.reshape(z.shape[0], -1)

    def push_forward(self, z: torch.Tensor, nodes: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        """(m, B, P) J_n(z)·t: m tangents (m, B, d) per row of z (B, d), around one primal pass.

        Uses the decoder's own `jvp(inputs, input_tangents)` when it has one (checked against torch.func.jvp
        when the decoder is wrapped), else a vmap of `torch.func.jvp` over the m tangents.
        """
        fast = getattr(self.decoder, "jvp", None)
        if fast is not None:
            _, jv = fast(self._inputs(z, nodes), self._tangent_inputs(tangents, nodes))
            return jv.reshape(tangents.shape[0], z.shape[0], -1)
        push = partial(_jvp_tangent, partial(self.decode, nodes=nodes), z)
        try:
            return torch.func.vmap(push)(tangents)
        except RuntimeError as e:  # decoders with ops vmap cannot batch (e.g. in-place writes): one pass each
            log.warning("decoder could not be vmapped (%s); pushing tangents one by one", e)
            return torch.stack([push(t) for t in tangents])

    def _inputs(self, z: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _tangent_inputs(self, tangents: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """The decoder-input tangents (m, B, ...) of token tangents (m, B, d) (the insertion is linear)."""
        raise NotImplementedError

    def _validate(self) -> None:
        """Probe the decoder on two nodes so that a bad decoder fails here, with a clear message."""
        nodes = torch.arange(min(2, self.n_nodes), device=self.device)
        z = self.tensor(self.points[:len(nodes)])
        with torch.no_grad():
            try:
                out, jv = torch.func.jvp(lambda x: self.decode(x, nodes), (z,), (torch.ones_like(z),))
            except GeovqError:
                raise
            except Exception as e:  # anything torch raises: not differentiable, wrong dtype, ...
                raise GeovqError(f"the decoder could not be differentiated with torch.func.jvp "
                                 f"on {self.dtype} inputs: {type(e).__name__}: {e}") from e
            if not (torch.isfinite(out).all() and torch.isfinite(jv).all()):
                raise GeovqError("the decoder returned NaN or inf (or its Jacobian did) at the latent points")
            alone = self.decode(z[:1], nodes[:1])
            if getattr(self.decoder, "jvp", None) is not None:  # its own JVP must be the true one
                fast = self.push_forward(z, nodes, torch.ones_like(z)[None])[0]
                if (fast - jv).abs().max() > 1e-4 * jv.abs().max().clamp_min(1e-12):
                    raise GeovqError("the decoder's jvp() disagrees with torch.func.jvp of its forward pass")
        self.out_dim = out.shape[1]  # P: decoder output values per row, sizes the JVP chunks
        scale = out.abs().max().clamp_min(1e-12)
        if (alone - out[:1]).abs().max() > 1e-3 * scale:
            raise GeovqError("the decoder's output for one row depends on the other rows of the batch "
                             "(a BatchNorm in train mode?); geometry needs a per-row decoder")


def _module_device(decoder: Decoder) -> torch.device:
    """The device a decoder computes on: an nn.Module's parameters', a wrapper's `device`, else the CPU."""
    if isinstance(decoder, nn.Module):
        for p in decoder.parameters():
            return p.device
    device = getattr(decoder, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _module_dtype(decoder: Decoder) -> torch.dtype | None:
    """The dtype a decoder computes in: an nn.Module's parameters', or a wrapper's own `dtype` attribute."""
    if isinstance(decoder, nn.Module):
        for p in decoder.parameters():
            return p.dtype
    dtype = getattr(decoder, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


class FlatTokenDecoder(TokenDecoder):
    """A flat decoder (B, d) -> (B, ...): one map shared by all nodes.

    dtype: an nn.Module is called in its parameters' dtype. A plain callable is called in the dtype of the
    latents it came with (float64 for float64 latents); if it fails on float64 inputs (e.g. it wraps
    float32 weights), float32 is used instead. Lengths are always accumulated in float64.
    """

    context_free = True

    def __init__(self, decoder: Decoder, points: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        """`dtype`: the dtype the latents came in; ignored for an nn.Module (its parameters' dtype)."""
        points = np.ascontiguousarray(points, dtype=np.float64)
        tries = [_module_dtype(decoder) or dtype]
        if tries[0] == torch.float64 and not isinstance(decoder, nn.Module):
            tries.append(torch.float32)
        for attempt, try_dtype in enumerate(tries, 1):
            super().__init__(decoder, points, try_dtype)
            try:
                self._validate()
                return
            except GeovqError:
                if attempt == len(tries):
                    raise

    def _inputs(self, z: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return z

    def _tangent_inputs(self, tangents: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return tangents


class GridTokenDecoder(TokenDecoder):
    """A grid decoder (B, h, w, C) -> images, with each node a token in its own image's μ-grid.

    `grids` (n_images, h, w, C) are the context μ-grids; node n is the d channels at flat positions
    `channels[n]` (indices into one grid flattened to h·w·C) of grid `image[n]`.
    """

    def __init__(self, decoder: Decoder, grids: np.ndarray, image: np.ndarray, channels: np.ndarray) -> None:
        dtype = _module_dtype(decoder) or torch.float32
        self.grids, self.image, self.channels = grids, np.asarray(image), np.asarray(channels)
        self.grid_shape = tuple(grids.shape[1:])
        flat = np.ascontiguousarray(grids, dtype=np.float64).reshape(grids.shape[0], -1)
        points = flat[self.image[:, None], self.channels]
        super().__init__(decoder, points, dtype)
        self.context_free = flat.shape[1] == self.channels.shape[1]  # one token per image: no other context
        self._grids = self.tensor(flat)
        self._image = self.tensor(self.image, torch.long)
        self._channels = self.tensor(self.channels, torch.long)
        self._validate()

    @classmethod
    def from_latents(cls, decoder: Decoder, latents: LatentSet, tokens: np.ndarray | None = None,
                     ) -> GridTokenDecoder:
        """Nodes = `tokens` (indices into latents' tokens; all when None), contexts = their images' μ."""
        tokens = np.arange(latents.n_tokens) if tokens is None else np.asarray(tokens, dtype=np.int64)
        image, cell_slot = np.divmod(tokens, latents.tokens_per_image)
        used, image = np.unique(image, return_inverse=True)  # keep only the images that hold a node
        return cls(decoder, latents.mu[used], image, latents.layout.flat_positions(cell_slot))

    def _inputs(self, z: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        # out-of-place scatter: differentiable in z, the rest of the grid is a constant
        grids = self._grids[self._image[nodes]].scatter(1, self._channels[nodes], z)
        return grids.reshape(-1, *self.grid_shape)

    def _tangent_inputs(self, tangents: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        m, rows = tangents.shape[:2]
        zero = tangents.new_zeros(m, rows, self._grids.shape[1])
        channels = self._channels[nodes].expand(m, -1, -1)
        return zero.scatter(2, channels, tangents).reshape(m, rows, *self.grid_shape)


def _jvp_tangent(f, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.func.jvp(f, (z,), (t,))[1]
