"""The runs a report reads: run directories of one dataset, checked against each other, with their rows,
continuous-VAE ceilings and progress (finished of planned units)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovq.config import SweepConfig, changed_options
from geovq.errors import GeovqError
from geovq.report.tables import sort_rows
from geovq.stages.rundir import RunDir
from geovq.stages.units import plan_units


@dataclass
class Runs:
    """The runs of one report: their configuration, rows (each knowing its run) and continuous-VAE ceilings."""

    dirs: list[RunDir]
    cfg: SweepConfig
    rows: list[dict[str, Any]]
    ceilings: list[dict[str, Any]]
    finished: int
    planned: int

    def run_of(self, row: dict[str, Any]) -> RunDir:
        return next(d for d in self.dirs if len(self.dirs) == 1 or d.root.name == row["run"])


def load_runs(run_dirs: list[Path]) -> Runs:
    """The runs, checked: each a geovq run directory, all of one dataset, with compatible configurations."""
    if not run_dirs:
        raise GeovqError("give at least one run directory")
    dirs, configs = [], []
    for path in run_dirs:
        if not path.is_dir():
            raise GeovqError(f"{path} is not a folder; expected a run directory written by `geovq sweep`")
        if not (path / "config.yaml").exists():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
            raise GeovqError(f"{path} is not a geovq run directory: found {found}, expected config.yaml, units/ and "
                             "vae/ as `geovq sweep --out` writes them")
        dirs.append(RunDir(path))
        configs.append(SweepConfig.load(path / "config.yaml"))
    names = [d.root.name for d in dirs]
    if len(set(names)) < len(names):
        raise GeovqError(f"run directories must have distinct names to be merged; got {', '.join(names)}")
    first = configs[0]
    for path, cfg in zip(run_dirs[1:], configs[1:]):
        if cfg.dataset != first.dataset:
            raise GeovqError(f"{path} is a {cfg.dataset} run, {run_dirs[0]} a {first.dataset} run; a report "
                             "merges runs of one dataset")
        # the prior settings change no reconstruction: each row records its own prior and sample count
        changed = changed_options(first, cfg, ignore=("prior", "prior_samples"))
        if changed:
            raise GeovqError(f"{path} and {run_dirs[0]} differ in more than methods, K, seeds, VAE variants and priors "
                             f"({'; '.join(changed)}); they cannot share a table")
    rows, ceilings, finished, planned = [], [], 0, 0
    for d in dirs:
        for row in collect_rows(d.root):
            rows.append({**row, "run": d.root.name} if len(dirs) > 1 else row)
        ceilings += [json.loads(p.read_text()) for p in sorted((d.root / "vae").glob("*/ceiling.json"))]
        done, total = progress(d.root)
        finished, planned = finished + done, planned + total
    if not rows:
        raise GeovqError(f"{', '.join(map(str, run_dirs))} holds no finished unit yet; run `geovq sweep` first")
    return Runs(dirs, first, sort_rows(rows), ceilings, finished, planned)


def collect_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every results row a run directory holds (each unit's row.json and row_finetuned.json)."""
    return [row.as_dict() for row in RunDir(run_dir).rows()]


def progress(run_dir: Path) -> tuple[int, int]:
    """(finished, planned) units of a run directory, planned by its config.yaml (every unit it has held)."""
    cfg = SweepConfig.load(run_dir / "config.yaml")
    planned = plan_units(cfg)
    return sum(RunDir(run_dir).unit_done(u, cfg.finetune_decoder, cfg.prior) for u in planned), len(planned)
