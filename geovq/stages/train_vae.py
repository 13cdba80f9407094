"""Stage: train one Gaussian VAE. Input: the spec and the training images; output: vae/{key}/model.pt."""

from __future__ import annotations

from pathlib import Path

import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.io import write_json
from geovq.latents import TokenLayout
from geovq.stages.common import Progress
from geovq.stages.rundir import RunDir
from geovq.stages.units import VaeSpec
from geovq.training.loop import EpochCallback, train_vae


def train_vae_stage(run: RunDir, cfg: SweepConfig, spec: VaeSpec, data: ImageSplits, device: torch.device,
                    progress: Progress, on_epoch: EpochCallback | None = None) -> Path:
    """Train (or resume training) the VAE of `spec` on `device`; returns its checkpoint, written last.
    `on_epoch(epoch, model)` runs after each epoch trained here (a search reports validation PSNR with it)."""
    out = run.vae(spec)
    checkpoint = out / "model.pt"
    if checkpoint.exists():
        return checkpoint
    write_json(out / "spec.json", spec.to_dict())
    train, tdc, _ = cfg.settings(spec.overrides, spec.seed)
    layout = None if spec.token_dim is None else cfg.layout.with_token_dim(spec.token_dim, spec.grouping)
    train_vae(cfg.trunk, train, data.train, data.val, out, progress, device, layout, spec.target_bits, tdc, on_epoch)
    return checkpoint


def vae_layout(cfg: SweepConfig, spec: VaeSpec) -> TokenLayout:
    """How the VAE's latents are stored: its TDC tokens, or one token per cell for a plain VAE."""
    return cfg.layout.with_token_dim(spec.token_dim or cfg.trunk.latent_channels, spec.grouping)
