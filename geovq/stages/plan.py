"""A run's plan: the units of one configuration in one run directory, planned once (`plan_units`) and handed on,
by the sweep to its Tune driver and by the report to its tables, instead of each planning them again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geovq.config import SweepConfig
from geovq.errors import GeovqError
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, VaeSpec, plan_units


@dataclass(frozen=True)
class RunPlan:
    run: RunDir
    cfg: SweepConfig
    units: tuple[Unit, ...]

    @classmethod
    def of(cls, run: RunDir, cfg: SweepConfig) -> RunPlan:
        return cls(run, cfg, tuple(plan_units(cfg)))

    @classmethod
    def load(cls, root: Path) -> RunPlan:
        """The plan of what a run directory records (its config.yaml: every unit it has held)."""
        if not (root / "config.yaml").exists():
            raise GeovqError(f"{root} is not a geovq run directory (no config.yaml)")
        run = RunDir(root)
        return cls.of(run, SweepConfig.load(run.config))

    def with_codes(self) -> list[Unit]:
        """The units that have been fitted or trained (their unit.json exists)."""
        return [u for u in self.units if (self.run.unit(u) / "unit.json").exists()]

    def select(self, method: str, vae: str | None, k: int | None, seed: int) -> Unit:
        """The one unit of `method` with this seed (and VAE variant, K where given): how `geovq sample` and
        `geovq compress` name a unit; GeovqError listing the choices when none or several match."""
        units = self.with_codes()
        if not units:
            raise GeovqError(f"{self.run.root} holds no unit with codes yet; run `geovq sweep` first")
        methods = sorted({u.method for u in units})
        if method not in methods:
            raise GeovqError(f"no {method!r} unit in {self.run.root}; valid: {', '.join(methods)}")
        chosen = [u for u in units if u.method == method and u.seed == seed and (k is None or u.n_codes == k)
                  and (vae is None or (u.vae is not None and u.vae.variant == vae))]
        if len(chosen) != 1:
            options = "; ".join(f"--vae {u.vae.variant if u.vae else '-'} --k {u.n_codes} --seed {u.seed}"
                                for u in units if u.method == method)
            raise GeovqError(f"{'no' if not chosen else len(chosen)} {method} unit(s) match; choose one of: {options}")
        return chosen[0]

    @property
    def vaes(self) -> list[VaeSpec]:
        """The Gaussian VAEs the post-hoc units need, each once."""
        return sorted({u.vae for u in self.units if not u.end_to_end}, key=lambda v: v.key)

    def done(self, unit: Unit) -> bool:
        """Finished with what this configuration asks (its fine-tuned row, its prior)."""
        return self.run.unit_done(unit, self.cfg.finetune_decoder, self.cfg.prior)

    def pending(self) -> list[Unit]:
        return [u for u in self.units if not self.done(u)]

    def finished(self) -> int:
        return len(self.units) - len(self.pending())
