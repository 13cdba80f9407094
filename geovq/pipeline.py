"""The sweep's stages: plain functions over files in a run directory, with no Ray in sight.

    dataset -> train VAE (per variant, seed; TDC also per K) -> latents (.npz) -> quantizer fit (per method,
            VAE, K, seed) -> test codes -> decoder (optionally fine-tuned on the codebook) -> paired metrics
            -> row.json (+ row_finetuned.json) per unit -> results.json / .csv / report.md
    dataset -> train VQ-VAE (per K, seed) -> test codes -> decoder -> paired metrics -> row.json

Every stage checks for its own finished output first, so re-running a sweep redoes only unfinished work.
`geovq.distributed.tune` runs these functions as Ray Tune trials; tests call them directly.

Run directory:
    config.yaml                      the resolved SweepConfig
    sweep.log                        what the driver did, with timings
    vae/{plain|tdc-K{K}}/seed{S}/    one Gaussian VAE: model.pt (weights + config + TDC state), state.pt (resume
                                     point), latents_{train,val,test}.npz, ceiling.json (its own test metrics
                                     and per-token KL), kl_histogram.png, tb/ (TensorBoard events)
    units/{method}-{vae}-K{K}-seed{S}/   a post-hoc unit: row.json, codes_test.npy, quantizer.npz, and with
                                     fine-tuning row_finetuned.json + decoder_finetuned.pt
    units/vqvae-K{K}-seed{S}/        an end-to-end unit: row.json, codes_test.npy, model.pt
    results.json, results.csv, report.md, figures/
    ray/                             Ray Tune's own trial records
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import TDC_TOLERANCE_BITS, SweepConfig
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


VAE_VARIANTS = ("plain", "tdc")


@dataclass(frozen=True)
class VaeSpec:
    """One Gaussian VAE: `plain` (β-ELBO) per seed, or `tdc` per (K, seed) since its target is log2 K."""

    variant: str
    n_codes: int | None
    seed: int

    @property
    def key(self) -> str:
        return "plain" if self.variant == "plain" else f"tdc-K{self.n_codes}"

    @property
    def name(self) -> str:
        return f"vae-{self.key}-seed{self.seed}"

    @classmethod
    def parse(cls, name: str) -> VaeSpec:
        parts = name.split("-")  # vae-plain-seedS | vae-tdc-KK-seedS
        seed = int(parts[-1][4:])
        return cls("plain", None, seed) if parts[1] == "plain" else cls("tdc", int(parts[2][1:]), seed)

    def dir(self, run_dir: Path) -> Path:
        return run_dir / "vae" / self.key / f"seed{self.seed}"

    @property
    def tdc_target_bits(self) -> float | None:
        return math.log2(self.n_codes) if self.variant == "tdc" else None


@dataclass(frozen=True)
class Unit:
    """One (method, VAE variant, K, seed) cell of the sweep: one Ray Tune trial, one results row."""

    method: str
    vae: str | None  # None for end-to-end methods, which have no Gaussian VAE
    n_codes: int
    seed: int

    @property
    def name(self) -> str:
        vae = f"-{self.vae}" if self.vae else ""
        return f"{self.method}{vae}-K{self.n_codes}-seed{self.seed}"

    @classmethod
    def parse(cls, name: str) -> Unit:
        parts = name.split("-")
        vae = parts[1] if len(parts) == 4 else None
        return cls(parts[0], vae, int(parts[-2][1:]), int(parts[-1][4:]))

    @property
    def vae_spec(self) -> VaeSpec:
        assert self.vae is not None
        return VaeSpec(self.vae, self.n_codes if self.vae == "tdc" else None, self.seed)


def plan_units(cfg: SweepConfig) -> list[Unit]:
    units = []
    for s in range(cfg.seeds):
        for k in cfg.codebook_sizes:
            for m in cfg.methods:
                units += [Unit(m, None, k, s)] if m in END_TO_END else [Unit(m, v, k, s) for v in cfg.vaes]
    return units


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


def train_vae_stage(run_dir: Path, cfg: SweepConfig, spec: VaeSpec, progress: Progress) -> dict[str, Any]:
    """Train one Gaussian VAE (shared by every post-hoc method on it) and extract its latents."""
    out = spec.dir(run_dir)
    done = out / "ceiling.json"
    if done.exists():
        return json.loads(done.read_text())
    data = load_splits(cfg)
    t0 = time.time()
    train_cfg = replace(cfg.train, seed=spec.seed)
    model = train_vae(cfg.trunk, train_cfg, data.train, data.val, out, progress, cfg.layout, spec.tdc_target_bits)
    train_seconds = time.time() - t0
    for split in ("train", "val", "test"):
        encode_latents(model, getattr(data, split), cfg.d, cfg.grouping).save(out / f"latents_{split}.npz")
    test = LatentSet.load(out / "latents_test.npz")
    recon = decode_grids(model.decoder, test.mu)
    kl = test.token_kl_bits()
    ceiling = {"vae": spec.variant, "tdc_target_bits": spec.tdc_target_bits, "seed": spec.seed,
               "train_seconds": train_seconds, **image_metrics(data.test, recon),
               "mean_token_kl_bits": float(kl.mean())}
    if spec.tdc_target_bits is not None:
        ceiling["frac_tokens_in_band"] = float((np.abs(kl - spec.tdc_target_bits) <= TDC_TOLERANCE_BITS).mean())
    from geovq.report.figures import token_kl_figure

    token_kl_figure(out, test, spec.tdc_target_bits, TDC_TOLERANCE_BITS)
    write_json(done, ceiling)  # written last: its presence marks the stage finished
    return ceiling


def unit_done(run_dir: Path, cfg: SweepConfig, unit: Unit) -> bool:
    """Finished: its row exists, and with `cfg.finetune_decoder` a post-hoc unit's fine-tuned row too."""
    out = unit_dir(run_dir, unit)
    wants_finetune = cfg.finetune_decoder and unit.method not in END_TO_END
    return (out / "row.json").exists() and (not wants_finetune or (out / "row_finetuned.json").exists())


def run_unit_stage(run_dir: Path, cfg: SweepConfig, unit: Unit, progress: Progress) -> dict[str, Any]:
    """Fit/train one method at one K and seed, encode the test split, decode, and score it.

    Returns the row. With `cfg.finetune_decoder` a post-hoc unit also writes row_finetuned.json: the same test
    codes decoded by a decoder fine-tuned on the codebook (added later to a unit that finished without it).
    """
    out = unit_dir(run_dir, unit)
    done = out / "row.json"
    data = None
    if done.exists():
        row = json.loads(done.read_text())
    else:
        data = load_splits(cfg)
        row = _score_unit(run_dir, cfg, unit, data, out, progress)
        write_json(done, row)  # its presence marks the unit scored
    if not unit_done(run_dir, cfg, unit):
        _finetune_unit(run_dir, cfg, unit, row, data or load_splits(cfg), out, progress)
    return row


def _score_unit(run_dir: Path, cfg: SweepConfig, unit: Unit, data: ImageSplits, out: Path,
                progress: Progress) -> dict[str, Any]:
    t0 = time.time()
    if unit.method in END_TO_END:
        codes, recon, extra = _vqvae_unit(cfg, unit, data, out, progress)
    else:
        codes, recon, extra = _posthoc_unit(run_dir, cfg, unit, out)
    save_npy(out / "codes_test.npy", codes.astype(np.int32 if unit.n_codes < 2**31 else np.int64))
    bits = bits_per_image(cfg.tokens_per_image, unit.n_codes)
    return {
        "dataset": cfg.dataset, "method": unit.method, "vae": unit.vae, "finetuned": False,
        "K": unit.n_codes, "token_dim": cfg.d, "grouping": cfg.grouping, "tokens_per_image": cfg.tokens_per_image,
        "bits_per_image": bits, "bpp": bits_per_pixel(bits, data.native_hw), "seed": unit.seed,
        **image_metrics(data.test, recon),
        "usage_perplexity": usage_perplexity(codes, unit.n_codes),
        "usage_perplexity_corrected": usage_perplexity_corrected(codes, unit.n_codes),
        "dead_codes": dead_codes(codes, unit.n_codes),
        "n_test": len(data.test), "codes_path": str((out / "codes_test.npy").relative_to(run_dir)),
        "seconds": time.time() - t0, **extra,
    }


def _load_vae_and_latents(run_dir: Path, unit: Unit, split: str) -> tuple[GaussianVAE, Path, LatentSet]:
    vae_path = unit.vae_spec.dir(run_dir)
    return load_model(vae_path / "model.pt", "vae"), vae_path, LatentSet.load(vae_path / f"latents_{split}.npz")


def _posthoc_unit(run_dir: Path, cfg: SweepConfig, unit: Unit, out: Path):
    from geovq.quantize import get_quantizer_class

    vae, vae_path, train = _load_vae_and_latents(run_dir, unit, "train")
    test = LatentSet.load(vae_path / "latents_test.npz")
    qcls = get_quantizer_class(unit.method)
    options = dict(cfg.method_options.get(unit.method, {}))
    if qcls.needs_decoder:
        options["decoder"] = GridDecoder(vae)
    t0 = time.time()
    quantizer = qcls(n_codes=unit.n_codes, seed=unit.seed, **options).fit(train)
    fit_seconds = time.time() - t0
    quantizer.save(out / "quantizer.npz")
    codes = quantizer.encode(test)
    tokens_hat = quantizer.decode(codes)
    recon = decode_grids(vae.decoder, test.layout.tokens_to_grid(tokens_hat))
    ceiling = json.loads((vae_path / "ceiling.json").read_text())
    kl = test.token_kl_bits()
    target = math.log2(unit.n_codes)
    extra = {"fit_seconds": fit_seconds, "vae_psnr": ceiling["psnr"],
             # rate diagnostics: how the VAE's per-token KL sits against the code's log2 K bits
             "mean_token_kl_bits": float(kl.mean()), "rate_gap_bits": target - float(kl.mean()),
             "frac_tokens_in_band": float((np.abs(kl - target) <= TDC_TOLERANCE_BITS).mean()),
             **quantization_error(tokens_hat.reshape(-1, test.token_dim), test.token_mu, test.token_sigma),
             "fit_info": quantizer.fit_info}
    if getattr(quantizer, "encode_info", None):  # e.g. how an approximate encoding agrees with the exact rule
        extra["encode_info"] = quantizer.encode_info
    return codes, recon, extra


def _finetune_unit(run_dir: Path, cfg: SweepConfig, unit: Unit, row: dict[str, Any], data: ImageSplits, out: Path,
                   progress: Progress) -> None:
    """Fine-tune the decoder on quantized training latents (a fixed random prefix of at most
    `finetune_max_images` images), early-stopped on the quantized validation split; decode the saved test
    codes with it and write row_finetuned.json."""
    from geovq.quantize import Quantizer
    from geovq.training.checkpoint import save_checkpoint
    from geovq.training.finetune import finetune_decoder

    vae, vae_path, train = _load_vae_and_latents(run_dir, unit, "train")
    quantizer = Quantizer.load(out / "quantizer.npz", **(
        {"decoder": GridDecoder(vae)} if Quantizer.load_class(out / "quantizer.npz").needs_decoder else {}))
    n = min(train.n_images, cfg.finetune_max_images)
    quantized = lambda ls: ls.layout.tokens_to_grid(quantizer.decode(quantizer.encode(ls)))  # noqa: E731
    t0 = time.time()
    tuned, info = finetune_decoder(vae.decoder, quantized(train.subset(np.arange(n))), data.train[:n],
                                   quantized(LatentSet.load(vae_path / "latents_val.npz")), data.val,
                                   cfg.train.recon, cfg.finetune_epochs, progress,
                                   batch_size=cfg.train.batch_size, seed=unit.seed)
    info["seconds"] = time.time() - t0
    save_checkpoint(out / "decoder_finetuned.pt", "decoder", tuned, {"trunk": cfg.trunk.as_dict()}, info)
    test_grids = train.layout.tokens_to_grid(quantizer.decode(np.load(run_dir / row["codes_path"])))
    write_json(out / "row_finetuned.json", {**row, **image_metrics(data.test, decode_grids(tuned, test_grids)),
                                            "finetuned": True, "finetune": info})


class GridDecoder:
    """μ-grids (B, h, w, C) -> predicted images: what geometry-aware quantizers differentiate.

    A plain callable (not an nn.Module) with a `jvp(grids, tangents)` that the geometry engine prefers over
    `torch.func.jvp`: the trunk's own forward-mode pass, which costs fewer convolutions per tangent.
    """

    def __init__(self, vae: GaussianVAE) -> None:
        self.decoder = vae.decoder.eval()
        self.dtype = next(self.decoder.parameters()).dtype  # latents are cast to it

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        return self.decoder.mean(grids.permute(0, 3, 1, 2))

    def jvp(self, grids: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, m Jacobian-tangent products) for grids (B, h, w, C) and tangents (m, B, h, w, C)."""
        return self.decoder.mean_jvp(grids.permute(0, 3, 1, 2), tangents.permute(0, 1, 4, 2, 3))


def _vqvae_unit(cfg: SweepConfig, unit: Unit, data: ImageSplits, out: Path, progress: Progress):
    vq = VQConfig(n_codes=unit.n_codes, token_dim=cfg.d, grouping=cfg.grouping, decay=cfg.vq.decay,
                  commitment=cfg.vq.commitment, dead_code_threshold=cfg.vq.dead_code_threshold)
    train_cfg = replace(cfg.train, seed=unit.seed)
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
