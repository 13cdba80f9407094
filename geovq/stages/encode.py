"""Stage: encode the train, val and test splits with a fitted quantizer. Output: codes_{split}.npy and
encode.json (per split: seconds, and whatever the method reports, e.g. an approximate rule's agreement).

Every split is saved: priors train on train codes and stop early on val codes; the test codes are scored.
"""

from __future__ import annotations

import json

import numpy as np

from geovq.io import save_npy, write_json
from geovq.quantize.base import Quantizer
from geovq.stages.fit import load_latents
from geovq.stages.rundir import SPLITS, RunDir
from geovq.stages.units import Unit


def code_dtype(n_codes: int) -> type:
    return np.int32 if n_codes < 2**31 else np.int64


def encode_stage(run: RunDir, unit: Unit, quantizer: Quantizer) -> dict[str, dict]:
    """Encode each split not yet encoded; returns encode.json's content ({split: info})."""
    info_path = run.unit(unit) / "encode.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    for split in SPLITS:
        if run.codes(unit, split).exists() and split in info:
            continue
        codes, info[split] = quantizer.encode_with_info(load_latents(run, unit, split))
        save_npy(run.codes(unit, split), codes.astype(code_dtype(unit.n_codes)))
        write_json(info_path, info)
    return info
