"""The run-directory layout: where every stage reads and writes. One place, so no stage builds a path.

    config.yaml                          the resolved SweepConfig (with run_format)
    sweep.log                            what the driver did, with timings
    vae/{spec.key}/                      one Gaussian VAE (see `RunDir.vae`)
        spec.json                        the VaeSpec it was trained for
        model.pt, state.pt               weights + config + TDC state; the resume point of its training
        latents_{train,val,test}.npz     posterior μ, log σ² grids (any token dim d cuts them)
        ceiling.json                     its own test metrics and per-token KL: the VAE is finished
        kl_histogram.png, tb/
    units/{unit.key}/                    one unit (see `RunDir.unit`)
        unit.json                        the Unit
        quantizer.npz | model.pt         the fitted quantizer (post-hoc) or the trained VQ-VAE (end to end)
        codes_{train,val,test}.npy       int codes, images × tokens
        encode.json                      how each split was encoded (seconds, rules, agreement checks)
        row.json                         the scored test row: the unit is finished
        decoder_finetuned.pt, row_finetuned.json   with --finetune-decoder
        prior-{kind}[-cond]/             a prior over its codes (see `RunDir.prior`)
            prior.pt, prior.json             best-validation weights; test bits/token and bits/image
            state.pt                         the resume point while it trains
            samples-…/                       samples.png, samples.npz, samples.json (sample metrics)
    domain/classifier.pt, classifier.json   the domain classifier of sample metrics (features, test accuracy)
    results.json, results.csv, report.md, figures/
    ray/                                 Ray Tune's own records
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from geovq.stages.units import Unit, VaeSpec

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "sweep.log"

    def vae(self, spec: VaeSpec) -> Path:
        return self.root / "vae" / spec.key

    def vae_done(self, spec: VaeSpec) -> bool:
        """Scored, and its checkpoint still there (a deleted checkpoint is rebuilt from its resume point)."""
        return (self.vae(spec) / "ceiling.json").exists() and (self.vae(spec) / "model.pt").exists()

    def latents(self, spec: VaeSpec, split: str) -> Path:
        return self.vae(spec) / f"latents_{split}.npz"

    def unit(self, unit: Unit) -> Path:
        return self.root / "units" / unit.key

    def codes(self, unit: Unit, split: str) -> Path:
        return self.unit(unit) / f"codes_{split}.npy"

    def prior(self, unit: Unit, kind: str, conditional: bool = False) -> Path:
        return self.unit(unit) / f"prior-{kind}{'-cond' if conditional else ''}"

    @property
    def domain(self) -> Path:
        return self.root / "domain"

    def unit_done(self, unit: Unit, finetune: bool, prior: str | None = None) -> bool:
        """Finished: its row exists; when fine-tuning is asked of a post-hoc unit, its fine-tuned row too; when a
        prior is asked, its row carries that prior's rate (and samples)."""
        out = self.unit(unit)
        rows = [out / "row.json"] + ([out / "row_finetuned.json"] if finetune and not unit.end_to_end else [])
        if not all(row.exists() for row in rows):
            return False
        return prior is None or json.loads(rows[0].read_text()).get("prior") == prior
