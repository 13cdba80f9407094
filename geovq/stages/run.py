"""The two composite stages a sweep schedules: a whole VAE and a whole unit, each resumable stage by stage.

    run_vae:  train_vae -> extract latents (train, val, test) -> score the continuous VAE
    run_unit (post-hoc):   fit -> encode (train, val, test) -> score -> [fine-tune the decoder] -> [prior]
    run_unit (end to end): train the VQ-VAE -> encode (train, val, test) -> score -> [prior]

Each step skips work whose output exists, so an interrupted unit resumes at its first missing file. A unit is
finished when its last step has run: `RunDir.mark_finished` records it, with the prior it ran.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.metrics.latent import quantization_error
from geovq.stages.common import Progress, decode_grids, load_splits
from geovq.stages.encode import encode_stage
from geovq.stages.extract import extract_stage
from geovq.stages.finetune import finetune_stage
from geovq.stages.fit import EdgeLengths, fit_stage, load_latents, load_vae
from geovq.stages.row import Row
from geovq.stages.rundir import RunDir
from geovq.stages.score import rate_diagnostics, score_unit_stage, score_vae_stage
from geovq.stages.train_vae import train_vae_stage
from geovq.stages.units import Unit, VaeSpec
from geovq.stages.end_to_end import encode_end_to_end_stage, train_end_to_end_stage, end_to_end_reconstruct
from geovq.training.checkpoint import load_model


def run_vae(run: RunDir, cfg: SweepConfig, spec: VaeSpec, device: torch.device, progress: Progress,
            data: ImageSplits | None = None, train_only: bool = False) -> dict[str, Any]:
    """Train, extract and score one Gaussian VAE; returns its ceiling.json (or, `train_only`, where its
    training stands: on a cluster the Ray Data stage extracts the latents between Tune phases)."""
    if run.vae_done(spec):
        return json.loads((run.vae(spec) / "ceiling.json").read_text())
    data = data or load_splits(cfg)
    t0 = time.time()
    checkpoint = train_vae_stage(run, cfg, spec, data, device, progress)
    train_seconds = time.time() - t0
    if train_only:
        return {"train_seconds": train_seconds}
    model = load_model(checkpoint, "vae", device)
    extract_stage(run, cfg, spec, data, device, model)
    return score_vae_stage(run, cfg, spec, data, device, model, train_seconds)


def run_unit(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device, progress: Progress,
             data: ImageSplits | None = None, edge_lengths: EdgeLengths | None = None) -> Row:
    """Fit (or train), encode and score one unit, fine-tune its decoder and train and sample its prior when the
    sweep asks, then mark it finished; returns its row (through the VAE's decoder, or the end-to-end model's)."""
    if run.unit_done(unit, cfg.finetune_decoder, cfg.prior):
        return run.read_row(unit)
    run.unmark_finished(unit)  # a crash in what follows must not leave it marked with what it had before
    data = data or load_splits(cfg)
    if unit.end_to_end:
        score_end_to_end(run, cfg, unit, data, device, progress)
    else:
        score_posthoc(run, cfg, unit, data, device, progress, edge_lengths)
    if cfg.prior:
        prior_rows(run, cfg, unit, device, progress, data)
    run.mark_finished(unit, cfg.prior)
    return run.read_row(unit)


def fit_unit(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device) -> None:
    """A post-hoc unit's fit alone (quantizer.npz): on a cluster the Ray Data codes stage encodes its splits next
    (`distributed.tune.encode_on_cluster`), and `run_unit` then finds the fit and the codes and goes on."""
    fit_stage(run, cfg, unit, device)


def score_end_to_end(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                progress: Progress) -> None:
    """Train the unit's end-to-end model, encode every split with it and score its test codes: row.json, unless it
    exists."""
    if run.row_path(unit).exists():
        return
    t0 = time.time()
    model = train_end_to_end_stage(run, cfg, unit, data, device, progress)
    info = encode_end_to_end_stage(run, unit, model, data, device)
    fit = json.loads((run.unit(unit) / "fit.json").read_text())
    extra = {**fit, "latent_error": info["test"]["latent_error"], "seconds": time.time() - t0}
    score_unit_stage(run, cfg, unit, data, device, end_to_end_reconstruct(model, device), extra)


def score_posthoc(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                  progress: Progress, edge_lengths: EdgeLengths | None = None) -> None:
    """Fit the unit's quantizer on its VAE's latents, encode every split and score the test codes (row.json), then
    fine-tune the decoder when the sweep asks (row_finetuned.json); each step skips what exists."""
    t0 = time.time()
    vae = load_vae(run, unit, device)
    quantizer = fit_stage(run, cfg, unit, device, vae, edge_lengths)
    info = encode_stage(run, unit, quantizer)
    if run.row_path(unit).exists():
        row = run.read_row(unit)
    else:
        test = load_latents(run, unit, "test")
        tokens_hat = quantizer.decode(np.load(run.codes(unit, "test")))
        ceiling = json.loads((run.vae(unit.vae) / "ceiling.json").read_text())
        _, tdc, _ = cfg.settings(unit.vae.overrides, unit.seed)
        extra = {"fit_seconds": quantizer.fit_info_.get("fit_seconds"), "encode_seconds": info["test"]["seconds"],
                 "vae_psnr": ceiling["psnr"], **rate_diagnostics(test, unit.n_codes, tdc.tolerance),
                 **quantization_error(tokens_hat.reshape(-1, test.token_dim), test.token_mu, test.token_sigma),
                 "fit_info": quantizer.fit_info_, "encode_info": info["test"], "seconds": time.time() - t0}

        def reconstruct(codes):
            return decode_grids(vae.decoder, test.layout.tokens_to_grid(quantizer.decode(codes)), device)

        row = score_unit_stage(run, cfg, unit, data, device, reconstruct, extra)
    if cfg.finetune_decoder and not run.row_path(unit, finetuned=True).exists():
        finetune_stage(run, cfg, unit, data, device, vae, quantizer, row, progress)


#: samples.json fields renamed sample_* in a row (they would read as the row's own otherwise)
SAMPLE_SETTINGS = ("n", "seed", "temperature", "top_k", "top_p", "decoder", "decode_seconds", "n_real", "n_samples")
#: prior.json fields a results row carries (the validation curve and the prior's settings stay in prior.json)
PRIOR_ROW_FIELDS = ("prior", "prior_bits_per_token", "prior_bits_per_image", "coded_bits_per_image",
                    "unigram_bits_per_image", "prior_val_bits_per_token", "prior_parameters", "prior_train_seconds")


def prior_rows(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device, progress: Progress,
               data: ImageSplits) -> None:
    """Train the unit's prior and sample it (geovq.stages.prior); its rate goes into every row of the unit, the
    sample metrics into the row of the decoder the samples were decoded by (the fine-tuned one where it
    exists)."""
    from geovq.stages.prior import decoder_kind, prior_stage, sample_stage

    prior = prior_stage(run, cfg, unit, device, progress, kind=cfg.prior, data=data)
    samples = sample_stage(run, cfg, unit, device, progress, n=cfg.prior_samples, kind=cfg.prior, seed=unit.seed,
                           data=data)
    rate = {key: prior[key] for key in PRIOR_ROW_FIELDS}
    sampled = {(f"sample_{key}" if key in SAMPLE_SETTINGS else key): value for key, value in samples.items()
               if key not in ("prior", "prior_conditional")}
    for finetuned in (False, True):
        if run.row_path(unit, finetuned).exists():
            own = samples["decoder"] == decoder_kind(unit, finetuned)
            run.write_row(unit, run.read_row(unit, finetuned).with_metrics({**rate, **(sampled if own else {})}))
