"""Stage: encode the train, val and test splits with a fitted quantizer. Output: codes_{split}.npy and
encode.json (per split: seconds, and whatever the method reports, e.g. an approximate rule's agreement).

Every split is saved: priors train on train codes and stop early on val codes; the test codes are scored.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

import numpy as np

from geovq.config import SweepConfig
from geovq.io import save_npy, write_json
from geovq.quantize.base import Quantizer
from geovq.stages.fit import load_latents
from geovq.stages.rundir import SPLITS, RunDir
from geovq.stages.units import Unit

if TYPE_CHECKING:
    import torch


def unit_encoder(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device,
                 fitted: tuple[torch.nn.Module, Quantizer | None] | None = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """images (N, ch, H, W) in [0, 1] -> (N, T) codes by the unit's own rule: an end-to-end model's, or the
    VAE's posterior means cut into the unit's tokens and encoded by its fitted quantizer (as the sweep encoded
    its splits). The counterpart of `stages.prior.code_decoder`; `fitted` as there."""
    import torch

    from geovq.stages.common import INFERENCE_BATCH
    from geovq.stages.extract import extract_latents
    from geovq.stages.fit import load_fitted
    from geovq.stages.train_vae import vae_layout
    from geovq.training.loop import to_device

    model, quantizer = fitted or load_fitted(run, unit, device)
    if unit.end_to_end:
        model.eval()

        @torch.no_grad()
        def encode_end_to_end(images: np.ndarray) -> np.ndarray:
            return np.concatenate([model.encode_codes(to_device(images[s:s + INFERENCE_BATCH], device)).cpu().numpy()
                                   for s in range(0, len(images), INFERENCE_BATCH)] or [np.zeros((0, 0), np.int64)])

        return encode_end_to_end
    layout = vae_layout(cfg, unit.vae)

    def encode_posthoc(images: np.ndarray) -> np.ndarray:
        return quantizer.encode(extract_latents(model, images, layout, device).with_tokens(unit.token_dim,
                                                                                           unit.grouping))

    return encode_posthoc


def code_dtype(n_codes: int) -> type:
    return np.int32 if n_codes < 2**31 else np.int64


def encode_records(run: RunDir, unit: Unit) -> tuple[dict[str, dict], list[str]]:
    """encode.json's content ({split: info}) and the splits still to encode (no codes, or no record of them)."""
    info_path = run.unit(unit) / "encode.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return info, [split for split in SPLITS if not (run.codes(unit, split).exists() and split in info)]


def save_codes(run: RunDir, unit: Unit, split: str, codes: np.ndarray, record: dict, info: dict[str, dict]) -> None:
    """A split's codes (codes_{split}.npy) and their record, added to encode.json's content `info`."""
    info[split] = record
    save_npy(run.codes(unit, split), codes.astype(code_dtype(unit.n_codes)))
    write_json(run.unit(unit) / "encode.json", info)


def encode_stage(run: RunDir, unit: Unit, quantizer: Quantizer) -> dict[str, dict]:
    """Encode each split not yet encoded (on a cluster the Ray Data codes stage may have encoded them:
    `distributed.tune.encode_on_cluster`); returns encode.json's content ({split: info})."""
    info, missing = encode_records(run, unit)
    for split in missing:
        codes, record = quantizer.encode_with_info(load_latents(run, unit, split))
        save_codes(run, unit, split, codes, record, info)
    return info
