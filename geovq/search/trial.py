"""One trial of `geovq tune`, as a Tune worker runs it. Validation only: the test split is withheld.

A post-hoc trial trains (or reuses) its Gaussian VAE, reporting the VAE's own validation PSNR after every
epoch (ASHA's signal, epochs its resource: see `vae_val_psnr` for which reconstruction), then fits its
quantizer on the training latents, encodes the validation latents and reports validation PSNR at its bit
budget (the objective). A VQ-VAE trial reports the VQ-VAE's validation PSNR after every epoch; its last is the
objective.

Trials that share a VAE configuration share one trained VAE: it lives in vae/{spec.key} (a hash of its whole
configuration), a file lock lets one trial train it while the others wait, and its per-epoch validation PSNR
(`val_psnr_sampled.json`) lets a later trial replay those epochs to the scheduler instead of training them
again. A VAE that ASHA stopped keeps its resume point, so a later trial with the same configuration trains
only the epochs it lacks. Every report carries `epochs_trained`: the epochs this trial itself trained.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.distributed.trial import GEOVQ_ERROR, trial_device, trial_process
from geovq.errors import GeovqError
from geovq.io import write_json
from geovq.stages.common import INFERENCE_BATCH, decode_grids, load_splits, no_progress
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, tuned_unit

#: the metrics a trial reports: the scheduler's (every epoch) and the searcher's (once, at the end)
EPOCH, EPOCH_METRIC, OBJECTIVE, BITS = "epoch", "epoch_val_psnr", "val_psnr", "bits"
#: a model's per-epoch validation PSNR, {epoch: dB}, beside its checkpoint (a VAE's: of posterior samples)
HISTORY, VAE_HISTORY = "val_psnr.json", "val_psnr_sampled.json"
Report = Callable[[dict[str, Any]], None]


class WithheldSplitAccess(RuntimeError):
    """A search touched the test split (a bug: a search must never read it)."""


class WithheldSplits:
    """A dataset's train and val splits; its test split is withheld: reading `test` or `test_labels` raises.
    Stages read `data.train`, `data.val` and `data.native_hw`, so they run on it unchanged."""

    def __init__(self, data: ImageSplits) -> None:
        self.name, self.native_hw, self.description = data.name, data.native_hw, data.description
        self.train, self.val = data.train, data.val
        self.train_labels, self.val_labels = data.train_labels, data.val_labels

    @property
    def test(self) -> np.ndarray:
        raise WithheldSplitAccess(f"the {self.name} test split is withheld during a search")

    test_labels = test


def search_splits(cfg: SweepConfig) -> WithheldSplits:
    """The search's view of the dataset: train (capped by the space's max_train_images) and val, no test."""
    return WithheldSplits(load_splits(cfg))


class Diverged(Exception):
    """A model's validation reconstruction is not finite: the trial ends without a score."""


def search_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """Tune's trainable: `config` is the sampled point (Study.sample's values), `job` the search's fixed part
    (run_dir, config, study, seed)."""
    from ray import tune

    cfg = SweepConfig.from_dict(job["config"])
    study = job["study"]
    candidate = study.candidate(config)
    unit = tuned_unit(cfg, study.method, candidate.record(), job["seed"])
    run = RunDir(Path(job["run_dir"]))
    history = run.unit(unit) / HISTORY if unit.end_to_end else run.vae(unit.vae) / VAE_HISTORY
    fixed = {BITS: candidate.bits, "unit": unit.key, "vae_key": unit.vae.key if unit.vae is not None else None,
             "history": str(history)}
    trained = {"epochs": 0}

    def report(metrics: dict[str, Any]) -> None:
        tune.report({**metrics, "epochs_trained": trained["epochs"], **fixed})

    t0 = time.time()
    with trial_process(cfg.cpus_per_trial):
        try:
            final = run_candidate(run, cfg, unit, search_splits(cfg), trial_device(), report, trained)
        except Diverged as e:
            report({"diverged": 1, "reason": str(e), "seconds": time.time() - t0})
            return
        except GeovqError as e:  # e.g. a setting this dataset cannot take: reported instead of the objective
            report({GEOVQ_ERROR: str(e).splitlines()[0], "seconds": time.time() - t0})
            return
    report({**final, "seconds": time.time() - t0})


def run_candidate(run: RunDir, cfg: SweepConfig, unit: Unit, data: WithheldSplits, device: torch.device,
                  report: Report, trained: dict[str, int]) -> dict[str, Any]:
    """Train (or reuse) the unit's model reporting every epoch but its last; returns the final metrics: the
    last epoch's (which reach the scheduler with the score, so it never stops a trial that has trained every
    epoch before its quantizer is scored) and the objective."""
    from filelock import FileLock

    from geovq.end_to_end import split_params
    from geovq.stages.end_to_end import train_end_to_end_stage
    from geovq.stages.fit import fit_stage
    from geovq.stages.train_vae import train_vae_stage
    from geovq.training.checkpoint import load_model

    if unit.end_to_end:
        out = run.unit(unit)
        out.mkdir(parents=True, exist_ok=True)
        epochs = cfg.settings(split_params(unit.params)[0], unit.seed)[0].epochs
        with FileLock(str(out / ".train.lock")):
            last = train_reporting(out / HISTORY, epochs, report, trained,
                                   lambda on_epoch: train_end_to_end_stage(run, cfg, unit, data, device, no_progress,
                                                                           on_epoch),
                                   lambda model: end_to_end_val_psnr(model, data.val, device))
        return {EPOCH: epochs, EPOCH_METRIC: last, OBJECTIVE: last}
    spec = run.vae(unit.vae)
    spec.mkdir(parents=True, exist_ok=True)
    epochs = cfg.settings(unit.vae.overrides, unit.seed)[0].epochs
    with FileLock(str(spec / ".train.lock")):  # one trial trains a VAE; the others wait, then reuse it
        last = train_reporting(spec / VAE_HISTORY, epochs, report, trained,
                               lambda on_epoch: train_vae_stage(run, cfg, unit.vae, data, device, no_progress,
                                                                on_epoch),
                               lambda model: vae_val_psnr(model, data.val, device))
        vae = load_model(spec / "model.pt", "vae", device)
        extract_search_latents(run, cfg, unit, data, device, vae)
    out = run.unit(unit)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".fit.lock")):
        quantizer = fit_stage(run, cfg, unit, device, vae)
        scored = score_val(run, unit, quantizer, vae, data, device)
    return {EPOCH: epochs, EPOCH_METRIC: last, OBJECTIVE: scored[OBJECTIVE],
            "val_usage_perplexity": scored["val_usage_perplexity"],
            "fit_seconds": quantizer.fit_info_.get("fit_seconds")}


def train_reporting(history_path: Path, epochs: int, report: Report, trained: dict[str, int],
                    train: Callable[[Callable[[int, torch.nn.Module], None]], Any],
                    val_psnr: Callable[[torch.nn.Module], float]) -> float:
    """Replay the epochs a model already has (its `history_path`: {epoch: validation PSNR}) to the scheduler,
    then train the rest (`train(on_epoch)`), recording each and reporting all but the last `epochs`-th;
    returns the last epoch's PSNR. The scheduler may stop the trial at any report: the model keeps its resume
    point and its history."""
    history = {int(k): v for k, v in json.loads(history_path.read_text()).items()} if history_path.exists() else {}
    for epoch in sorted(history):
        if epoch < epochs:
            report({EPOCH: epoch, EPOCH_METRIC: history[epoch]})

    def on_epoch(epoch: int, model: torch.nn.Module) -> None:
        value = val_psnr(model)
        history[epoch] = value
        write_json(history_path, {str(e): v for e, v in sorted(history.items())})
        trained["epochs"] += 1
        if epoch < epochs:
            report({EPOCH: epoch, EPOCH_METRIC: value})

    train(on_epoch)
    if epochs not in history:
        raise GeovqError(f"{history_path} lacks epoch {epochs} of a trained model; delete {history_path.parent} and "
                         "its model is trained again")
    return history[epochs]


def extract_search_latents(run: RunDir, cfg: SweepConfig, unit: Unit, data: WithheldSplits, device: torch.device,
                           vae: torch.nn.Module) -> None:
    """latents_{train,val}.npz of the unit's VAE (never test)."""
    from geovq.stages.extract import extract_latents
    from geovq.stages.train_vae import vae_layout

    for split in ("train", "val"):
        path = run.latents(unit.vae, split)
        if not path.exists():
            extract_latents(vae, getattr(data, split), vae_layout(cfg, unit.vae), device).save(path)


def score_val(run: RunDir, unit: Unit, quantizer: Any, vae: torch.nn.Module, data: WithheldSplits,
              device: torch.device) -> dict[str, float]:
    """Validation PSNR of the quantized validation latents through the VAE's decoder (val.json, cached)."""
    from geovq.metrics.codebook import usage_perplexity
    from geovq.stages.fit import load_latents

    path = run.unit(unit) / "val.json"
    if path.exists():
        return json.loads(path.read_text())
    val = load_latents(run, unit, "val")
    codes, info = quantizer.encode_with_info(val)
    recon = decode_grids(vae.decoder, val.layout.tokens_to_grid(quantizer.decode(codes)), device)
    scored = {OBJECTIVE: mean_psnr(data.val, recon, device),
              "val_usage_perplexity": usage_perplexity(codes, unit.n_codes), "encode_info": info}
    write_json(path, scored)
    return scored


def mean_psnr(images: np.ndarray, recon: torch.Tensor, device: torch.device) -> float:
    """Mean per-image PSNR; Diverged when the reconstruction is not finite (a diverged training)."""
    from geovq.metrics.image import psnr
    from geovq.training.loop import to_device

    if not torch.isfinite(recon).all():
        raise Diverged("the validation reconstruction is not finite")
    return float(psnr(to_device(images, device), recon).mean())


@torch.no_grad()
def vae_val_psnr(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> float:
    """The Gaussian VAE's own validation PSNR, each image decoded from one posterior sample z = μ + σ·ε.

    Why a sample and not μ: a trial is finally scored on its quantized reconstruction, at log2 K bits per
    token. The μ reconstruction uses every bit the encoder has; a posterior sample carries the token's KL,
    which the TDC holds at log2 K: it is the reconstruction at the rate the codes have (the ELBO's, and what
    Gaussian Quant approximates with 2^KL prior samples). On the 27 VAEs of bench/search_efficiency.py's grid
    its Spearman correlation with the final quantized validation PSNR is 0.84 (kmeans) and 0.94 (gq), against
    0.81 and 0.88 for μ; of the 27 pairs of rate allocations trained alike, it orders 26 as k-means codes
    do, μ 21 (μ puts d=4, K=16 above d=8, K=256, whose codes are 1-2 dB better).
    ε is fixed (seed 0, per image), so every trial and epoch is scored on the same noise: paired comparisons."""
    from geovq.stages.extract import encode_images

    mu, logvar = encode_images(model, images, device)
    if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
        raise Diverged("the validation posteriors are not finite")
    noise = np.random.default_rng(0).standard_normal(mu.shape, dtype=np.float32)
    return mean_psnr(images, decode_grids(model.decoder, mu + np.exp(0.5 * logvar) * noise, device), device)


@torch.no_grad()
def end_to_end_val_psnr(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> float:
    """An end-to-end model's validation PSNR: each image through its own codes, code vectors and decoder."""
    from geovq.stages.end_to_end import end_to_end_reconstruct
    from geovq.training.loop import to_device

    model.eval()
    codes = np.concatenate([model.encode_codes(to_device(images[s:s + INFERENCE_BATCH], device)).cpu().numpy()
                            for s in range(0, len(images), INFERENCE_BATCH)])
    return mean_psnr(images, end_to_end_reconstruct(model, device)(codes), device)
