"""Stage: extract latents. Input: a VAE checkpoint and a split's images; output: latents_{split}.npz.

`extract_latents` is the plain function (a model and images in, a LatentSet out) that the Ray Data
stage (geovq.distributed.data) calls per shard; `extract_stage` writes one split of one VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.latents import LatentSet, TokenLayout
from geovq.models.vae import GaussianVAE
from geovq.stages.common import INFERENCE_BATCH
from geovq.stages.rundir import RunDir
from geovq.stages.train_vae import vae_layout
from geovq.stages.units import VaeSpec
from geovq.training.checkpoint import load_model
from geovq.training.loop import to_device


@torch.no_grad()
def encode_images(model: GaussianVAE, images: np.ndarray, device: torch.device,
                  batch_size: int = INFERENCE_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (μ, log σ²) grids (N, h, w, C) float32 of images (N, ch, H, W), in eval mode on `device`."""
    model.eval()
    mus, logvars = [], []
    for start in range(0, len(images), batch_size):
        mu, logvar = model.encode(to_device(images[start:start + batch_size], device))
        mus.append(mu.permute(0, 2, 3, 1).cpu().numpy())
        logvars.append(logvar.permute(0, 2, 3, 1).cpu().numpy())
    if not mus:
        h, w = model.cfg.grid
        empty = np.zeros((0, h, w, model.cfg.latent_channels), np.float32)
        return empty, empty.copy()
    return np.concatenate(mus), np.concatenate(logvars)


def extract_latents(model: GaussianVAE, images: np.ndarray, layout: TokenLayout, device: torch.device) -> LatentSet:
    mu, logvar = encode_images(model, images, device)
    return LatentSet(mu, logvar, layout)


def extract_stage(run: RunDir, cfg: SweepConfig, spec: VaeSpec, data: ImageSplits, device: torch.device,
                  model: GaussianVAE | None = None) -> dict[str, Path]:
    """latents_{train,val,test}.npz of the VAE (each skipped when it exists); returns their paths."""
    paths = {}
    for split in ("train", "val", "test"):
        path = run.latents(spec, split)
        if not path.exists():
            model = model or load_model(run.vae(spec) / "model.pt", "vae", device)
            extract_latents(model, getattr(data, split), vae_layout(cfg, spec), device).save(path)
        paths[split] = path
    return paths
