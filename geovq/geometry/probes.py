"""Pull-back metrics of every token of an image at once, from output probes (DESIGN.md §3.10; issue 26).

A token's metric G_i = J_iᵀJ_i, J_i the decoder's Jacobian in token i's own context (its image's μ-grid), takes
d tangent passes of the whole decoder per token (`lengths.node_metrics`): 784 passes per MNIST image. But every
token of an image shares that context, so ONE vector–Jacobian product of the image's output with a vector ω
gives J_iᵀω for all of its tokens at once. With s output probes q_1..q_s per image (`probe_frame`: Gaussian,
scaled so that E[Σ_j q_j q_jᵀ] = (s/P)·I over the P output values) and g_ij = √(P/s) J_iᵀq_j,

    Ĝ_i = Σ_j g_ij g_ijᵀ  is unbiased for G_i,  and equal to it when s >= P (the probes are then the whole basis),

at s backward passes per image: on MNIST (P = 784, 49 tokens) s = 32 probes cost about 0.7 decoder passes per
token against 16 for the exact metrics. The estimate alone picks the exact rule's code for ~91% of MNIST
tokens; `image_probes` returns the per-probe g_ij, so that a caller can test which codes the estimate cannot rule
out (`geovq.nearest.probe_candidates`), and `image_tangent_norms` settles those exactly (‖J_i δ‖² for a
few δ per token, a forward-mode pass each, the image's primal pass shared).

Both run on the decoder's own device (an nn.Module's parameters', or a wrapper's `device`), in its dtype; the
numbers come back as float64 numpy arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from geovq.errors import GeovqError
from geovq.geometry.decoders import _module_device, _module_dtype

if TYPE_CHECKING:
    from geovq.latents import LatentSet

GridDecoderFn = Callable[[torch.Tensor], torch.Tensor]

#: decoder rows (probes or tangents × images) per backward/forward-mode call: more runs slower per row on a CPU
#: (the activations leave the cache: 1.65 forward-equivalents per probe at 128 rows, 1.98 at 1024, MNIST)
ROWS_PER_CALL = 128
#: the same on a CUDA device, where a call of 128 rows would leave it idle (not measured: no GPU here yet;
#: bench/gpu_check.py times this stage)
CUDA_ROWS_PER_CALL = 16384
#: images decoded to time a plain forward pass, against which an encode's cost is stated, and times it is run
FORWARD_PROBE = 256
FORWARD_REPEATS = 3


def rows_per_call(device: torch.device) -> int:
    return CUDA_ROWS_PER_CALL if device.type == "cuda" else ROWS_PER_CALL


def probe_frame(n_outputs: int, n_probes: int, seed: int, image: int) -> np.ndarray:
    """(P, s) output probes of one image with E[Σ_j ω_j ω_jᵀ] = (s/P)·I: standard normal / √P, drawn from (seed,
    image) alone (so a split's codes do not depend on how it is chunked); the identity when s >= P.
    (Orthonormalising them agreed no better with the exact rule on MNIST, at a QR per image.)"""
    if n_probes >= n_outputs:
        return np.eye(n_outputs)
    return np.random.default_rng([seed, image]).standard_normal((n_outputs, n_probes)) / np.sqrt(n_outputs)


def image_probes(decoder: GridDecoderFn, grids: np.ndarray, n_probes: int, seed: int,
                 images: np.ndarray | None = None) -> np.ndarray:
    """(n, s', h, w, C) float64 g_j = √(P/s') J_nᵀ q_j for each image n of `grids` (n, h, w, C) and each of its
    s' = min(n_probes, P) probes (`probe_frame`, drawn by the image's id in `images`, default 0..n−1), so that
    Σ_j g_j[token] g_j[token]ᵀ estimates each token's metric without bias (exactly when s' = P)."""
    if len(grids) == 0:
        raise GeovqError("no images to probe: the split is empty")
    device, dtype = _module_device(decoder), _module_dtype(decoder) or torch.float32
    images = np.arange(len(grids)) if images is None else np.asarray(images)
    with torch.no_grad():
        n_out = decoder(torch.as_tensor(grids[:1], dtype=dtype, device=device)).reshape(1, -1).shape[1]
    s = min(n_probes, n_out)
    out = np.empty((len(grids), s, *grids.shape[1:]))
    step = max(1, rows_per_call(device) // s)  # images per backward call
    for start in range(0, len(grids), step):
        stop = min(start + step, len(grids))
        z = torch.as_tensor(grids[start:stop], dtype=dtype, device=device)
        _, pull = torch.func.vjp(lambda x: decoder(x).reshape(stop - start, -1), z)
        frames = np.stack([probe_frame(n_out, s, seed, int(i)) for i in images[start:stop]])  # (rows, P, s)
        probes = torch.as_tensor(frames.transpose(2, 0, 1) * np.sqrt(n_out / s), dtype=dtype, device=device)
        (grads,) = torch.func.vmap(pull)(probes)  # (s, rows, h, w, C)
        out[start:stop] = grads.detach().transpose(0, 1).double().cpu().numpy()
        if not np.isfinite(out[start:stop]).all():
            raise GeovqError(f"the decoder's Jacobian is NaN or inf in images {int(images[start])}.."
                             f"{int(images[stop - 1])}; pull-back metrics need finite derivatives at the latents")
    return out


def image_tangent_norms(decoder: GridDecoderFn, grids: np.ndarray, tangents: np.ndarray) -> np.ndarray:
    """(m, n) ‖J_n t‖² for tangents (m, n, h, w, C) of the images' μ-grids (n, h, w, C), each image's primal pass
    shared by its m tangents (the decoder's own `jvp` when it has one, else torch.func.jvp)."""
    device, dtype = _module_device(decoder), _module_dtype(decoder) or torch.float32
    m, n = tangents.shape[:2]
    out = np.empty((m, n))
    step = max(1, rows_per_call(device) // max(m, 1))
    fast = getattr(decoder, "jvp", None)
    with torch.no_grad():
        for start in range(0, n, step):
            z = torch.as_tensor(grids[start:start + step], dtype=dtype, device=device)
            t = torch.as_tensor(tangents[:, start:start + step], dtype=dtype, device=device)
            if fast is not None:
                _, jt = fast(z, t)
            else:
                jt = torch.func.vmap(lambda v: torch.func.jvp(decoder, (z,), (v,))[1])(t)
            out[:, start:start + step] = jt.reshape(m, len(z), -1).double().pow(2).sum(-1).cpu().numpy()
    return out


def forward_equivalents(decoder: GridDecoderFn, latents: "LatentSet", seconds: float) -> dict[str, float]:
    """An encode's `seconds` of `latents` in decoder forward-equivalents (a plain forward of the split's μ-grids,
    timed now: `forward_seconds_per_image`): forward_seconds_per_image, and the encode per token and per image."""
    per_image = forward_seconds_per_image(decoder, latents)
    return {"forward_seconds_per_image": per_image,
            "encode_forward_equivalents_per_token": seconds / max(latents.n_tokens, 1) / per_image,
            "encode_forward_equivalents_per_image": seconds / max(latents.n_images, 1) / per_image}


def forward_seconds_per_image(decoder: GridDecoderFn, latents: "LatentSet") -> float:
    """Wall seconds per image of a plain decoder forward of (up to FORWARD_PROBE of) the split's μ-grids in one
    batch (each image's first token in its own context: the μ-grid unchanged), fastest of FORWARD_REPEATS: the
    unit an encode's cost is stated in (decoder forward-equivalents)."""
    import time

    from geovq.geometry.decoders import GridTokenDecoder

    n = min(latents.n_images, FORWARD_PROBE)
    dec = GridTokenDecoder.from_latents(decoder, latents, np.arange(n) * latents.tokens_per_image)
    z, nodes = dec.tensor(dec.points), torch.arange(n, device=dec.device)
    best = np.inf
    with torch.no_grad():
        dec.decode(z[:2], nodes[:2]).cpu()  # warm-up
        for _ in range(FORWARD_REPEATS):  # the fastest: other jobs on the machine only ever add time
            t0 = time.perf_counter()
            dec.decode(z, nodes).cpu()  # .cpu(): waits for the device
            best = min(best, time.perf_counter() - t0)
    return best / n
