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
        row.json                         the scored test row (a `Row`; the prior stage adds its rate, samples)
        decoder_finetuned.pt, row_finetuned.json   with --finetune-decoder
        finished.json                    written last, with the prior it ran: the unit is finished
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

from geovq.errors import GeovqError
from geovq.io import one_line, write_json
from geovq.stages.row import Row
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

    def row_path(self, unit: Unit, finetuned: bool = False) -> Path:
        return self.unit(unit) / ("row_finetuned.json" if finetuned else "row.json")

    def write_row(self, unit: Unit, row: Row) -> None:
        write_json(self.inside(self.row_path(unit, row.finetuned)), row.as_dict())

    def read_row(self, unit: Unit, finetuned: bool = False) -> Row:
        return load_row(self.inside(self.row_path(unit, finetuned)))

    def rows(self) -> list[Row]:
        """Every row the run holds: each scored unit's, and its fine-tuned decoder's where there is one."""
        return [load_row(self.inside(path)) for path in sorted(self.root.glob("units/*/row*.json"))]

    def inside(self, path: Path) -> Path:
        """`path` if it lies inside the run directory once links are followed; a folder linked out of the run
        is refused (geovq would read or write through it)."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise GeovqError(f"{path} leads out of the run directory {self.root} (a symbolic link?); geovq reads and "
                             "writes only inside it: replace the link by the folder itself")
        return path

    def mark_finished(self, unit: Unit, prior: str | None) -> None:
        """The unit ran to its end: scored, fine-tuned where asked, and with `prior` trained and sampled."""
        write_json(self.unit(unit) / "finished.json", {"prior": prior})

    def unmark_finished(self, unit: Unit) -> None:
        """Before a unit's stages run again (a prior or a fine-tune newly asked, a deleted row): until they
        end, it is not finished with what it was finished with."""
        (self.unit(unit) / "finished.json").unlink(missing_ok=True)

    def unit_done(self, unit: Unit, finetune: bool, prior: str | None = None) -> bool:
        """Finished, with what is asked now: when fine-tuning is asked of a post-hoc unit, its fine-tuned row; when
        a prior is asked, that prior. Its rows must still be there (a deleted row is scored again)."""
        marker = self.unit(unit) / "finished.json"
        if not marker.exists() or not self.row_path(unit).exists():
            return False
        if finetune and not unit.end_to_end and not self.row_path(unit, finetuned=True).exists():
            return False
        return prior is None or json.loads(marker.read_text())["prior"] == prior


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def load_row(path: Path) -> Row:
    """A results row file, read defensively: truncated or invalid JSON, NaN or Infinity, a missing or mistyped
    field are one GeovqError naming the file (delete it and re-run the command: the unit is scored again)."""
    try:
        return Row.checked(json.loads(path.read_text(), parse_constant=_no_constant))
    except (ValueError, UnicodeDecodeError, GeovqError) as e:
        raise GeovqError(f"{path} is not a valid results row ({one_line(e)}); delete it and re-run "
                         "the same command to score its unit again") from None
