"""Decoder fine-tuning on a post-hoc codebook (DESIGN.md §3.7).

A post-hoc codebook hands the decoder latents it never saw in training (medoids, Sobol points, centroids):
the "training mismatch". Freezing the encoder and the codebook, this fine-tunes a copy of the decoder on
quantized training latents ẑ = decode(encode(μ)) against the images, with the VAE's own reconstruction NLL
(summed per image), and keeps the epoch with the best validation loss (early stopping with patience).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch

from geovq.models.trunk import Decoder
from geovq.models.vae import reconstruction_nll
from geovq.training.loop import to_device


def _nll(decoder: Decoder, grids: torch.Tensor, images: torch.Tensor, recon: str) -> torch.Tensor:
    """Mean over images of the reconstruction NLL summed per image; grids (B, h, w, C), images (B, ch, H, W)."""
    return reconstruction_nll(decoder(grids.permute(0, 3, 1, 2)), images, recon).flatten(1).sum(1).mean()


@torch.no_grad()
def _val_loss(decoder: Decoder, grids: np.ndarray, images: np.ndarray, recon: str, batch_size: int,
              device: torch.device) -> float:
    decoder.eval()
    total = 0.0
    for s in range(0, len(images), batch_size):
        g, x = to_device(grids[s:s + batch_size], device), to_device(images[s:s + batch_size], device)
        total += float(_nll(decoder, g, x, recon)) * len(x)
    return total / len(images)


def finetune_decoder(decoder: Decoder, train_grids: np.ndarray, train_images: np.ndarray, val_grids: np.ndarray,
                     val_images: np.ndarray, recon: str, epochs: int, progress: Callable[..., Any],
                     device: torch.device, batch_size: int = 128, lr: float = 5e-4, patience: int = 3,
                     seed: int = 0) -> tuple[Decoder, dict[str, Any]]:
    """Return the fine-tuned copy (on `device`; best validation epoch, eval mode) and a record of the run."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(decoder).to(device)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr, foreach=True)  # see train_model
    rng = np.random.default_rng(seed)
    best = _val_loss(tuned, val_grids, val_images, recon, batch_size, device)
    info: dict[str, Any] = {"val_nll_before": best, "best_epoch": 0, "epochs_run": 0,
                            "train_images": len(train_images)}
    best_state = copy.deepcopy(tuned.state_dict())
    bar = progress(total=epochs, desc="decoder fine-tune")
    for epoch in range(1, epochs + 1):
        tuned.train()
        order = rng.permutation(len(train_images))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            loss = _nll(tuned, to_device(train_grids[idx], device), to_device(train_images[idx], device), recon)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = _val_loss(tuned, val_grids, val_images, recon, batch_size, device)
        info["epochs_run"] = epoch
        bar.update(1)
        if val < best:
            best, info["best_epoch"], best_state = val, epoch, copy.deepcopy(tuned.state_dict())
        elif epoch - info["best_epoch"] >= patience:
            break
    bar.close()
    tuned.load_state_dict(best_state)
    info["val_nll_after"] = best
    return tuned.eval(), info
