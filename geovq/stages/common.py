"""What several stages share: the dataset of a run, progress bars, decoding latent grids on a device."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits, load_dataset
from geovq.models.vae import GaussianVAE
from geovq.training.loop import to_device

Progress = Callable[..., Any]
#: images per decoder or encoder call outside training (fixed: batch size can change float rounding)
INFERENCE_BATCH = 512


def no_progress(**kwargs: Any) -> Any:
    """A `Progress` that draws nothing: for searches (one line per trial instead), logs and tests."""
    from tqdm import tqdm

    return tqdm(disable=True, **kwargs)


def load_splits(cfg: SweepConfig) -> ImageSplits:
    data = load_dataset(cfg.dataset, cfg.data_root, download=cfg.download, split_seed=cfg.split_seed)
    if cfg.max_train_images and len(data.train) > cfg.max_train_images:
        # The split is already shuffled by the split seed, so a prefix is a fixed random subset.
        data.train = data.train[: cfg.max_train_images]
        data.train_labels = data.train_labels[: cfg.max_train_images]
    return data


@torch.no_grad()
def decode_grids(decoder: torch.nn.Module, grids: np.ndarray, device: torch.device,
                 batch_size: int = INFERENCE_BATCH) -> torch.Tensor:
    """(N, h, w, C) latent grids -> (N, ch, H, W) predicted images in [0, 1], on `device`."""
    decoder.eval()
    return torch.cat([decoder.mean(to_device(grids[s:s + batch_size], device).permute(0, 3, 1, 2))
                      for s in range(0, len(grids), batch_size)])


class GridDecoder:
    """μ-grids (B, h, w, C) -> predicted images: what geometry-aware quantizers differentiate, on the VAE's
    device (`device`, which the geometry engine computes on).

    A plain callable (not an nn.Module) with a `jvp(grids, tangents)` that the geometry engine prefers over
    `torch.func.jvp`: the trunk's own forward-mode pass, which costs fewer convolutions per tangent.
    """

    def __init__(self, vae: GaussianVAE) -> None:
        self.decoder = vae.decoder.eval()
        parameter = next(self.decoder.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device  # latents are cast to them

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        return self.decoder.mean(grids.permute(0, 3, 1, 2))

    def jvp(self, grids: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, m Jacobian-tangent products) for grids (B, h, w, C) and tangents (m, B, h, w, C)."""
        return self.decoder.mean_jvp(grids.permute(0, 3, 1, 2), tangents.permute(0, 1, 4, 2, 3))
