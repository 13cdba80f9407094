"""Stage: score. Paired test metrics of reconstructions from saved test codes, and the rate of the code.

`score_vae_stage` scores a continuous VAE (its ceiling: no quantization); `score_unit_stage` scores a unit
from its saved test codes and writes row.json, its results `Row`; `unit_row` is the row before any metric.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.io import write_json
from geovq.latents import LatentSet
from geovq.metrics.codebook import dead_codes, usage_perplexity, usage_perplexity_corrected
from geovq.metrics.image import image_metrics
from geovq.metrics.rate import bits_per_image, bits_per_pixel
from geovq.models.vae import GaussianVAE
from geovq.stages.common import decode_grids
from geovq.stages.row import Row
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, VaeSpec
from geovq.training.checkpoint import load_model
from geovq.training.loop import to_device

Reconstruct = Callable[[np.ndarray], torch.Tensor]  # (N, T) codes -> (N, ch, H, W) images in [0, 1]


def in_band(kl_bits: np.ndarray, target_bits: float, tolerance: float) -> float:
    """Fraction of tokens whose KL lies within ±tolerance bits of the target (DESIGN.md §3.6's band)."""
    return float((np.abs(kl_bits - target_bits) <= tolerance).mean())


def score_vae_stage(run: RunDir, cfg: SweepConfig, spec: VaeSpec, data: ImageSplits, device: torch.device,
                    model: GaussianVAE | None = None, train_seconds: float | None = None) -> dict[str, Any]:
    """ceiling.json: the continuous VAE's own test metrics and per-token KL (the report draws its KL figure)."""
    out = run.vae(spec)
    done = out / "ceiling.json"
    if done.exists():
        return json.loads(done.read_text())
    model = model or load_model(out / "model.pt", "vae", device)
    test = LatentSet.load(run.latents(spec, "test"))
    recon = decode_grids(model.decoder, test.mu, device)
    kl = test.token_kl_bits()
    _, tdc, _ = cfg.settings(spec.overrides, spec.seed)
    ceiling = {"vae": spec.variant, "vae_key": spec.key, "tdc_target_bits": spec.target_bits,
               "tdc_tolerance": tdc.tolerance, "seed": spec.seed, "train_seconds": train_seconds,
               **image_metrics(to_device(data.test, device), recon), "mean_token_kl_bits": float(kl.mean())}
    if spec.target_bits is not None:
        ceiling["frac_tokens_in_band"] = in_band(kl, spec.target_bits, tdc.tolerance)
    write_json(done, ceiling)  # written last: its presence marks the VAE finished
    return ceiling


def unit_row(cfg: SweepConfig, unit: Unit, data: ImageSplits) -> Row:
    """A results row that says what is measured, nothing measured yet: method, VAE (and its training
    overrides), rate, seed, hyperparameters."""
    layout = cfg.layout.with_token_dim(unit.token_dim, unit.grouping)
    bits = bits_per_image(layout.tokens_per_image, unit.n_codes)
    return Row(dataset=cfg.dataset, method=unit.method, vae=None if unit.vae is None else unit.vae.variant,
               finetuned=False, K=unit.n_codes, token_dim=unit.token_dim, grouping=unit.grouping,
               tokens_per_image=layout.tokens_per_image, bits_per_image=bits,
               bpp=bits_per_pixel(bits, data.native_hw), seed=unit.seed, params=dict(unit.params),
               vae_overrides={} if unit.vae is None else dict(unit.vae.overrides),
               unit=unit.key, vae_key=None if unit.vae is None else unit.vae.key)


def score_unit_stage(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                     reconstruct: Reconstruct, extra: dict[str, Any]) -> Row:
    """row.json from the saved test codes: paired image metrics (image i against its reconstruction),
    test-code usage, and `extra` (fit figures, rate and latent diagnostics)."""
    codes = np.load(run.codes(unit, "test"))
    row = unit_row(cfg, unit, data).with_metrics({
        **image_metrics(to_device(data.test, device), reconstruct(codes)),
        "usage_perplexity": usage_perplexity(codes, unit.n_codes),
        "usage_perplexity_corrected": usage_perplexity_corrected(codes, unit.n_codes),
        "dead_codes": dead_codes(codes, unit.n_codes),
        "n_test": len(data.test), "codes_path": str(run.codes(unit, "test").relative_to(run.root)), **extra})
    run.write_row(unit, row)
    return row


def rate_diagnostics(test: LatentSet, n_codes: int, tolerance: float) -> dict[str, float]:
    """How the VAE's per-token KL sits against the code's log2 K bits."""
    kl = test.token_kl_bits()
    target = math.log2(n_codes)
    return {"mean_token_kl_bits": float(kl.mean()), "rate_gap_bits": target - float(kl.mean()),
            "frac_tokens_in_band": in_band(kl, target, tolerance)}
