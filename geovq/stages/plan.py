"""A run's plan: the units of one configuration in one run directory, planned once (`plan_units`) and handed on,
by the sweep to its Tune driver and by the report to its tables, instead of each planning them again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geovq.config import SweepConfig
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
        run = RunDir(root)
        return cls.of(run, SweepConfig.load(run.config))

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
