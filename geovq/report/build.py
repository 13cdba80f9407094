"""One report from one or more run directories of the same dataset: tables, figures and a static HTML page.

    write_report([run_a, run_b], out)   ->  out/results.json, results.csv, report.md, report.html, figures/*.png

Runs merge when their configurations are the same apart from methods, codebook sizes, seeds and VAE variants
(`SweepConfig.identity`): then their rows are rows of one experiment. Rows of merged runs carry `run` (the run
directory's name, never a path: shared results hold no home directory).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovq.config import SweepConfig, changed_options
from geovq.errors import GeovqError
from geovq.io import write_json, write_text
from geovq.report.tables import COLUMNS, collect_rows, markdown_report, progress, sort_rows
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


def write_report(run_dirs: list[Path], out: Path | None = None) -> Runs:
    """Write results, report.md, report.html and figures for the runs into `out` (the run itself when one)."""
    if len(run_dirs) > 1 and out is None:
        raise GeovqError("--out is required when several run directories are merged")
    runs = load_runs(run_dirs)
    out = out or run_dirs[0]
    write_json(out / "results.json", runs.rows)
    buf = io.StringIO()
    # nested records (fit_info, encode_info, params, finetune) stay in results.json
    extra = sorted({k for r in runs.rows for k, v in r.items() if not isinstance(v, dict)} - set(COLUMNS))
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs.rows)
    write_text(out / "results.csv", buf.getvalue())
    # shared results carry no home directory (the data root of a dataset read from disk lives there)
    config_yaml = runs.cfg.to_yaml().replace(str(Path.home()), "~")
    write_text(out / "report.md", markdown_report(runs.rows, runs.ceilings, config_yaml, runs.finished,
                                                  runs.planned))
    from geovq.report.figures import write_figures
    from geovq.report.html import html_report

    figures = write_figures(out, runs)
    write_text(out / "report.html", html_report(runs, figures, out, config_yaml))
    return runs
