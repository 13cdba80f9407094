"""Stage: fine-tune a decoder on the codebook (DESIGN.md §3.7). Input: the unit's saved train and val codes;
output: decoder_finetuned.pt and row_finetuned.json (the saved test codes decoded by the tuned decoder)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.metrics.image import image_metrics
from geovq.models.vae import GaussianVAE
from geovq.quantize.base import Quantizer
from geovq.stages.common import Progress, decode_grids
from geovq.stages.row import Row
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import save_checkpoint
from geovq.training.finetune import finetune_decoder
from geovq.training.loop import to_device


def finetune_stage(run: RunDir, cfg: SweepConfig, unit: Unit, data: ImageSplits, device: torch.device,
                   vae: GaussianVAE, quantizer: Quantizer, row: Row, progress: Progress) -> Row:
    """Fine-tune a copy of the VAE's decoder on quantized training latents (a fixed random prefix of at most
    `finetune_max_images` images, the split being shuffled by the split seed), early-stopped on the quantized
    validation split; encoder and codebook stay frozen."""
    out = run.unit(unit)
    layout = quantizer.layout_
    n = min(len(data.train), cfg.finetune_max_images)
    grids = {split: layout.tokens_to_grid(quantizer.decode(np.load(run.codes(unit, split))))
             for split in ("train", "val", "test")}
    train, _, _ = cfg.settings(unit.vae.overrides, unit.seed)
    t0 = time.time()
    tuned, info = finetune_decoder(vae.decoder, grids["train"][:n], data.train[:n], grids["val"], data.val,
                                   train.recon, cfg.finetune_epochs, progress, device,
                                   batch_size=train.batch_size, seed=unit.seed)
    info["seconds"] = time.time() - t0
    save_checkpoint(out / "decoder_finetuned.pt", "decoder", tuned, {"trunk": cfg.trunk.as_dict()}, info)
    recon = decode_grids(tuned, grids["test"], device)
    tuned_row = replace(row, finetuned=True).with_metrics({**image_metrics(to_device(data.test, device), recon),
                                                            "finetune": info})
    run.write_row(unit, tuned_row)
    return tuned_row
