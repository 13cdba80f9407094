"""Paired image metrics: reconstruction i against original i (DESIGN.md §4).

Inputs are (N, C, H, W) arrays or tensors in [0, 1], i.e. after explicit un-normalisation; values outside
[0, 1] are refused rather than clipped, because they mean the caller forgot to un-normalise (or the decoder
is not predicting a mean in [0, 1]). Every per-image function returns an (N,) float64 numpy array and works
through the images in chunks, so the SSIM intermediates of 10k test images never sit in memory at once.
Torch inputs are evaluated on their own device; numpy inputs on the CPU.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from geovq.errors import GeovqError
from geovq.metrics import SSIM_SIGMA, SSIM_WINDOW
from geovq.metrics._arrays import check_same_shape

ImageBatch = np.ndarray | torch.Tensor

SSIM_PAD = (SSIM_WINDOW - 1) // 2
LPIPS_MIN_SIDE = 32  # AlexNet's pooling stack needs at least this many pixels per side
# The file of torchvision's AlexNet_Weights.IMAGENET1K_V1 (a test checks they agree), named here rather than
# read from torchvision: importing torchvision.models costs the console ~3 s, for one file name.
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
# Pixel values per chunk (the chunk size in images adapts to the image size): SSIM's intermediates then stay
# near 100 MB; larger chunks are no faster on the CPU.
CHUNK_ELEMENTS = 2**18
# SSIM runs in float32: torch's float64 convolution on the CPU is ~10x slower (45 s instead of 5 s for 10k
# MNIST images on one thread), and float32 stays within 1e-5 of scikit-image's float64 SSIM (tested).
# PSNR and MSE are cheap and use float64.
SSIM_DTYPE = torch.float32


def _check_images(originals: ImageBatch, recons: ImageBatch) -> None:
    check_same_shape(originals, recons, "originals and recons")
    if len(originals.shape) != 4 or originals.shape[0] == 0:
        raise GeovqError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(originals.shape)}")


def _chunk_tensor(images: ImageBatch, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Images [start, stop) as a tensor of `dtype`, checked to be finite and in [0, 1]."""
    chunk = images[start:stop]
    chunk = chunk.detach().to(dtype) if isinstance(chunk, torch.Tensor) else torch.as_tensor(chunk, dtype=dtype)
    if not torch.isfinite(chunk).all():
        raise GeovqError("images contain NaN or inf values; expected values in [0, 1]")
    lo, hi = chunk.min().item(), chunk.max().item()
    if lo < 0.0 or hi > 1.0:
        raise GeovqError(f"images must be in [0, 1] (un-normalise them first), found values in [{lo:.4g}, {hi:.4g}]")
    return chunk


def _per_image(
    per_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    originals: ImageBatch,
    recons: ImageBatch,
    dtype: torch.dtype = torch.float64,
    chunk_images: int | None = None,
) -> np.ndarray:
    """Apply `per_chunk(originals, recons) -> (n,)` over chunks of images and concatenate the results."""
    _check_images(originals, recons)
    n = originals.shape[0]
    if chunk_images is None:
        chunk_images = max(1, CHUNK_ELEMENTS // math.prod(originals.shape[1:]))
    scores = []
    for start in range(0, n, chunk_images):
        stop = min(start + chunk_images, n)
        with torch.no_grad():
            value = per_chunk(_chunk_tensor(originals, start, stop, dtype), _chunk_tensor(recons, start, stop, dtype))
        scores.append(value.double().cpu().numpy())
    return np.concatenate(scores)


def _mse_chunk(orig: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (orig - recon).pow(2).mean(dim=(1, 2, 3))


def mse(originals: ImageBatch, recons: ImageBatch) -> np.ndarray:
    """Per-image mean squared error over all channels and pixels."""
    return _per_image(_mse_chunk, originals, recons)


def psnr(originals: ImageBatch, recons: ImageBatch) -> np.ndarray:
    """Per-image PSNR in dB with data range 1: 10·log10(1 / MSE); +inf for a perfect reconstruction."""
    return _per_image(lambda o, r: 10.0 * torch.log10(1.0 / _mse_chunk(o, r)), originals, recons)


def _ssim_chunk(orig: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    # imported here: torchmetrics imports most of torchvision and scipy.signal (~4 s), which only scoring needs
    from torchmetrics.functional.image import structural_similarity_index_measure

    # torchmetrics (1.9) reflect-pads and averages the SSIM map over the whole image, padded border included.
    # The reference definition (Wang et al. 2004; scikit-image) averages only where the window fits inside
    # the image, so we take the full map and crop the border of width SSIM_PAD ourselves.
    _, ssim_map = structural_similarity_index_measure(
        recon, orig, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW,
        data_range=1.0, reduction="none", return_full_image=True,
    )
    return ssim_map[..., SSIM_PAD:-SSIM_PAD, SSIM_PAD:-SSIM_PAD].mean(dim=(1, 2, 3))


def ssim(originals: ImageBatch, recons: ImageBatch) -> np.ndarray:
    """Per-image SSIM: Gaussian window 11, σ 1.5, data range 1, averaged over channels and valid pixels."""
    _check_images(originals, recons)
    height, width = originals.shape[2:]
    if min(height, width) < SSIM_WINDOW:
        raise GeovqError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} px, got {height}×{width}")
    return _per_image(_ssim_chunk, originals, recons, dtype=SSIM_DTYPE)


def _alexnet_weights_path() -> Path:
    """Where torchvision looks for (and would download) the ImageNet AlexNet weights that LPIPS uses."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILE


def lpips_status() -> tuple[bool, str]:
    """(available, reason): LPIPS is reported only with the real pretrained AlexNet in the torch hub cache."""
    path = _alexnet_weights_path()
    # No path in the reason: it goes into shared results; `lpips_weights_hint` says where, on the console.
    if path.is_file():
        return True, f"LPIPS(alex) with the ImageNet AlexNet weights ({path.name}) from the torch hub cache"
    return False, (
        f"LPIPS not computed: the ImageNet AlexNet weights ({path.name}) are not in the torch hub cache "
        "(geovq never downloads them and never uses random weights)"
    )


def lpips_weights_hint() -> str | None:
    """Where to put the AlexNet weights, for the console (None when they are there)."""
    path = _alexnet_weights_path()
    return None if path.is_file() else f"LPIPS is null: copy {path.name} to {path.parent} (or set TORCH_HOME) to get it"


@lru_cache(maxsize=1)
def _lpips_model(weights_path: str, device: str) -> torch.nn.Module:
    """The LPIPS(alex) network; `weights_path` is part of the cache key so a changed hub dir reloads it."""
    import lpips  # imported here: it is only needed once the weights are known to be present

    with warnings.catch_warnings():
        # lpips still calls torchvision's deprecated `alexnet(pretrained=True)`; the warning is not ours to fix.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        # The trunk loads from the hub cache file checked by lpips_status(); the linear heads are the
        # calibrated v0.1 weights shipped inside the lpips package.
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=False)
    return model.eval().to(device)


def _lpips_input(images: torch.Tensor) -> torch.Tensor:
    """Gray to 3 channels and upsample (bilinear) so that the shorter side is at least LPIPS_MIN_SIDE."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    height, width = images.shape[2:]
    if min(height, width) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(height, width)
        size = (math.ceil(height * scale), math.ceil(width * scale))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images


def lpips_scores(originals: ImageBatch, recons: ImageBatch, batch_size: int = 256) -> np.ndarray | None:
    """Per-image LPIPS(alex) distance, or None when the pretrained AlexNet weights are not cached."""
    _check_images(originals, recons)
    channels = originals.shape[1]
    if channels not in (1, 3):
        raise GeovqError(f"LPIPS needs 1 (gray) or 3 (RGB) channels, got {channels}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GeovqError(f"batch_size must be a positive integer, got {batch_size!r}")
    available, _ = lpips_status()
    if not available:
        return None
    device = originals.device if isinstance(originals, torch.Tensor) else torch.device("cpu")
    model = _lpips_model(str(_alexnet_weights_path()), str(device))
    # normalize=True maps [0, 1] inputs to the [-1, 1] range LPIPS was calibrated on.
    return _per_image(
        lambda o, r: model(_lpips_input(r), _lpips_input(o), normalize=True).flatten(),
        originals, recons, dtype=torch.float32, chunk_images=batch_size,
    )


def image_metrics(originals: ImageBatch, recons: ImageBatch) -> dict:
    """Means over images of PSNR, SSIM, MSE and LPIPS; `lpips` is None (with `lpips_reason`) when unavailable."""
    _check_images(originals, recons)
    lpips_available, lpips_reason = lpips_status()
    if originals.shape[1] not in (1, 3):
        lpips_available, lpips_reason = False, f"LPIPS not computed: it needs 1 or 3 channels, got {originals.shape[1]}"
    lpips_per_image = lpips_scores(originals, recons) if lpips_available else None
    return {
        "psnr": float(psnr(originals, recons).mean()),
        "ssim": float(ssim(originals, recons).mean()),
        "mse": float(mse(originals, recons).mean()),
        "lpips": None if lpips_per_image is None else float(lpips_per_image.mean()),
        "lpips_reason": lpips_reason,
    }
