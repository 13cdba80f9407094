"""Stages of the end-to-end baseline: train a VQ-VAE (its own "fit"), encode every split with it, and
reconstruct test codes through its own decoder for scoring."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.io import save_npy, write_json
from geovq.models.vqvae import VQVAE
from geovq.stages.common import INFERENCE_BATCH, Progress
from geovq.stages.encode import code_dtype
from geovq.stages.rundir import SPLITS, RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import load_model
from geovq.training.loop import EpochCallback, to_device, train_vqvae


def train_vqvae_stage(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                      progress: Progress, on_epoch: EpochCallback | None = None) -> VQVAE:
    """Train (or resume, or load) the unit's VQ-VAE on `device`; `on_epoch(epoch, model)` runs after each
    epoch trained here."""
    out = run.unit(unit)
    if (out / "model.pt").exists():
        return load_model(out / "model.pt", "vqvae", device)
    write_json(out / "unit.json", unit.to_dict())
    train, _, vq = cfg.settings(unit.params, unit.seed)
    layout = cfg.layout.with_token_dim(unit.token_dim, unit.grouping)
    t0 = time.time()
    model = train_vqvae(cfg.trunk, layout, unit.n_codes, vq, train, data.train, data.val, out, progress, device,
                        on_epoch)
    write_json(out / "fit.json", {"fit_seconds": time.time() - t0})
    return model.eval()


@torch.no_grad()
def encode_vqvae_stage(run: RunDir, unit: Unit, model: VQVAE, data: ImageSplits, device: torch.device
                       ) -> dict[str, dict]:
    """codes_{split}.npy by the VQ-VAE's own nearest-codeword rule; encode.json holds per split the seconds
    and the latent error ‖ẑ − z_e‖ (the VQ-VAE has no posterior σ)."""
    info_path = run.unit(unit) / "encode.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    model.eval()
    for split in SPLITS:
        if run.codes(unit, split).exists() and split in info:
            continue
        t0 = time.perf_counter()
        images = getattr(data, split)
        codes, errors = [], []
        for s in range(0, len(images), INFERENCE_BATCH):
            c, tokens = model.quantize(to_device(images[s:s + INFERENCE_BATCH], device))
            codes.append(c.cpu().numpy())
            errors.append((model.codebook.embedding[c] - tokens).norm(dim=-1).reshape(-1).cpu().numpy())
        save_npy(run.codes(unit, split), np.concatenate(codes).astype(code_dtype(unit.n_codes)))
        info[split] = {"seconds": time.perf_counter() - t0, "latent_error": float(np.concatenate(errors).mean())}
        write_json(info_path, info)
    return info


def vqvae_reconstruct(model: VQVAE, device: torch.device):
    """(N, T) codes -> images through the VQ-VAE's own codebook and decoder, on `device`."""

    @torch.no_grad()
    def reconstruct(codes: np.ndarray) -> torch.Tensor:
        return torch.cat([model.decode_codes(torch.as_tensor(codes[s:s + INFERENCE_BATCH], dtype=torch.long,
                                                             device=device))
                          for s in range(0, len(codes), INFERENCE_BATCH)])

    return reconstruct
