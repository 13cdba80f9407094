"""Stages of the end-to-end baselines (geovq.end_to_end: the VQ-VAE, FSQ, LFQ, residual VQ): train the model (its
own "fit"), encode every split with it, and reconstruct test codes through its own decoder for scoring."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.io import save_npy, write_json
from geovq.end_to_end import end_to_end_method, split_params
from geovq.models.vqvae import EndToEndAE, QuantizedAE
from geovq.stages.common import INFERENCE_BATCH, Progress
from geovq.stages.encode import code_dtype
from geovq.stages.rundir import SPLITS, RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import END_TO_END_KINDS, load_model
from geovq.training.loop import EpochCallback, to_device, train_end_to_end


def train_end_to_end_stage(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                           progress: Progress, on_epoch: EpochCallback | None = None) -> EndToEndAE:
    """Train (or resume, or load) the unit's end-to-end model on `device`; `on_epoch(epoch, model)` runs after each
    epoch trained here."""
    out = run.unit(unit)
    if (out / "model.pt").exists():
        return load_model(out / "model.pt", END_TO_END_KINDS, device)
    write_json(out / "unit.json", unit.to_dict())
    settings, _ = split_params(unit.params)
    train, _, vq = cfg.settings(settings, unit.seed)
    method = end_to_end_method(unit.method, unit.n_codes, unit.seed, unit.params)
    layout = cfg.layout.with_token_dim(unit.token_dim, unit.grouping)
    t0 = time.time()
    model = train_end_to_end(cfg.trunk, layout, method, vq, train, data.train, data.val, out, progress, device,
                             on_epoch)
    # a projection a baseline needs to its own dimension (FSQ's, LFQ's) is part of it and counted here; an EMA
    # codebook's K × d entries are running averages, not trained parameters
    quantizer = model.bottleneck if isinstance(model, QuantizedAE) else None
    write_json(out / "fit.json", {"fit_seconds": time.time() - t0, "parameters": _count(model),
                                  "quantizer_parameters": _count(quantizer) if quantizer is not None else 0})
    return model.eval()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def encode_end_to_end_stage(run: RunDir, unit: Unit, model: EndToEndAE, data: ImageSplits, device: torch.device
                            ) -> dict[str, dict]:
    """codes_{split}.npy by the model's own rule (the VQ-VAE's nearest codeword, FSQ's rounding, ...); encode.json
    holds per split the seconds and the latent error ‖ẑ − z_e‖ (an end-to-end model has no posterior σ)."""
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
            errors.append((model.code_vectors(c) - tokens).norm(dim=-1).reshape(-1).cpu().numpy())
        save_npy(run.codes(unit, split), np.concatenate(codes).astype(code_dtype(unit.n_codes)))
        info[split] = {"seconds": time.perf_counter() - t0, "latent_error": float(np.concatenate(errors).mean())}
        write_json(info_path, info)
    return info


def end_to_end_reconstruct(model: EndToEndAE, device: torch.device):
    """(N, T) codes -> images through the model's own code vectors and decoder, on `device`."""

    @torch.no_grad()
    def reconstruct(codes: np.ndarray) -> torch.Tensor:
        return torch.cat([model.decode_codes(torch.as_tensor(codes[s:s + INFERENCE_BATCH], dtype=torch.long,
                                                             device=device))
                          for s in range(0, len(codes), INFERENCE_BATCH)])

    return reconstruct
