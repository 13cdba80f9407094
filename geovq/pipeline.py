"""The sweep's stages: plain functions over files in a run directory, with no Ray in sight.

    dataset -> train VAE (per seed) -> latents (.npz) -> quantizer fit (per method, K, seed) -> test codes
            -> decoder -> paired metrics -> one row.json per unit -> results.json / .csv / report.md
    dataset -> train VQ-VAE (per K, seed) -> test codes -> decoder -> paired metrics -> row.json

Every stage checks for its own finished output first, so re-running a sweep redoes only unfinished work.
`geovq.distributed.tune` runs these functions as Ray Tune trials; tests call them directly.

Run directory:
    config.yaml                      the resolved SweepConfig
    sweep.log                        what the driver did, with timings
    vae/seed{S}/model.pt             Gaussian VAE checkpoint (weights + config); state.pt = resume point
    vae/seed{S}/latents_{split}.npz  posterior μ / log σ² grids of train and test
    vae/seed{S}/ceiling.json         the continuous VAE's own test reconstruction metrics
    vae/seed{S}/tb/                  TensorBoard events (losses, reconstructions)
    units/{method}-K{K}-seed{S}/     row.json, codes_test.npy, quantizer.npz (post-hoc) or model.pt (VQ-VAE)
    results.json, results.csv, report.md, figures/
    ray/                             Ray Tune's own trial records
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits, load_dataset
from geovq.io import save_npy, write_json
from geovq.latents import LatentSet
from geovq.metrics.codebook import dead_codes, usage_perplexity, usage_perplexity_corrected
from geovq.metrics.image import image_metrics
from geovq.metrics.latent import quantization_error
from geovq.metrics.rate import bits_per_image, bits_per_pixel
from geovq.models.vae import GaussianVAE
from geovq.models.vqvae import VQConfig, tokens_of
from geovq.training.checkpoint import load_model
from geovq.training.loop import train_vae, train_vqvae

Progress = Callable[..., Any]
END_TO_END = ("vqvae",)  # methods trained end to end; every other method is a post-hoc quantizer


@dataclass(frozen=True)
class Unit:
    """One (method, K, seed) cell of the sweep: one Ray Tune trial, one results row."""

    method: str
    n_codes: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-K{self.n_codes}-seed{self.seed}"

    @classmethod
    def parse(cls, name: str) -> Unit:
        method, k, seed = name.rsplit("-", 2)
        return cls(method, int(k[1:]), int(seed[4:]))


def plan_units(cfg: SweepConfig) -> list[Unit]:
    return [Unit(m, k, s) for s in range(cfg.seeds) for k in cfg.codebook_sizes for m in cfg.methods]


def vae_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / "vae" / f"seed{seed}"


def unit_dir(run_dir: Path, unit: Unit) -> Path:
    return run_dir / "units" / unit.name


def load_splits(cfg: SweepConfig) -> ImageSplits:
    data = load_dataset(cfg.dataset, cfg.data_root, download=cfg.download, split_seed=cfg.split_seed)
    if cfg.max_train_images and len(data.train) > cfg.max_train_images:
        # The split is already shuffled by the split seed, so a prefix is a fixed random subset.
        data.train = data.train[: cfg.max_train_images]
        data.train_labels = data.train_labels[: cfg.max_train_images]
    return data


@torch.no_grad()
def encode_latents(model: GaussianVAE, images: np.ndarray, token_dim: int, grouping: str,
                   batch_size: int = 512) -> LatentSet:
    """Posterior μ, log σ² grids of images, (N, h, w, C), in eval mode."""
    model.eval()
    mus, logvars = [], []
    for start in range(0, len(images), batch_size):
        mu, logvar = model.encode(torch.from_numpy(images[start:start + batch_size]))
        mus.append(mu.permute(0, 2, 3, 1).numpy())
        logvars.append(logvar.permute(0, 2, 3, 1).numpy())
    return LatentSet.from_grids(np.concatenate(mus), np.concatenate(logvars), token_dim, grouping)


@torch.no_grad()
def decode_grids(decoder: torch.nn.Module, grids: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, h, w, C) latent grids -> (N, ch, H, W) predicted images in [0, 1]."""
    decoder.eval()
    out = [decoder.mean(torch.from_numpy(np.ascontiguousarray(grids[s:s + batch_size])).permute(0, 3, 1, 2)).numpy()
           for s in range(0, len(grids), batch_size)]
    return np.concatenate(out)


def train_vae_stage(run_dir: Path, cfg: SweepConfig, seed: int, progress: Progress) -> dict[str, Any]:
    """Train the seed's Gaussian VAE (shared by every post-hoc method) and extract its latents."""
    out = vae_dir(run_dir, seed)
    done = out / "ceiling.json"
    if done.exists():
        return json.loads(done.read_text())
    data = load_splits(cfg)
    t0 = time.time()
    train_cfg = cfg.train.__class__(**{**cfg.train.as_dict(), "seed": seed})
    model = train_vae(cfg.trunk, train_cfg, data.train, data.val, out, progress)
    train_seconds = time.time() - t0
    for split in ("train", "test"):
        encode_latents(model, getattr(data, split), cfg.d, cfg.grouping).save(out / f"latents_{split}.npz")
    test = LatentSet.load(out / "latents_test.npz")
    recon = decode_grids(model.decoder, test.mu)
    ceiling = {"seed": seed, "train_seconds": train_seconds, **image_metrics(data.test, recon),
               "mean_token_kl_bits": float(test.token_kl_bits().mean())}
    write_json(done, ceiling)  # written last: its presence marks the stage finished
    return ceiling


def run_unit_stage(run_dir: Path, cfg: SweepConfig, unit: Unit, progress: Progress) -> dict[str, Any]:
    """Fit/train one method at one K and seed, encode the test split, decode, and score it."""
    out = unit_dir(run_dir, unit)
    done = out / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    data = load_splits(cfg)
    t0 = time.time()
    if unit.method in END_TO_END:
        codes, recon, extra = _vqvae_unit(cfg, unit, data, out, progress)
    else:
        codes, recon, extra = _posthoc_unit(run_dir, cfg, unit, out)
    save_npy(out / "codes_test.npy", codes.astype(np.int32 if unit.n_codes < 2**31 else np.int64))
    bits = bits_per_image(cfg.tokens_per_image, unit.n_codes)
    row = {
        "dataset": cfg.dataset, "method": unit.method, "vae": "plain" if unit.method not in END_TO_END else None,
        "K": unit.n_codes, "token_dim": cfg.d, "tokens_per_image": cfg.tokens_per_image,
        "bits_per_image": bits, "bpp": bits_per_pixel(bits, data.native_hw), "seed": unit.seed,
        **image_metrics(data.test, recon),
        "usage_perplexity": usage_perplexity(codes, unit.n_codes),
        "usage_perplexity_corrected": usage_perplexity_corrected(codes, unit.n_codes),
        "dead_codes": dead_codes(codes, unit.n_codes),
        "n_test": len(data.test), "codes_path": str((out / "codes_test.npy").relative_to(run_dir)),
        "seconds": time.time() - t0, **extra,
    }
    write_json(done, row)
    return row


def _posthoc_unit(run_dir: Path, cfg: SweepConfig, unit: Unit, out: Path):
    from geovq.quantize import get_quantizer_class

    vae_path = vae_dir(run_dir, unit.seed)
    vae = load_model(vae_path / "model.pt", "vae")
    train = LatentSet.load(vae_path / "latents_train.npz")
    test = LatentSet.load(vae_path / "latents_test.npz")
    qcls = get_quantizer_class(unit.method)
    runtime = {"decoder": grid_decoder(vae)} if qcls.needs_decoder else {}
    t0 = time.time()
    quantizer = qcls(n_codes=unit.n_codes, seed=unit.seed, **runtime).fit(train)
    fit_seconds = time.time() - t0
    quantizer.save(out / "quantizer.npz")
    codes = quantizer.encode(test)
    mu_hat = quantizer.decode(codes)
    recon = decode_grids(vae.decoder, test.layout.tokens_to_grid(mu_hat))
    ceiling = json.loads((vae_path / "ceiling.json").read_text())
    extra = {"fit_seconds": fit_seconds, "vae_psnr": ceiling["psnr"],
             "mean_token_kl_bits": ceiling["mean_token_kl_bits"],
             **quantization_error(mu_hat.reshape(-1, test.token_dim), test.token_mu, test.token_sigma),
             "fit_info": quantizer.fit_info}
    return codes, recon, extra


def grid_decoder(vae: GaussianVAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """μ-grids (B, h, w, C) -> predicted images: what geometry-aware quantizers differentiate."""
    decoder = vae.decoder.eval()
    return lambda grids: decoder.mean(grids.permute(0, 3, 1, 2))


def _vqvae_unit(cfg: SweepConfig, unit: Unit, data: ImageSplits, out: Path, progress: Progress):
    vq = VQConfig(n_codes=unit.n_codes, token_dim=cfg.d, grouping=cfg.grouping, decay=cfg.vq.decay,
                  commitment=cfg.vq.commitment, dead_code_threshold=cfg.vq.dead_code_threshold)
    train_cfg = cfg.train.__class__(**{**cfg.train.as_dict(), "seed": unit.seed})
    model = train_vqvae(cfg.trunk, vq, train_cfg, data.train, data.val, out, progress)
    codes, recons, errors = [], [], []
    with torch.no_grad():
        for s in range(0, len(data.test), 512):
            x = torch.from_numpy(data.test[s:s + 512])
            z_e = tokens_of(model.encoder(x), model.layout)
            c = model.codebook.nearest(z_e.reshape(-1, vq.token_dim)).reshape(len(x), -1)
            codes.append(c.numpy())
            recons.append(model.decode_codes(c).numpy())
            errors.append((model.codebook.embedding[c] - z_e).norm(dim=-1).reshape(-1).numpy())
    # The VQ-VAE has no posterior σ: its latent error is ‖ẑ − z_e‖ only.
    return np.concatenate(codes), np.concatenate(recons), {"latent_error": float(np.concatenate(errors).mean())}
