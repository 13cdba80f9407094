"""The runs a report reads: run directories of one dataset, checked against each other, each planned once from
its config.yaml, with their rows, continuous-VAE ceilings and progress (finished of planned units)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovq.config import SweepConfig, changed_options
from geovq.errors import GeovqError
from geovq.report.tables import sort_rows
from geovq.stages.plan import RunPlan
from geovq.stages.reference import FILE as REFERENCE_FILE
from geovq.stages.rundir import RunDir


@dataclass
class Runs:
    """The runs of one report: their configuration, rows (each knowing its run) and continuous-VAE ceilings."""

    dirs: list[RunDir]
    cfg: SweepConfig
    rows: list[dict[str, Any]]
    ceilings: list[dict[str, Any]]
    finished: int
    planned: int
    #: JPEG and WebP on the test images (stages.reference), where the first run has them; merged runs share a split
    references: dict[str, Any] | None = None

    def run_of(self, row: dict[str, Any]) -> RunDir:
        return next(d for d in self.dirs if len(self.dirs) == 1 or d.root.name == row["run"])


def load_runs(run_dirs: list[Path]) -> Runs:
    """The runs, checked: each a geovq run directory, all of one dataset, with compatible configurations."""
    if not run_dirs:
        raise GeovqError("give at least one run directory")
    plans = []
    for path in run_dirs:
        if not path.is_dir():
            raise GeovqError(f"{path} is not a folder; expected a run directory written by `geovq sweep`")
        if not (path / "config.yaml").exists():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
            raise GeovqError(f"{path} is not a geovq run directory: found {found}, expected config.yaml, units/ and "
                             "vae/ as `geovq sweep --out` writes them")
        plans.append(RunPlan.load(path))
    names = [plan.run.root.name for plan in plans]
    if len(set(names)) < len(names):
        raise GeovqError(f"run directories must have distinct names to be merged; got {', '.join(names)}")
    first = plans[0].cfg
    for path, plan in zip(run_dirs[1:], plans[1:]):
        if plan.cfg.dataset != first.dataset:
            raise GeovqError(f"{path} is a {plan.cfg.dataset} run, {run_dirs[0]} a {first.dataset} run; a report "
                             "merges runs of one dataset")
        # the prior settings change no reconstruction: each row records its own prior and sample count
        changed = changed_options(first, plan.cfg, ignore=("prior", "prior_samples"))
        if changed:
            raise GeovqError(f"{path} and {run_dirs[0]} differ in more than methods, K, seeds, VAE variants and priors "
                             f"({'; '.join(changed)}); they cannot share a table")
    rows, ceilings = [], []
    for plan in plans:
        merged = {"run": plan.run.root.name} if len(plans) > 1 else {}  # which run a merged report's row is from
        rows += [{**row.as_dict(), **merged} for row in plan.run.rows()]
        ceilings += [json.loads(p.read_text()) for p in sorted((plan.run.root / "vae").glob("*/ceiling.json"))]
    if not rows:
        raise GeovqError(f"{', '.join(map(str, run_dirs))} holds no finished unit yet; run `geovq sweep` first")
    references = next((json.loads(p.read_text()) for plan in plans
                       if (p := plan.run.root / REFERENCE_FILE).exists()), None)
    return Runs([plan.run for plan in plans], first, sort_rows(rows), ceilings,
                finished=sum(plan.finished() for plan in plans), planned=sum(len(plan.units) for plan in plans),
                references=references)
