"""A trained VAE of a sweep run directory and a fixed random subset of its test split, for the pull-back benches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.latents import LatentSet
from geovq.models.vae import GaussianVAE
from geovq.stages.common import GridDecoder, load_splits
from geovq.training.checkpoint import load_model


@dataclass
class TrainedVae:
    cfg: SweepConfig
    vae: GaussianVAE
    decoder: GridDecoder
    train: LatentSet  # every training token's latents
    test: LatentSet  # the chosen test images' latents
    originals: torch.Tensor  # those test images


def load_trained_vae(run: Path, key: str, images: int, seed: int, device: torch.device) -> TrainedVae:
    """RUN/vae/KEY's checkpoint and latents, with `images` test images drawn by `seed`."""
    cfg = SweepConfig.load(run / "config.yaml")
    vae_dir = run / "vae" / key
    vae = load_model(vae_dir / "model.pt", "vae", device)
    test_all = LatentSet.load(vae_dir / "latents_test.npz")
    chosen = np.sort(np.random.default_rng(seed).choice(test_all.n_images, images, replace=False))
    return TrainedVae(cfg, vae, GridDecoder(vae), LatentSet.load(vae_dir / "latents_train.npz"),
                      test_all.subset(chosen), torch.as_tensor(load_splits(cfg).test[chosen]))
