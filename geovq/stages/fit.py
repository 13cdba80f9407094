"""Stage: fit a post-hoc quantizer. Input: the unit and its VAE's training latents; output: quantizer.npz.

A quantizer that needs the decoder (geodesic) gets the VAE's decoder on `device`; its edge lengths may be
measured elsewhere (`edge_lengths`, e.g. Ray Data workers running `geovq.stages.edges`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.errors import GeovqError
from geovq.io import write_json
from geovq.latents import LatentSet
from geovq.models.vae import GaussianVAE
from geovq.quantize.base import Quantizer, get_quantizer_class
from geovq.stages.common import GridDecoder
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import END_TO_END_KINDS, load_model

EdgeLengths = Callable[[np.ndarray, np.ndarray], np.ndarray]


def load_vae(run: RunDir, unit: Unit, device: torch.device) -> GaussianVAE:
    return load_model(run.vae(unit.vae) / "model.pt", "vae", device)


def load_fitted(run: RunDir, unit: Unit, device: torch.device) -> tuple[torch.nn.Module, Quantizer | None]:
    """A finished unit's models on `device`: (its end-to-end model, None), or (its Gaussian VAE, its fitted post-hoc
    quantizer with what it needs at run time). What encoding images and decoding codes both start from."""
    if unit.end_to_end:
        return load_model(run.unit(unit) / "model.pt", END_TO_END_KINDS, device), None
    path = run.unit(unit) / "quantizer.npz"
    if not path.exists():
        raise GeovqError(f"unit {unit.key} has no fitted quantizer in {run.root}: run the unit first")
    vae = load_vae(run, unit, device)
    return vae, Quantizer.load(path, **runtime_options(get_quantizer_class(unit.method, unit.quantizer), vae))


def load_latents(run: RunDir, unit: Unit, split: str) -> LatentSet:
    """A split's latents of the unit's VAE, cut into the unit's tokens."""
    return LatentSet.load(run.latents(unit.vae, split)).with_tokens(unit.token_dim, unit.grouping)


def runtime_options(qcls: type[Quantizer], vae: GaussianVAE) -> dict[str, Any]:
    """What a quantizer class needs beside its hyperparameters: the decoder, for geometry-aware methods."""
    return {"decoder": GridDecoder(vae)} if qcls.needs_decoder else {}


def fit_stage(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device, vae: GaussianVAE | None = None,
              edge_lengths: EdgeLengths | None = None) -> Quantizer:
    """Fit the unit's quantizer on its VAE's training latents and save it; or load it when already saved."""
    out = run.unit(unit)
    path = out / "quantizer.npz"
    qcls = get_quantizer_class(unit.method, unit.quantizer)
    vae = vae or load_vae(run, unit, device)
    if path.exists():
        return Quantizer.load(path, **runtime_options(qcls, vae))
    write_json(out / "unit.json", unit.to_dict())
    train = load_latents(run, unit, "train")
    quantizer = qcls(n_codes=unit.n_codes, seed=unit.seed, **dict(unit.params), **runtime_options(qcls, vae))
    t0 = time.time()
    quantizer.fit(train, **({"edge_lengths": edge_lengths} if edge_lengths is not None else {}))
    quantizer.fit_info_["fit_seconds"] = time.time() - t0
    quantizer.save(path)
    return quantizer
