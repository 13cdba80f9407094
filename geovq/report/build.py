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
import os
import shutil
import tempfile
from pathlib import Path

from geovq.errors import GeovqError
from geovq.io import write_json, write_text
from geovq.latents import LatentSet
from geovq.report.figures import (Figure, compare_figure, geometry_figure, rate_distortion_figure, token_kl_figure,
                                  usage_figure)
from geovq.report.html import html_report
from geovq.report.recon import reconstruction_figure, samples_figure
from geovq.report.runs import Runs, load_runs
from geovq.report.tables import COLUMNS, markdown_report
from geovq.stages.units import VaeSpec


def write_report(run_dirs: list[Path], out: Path | None = None) -> Runs:
    """Write results, report.md, report.html and figures for the runs into `out` (the run itself when one).

    Everything is written into a temporary folder inside `out` first and moved into place only once all of it
    was written (report.html last), so a report that fails part-way leaves the previous one as it was."""
    if len(run_dirs) > 1 and out is None:
        raise GeovqError("--out is required when several run directories are merged")
    runs = load_runs(run_dirs)
    out = out or run_dirs[0]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        _write_report_files(stage, runs)
        if (stage / "tb" / "rows").is_dir():  # replaced whole: a re-run's rows, none of the last report's
            shutil.rmtree(out / "tb" / "rows", ignore_errors=True)
        files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: p.name == "report.html")
        for path in files:
            target = out / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return runs


def _write_report_files(out: Path, runs: Runs) -> None:
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
    figures = write_figures(out, runs)
    write_rows_hparams(out / "tb" / "rows", runs.rows)
    write_text(out / "report.html", html_report(runs, figures, out, config_yaml))


#: what the sweep's HParams view compares: a row's settings, and its scores and rates
ROW_HPARAMS = ("dataset", "method", "vae", "finetuned", "K", "token_dim", "seed")
ROW_METRICS = ["psnr", "ssim", "lpips", "bits_per_image", "prior_bits_per_image", "coded_bits_per_image",
               "usage_perplexity", "dead_codes"]


def write_rows_hparams(root: Path, rows: list[dict]) -> None:
    """TensorBoard HParams of the scored rows (tb/rows/UNIT[-finetuned]): `tensorboard --logdir RUN` then compares
    the rows in its HParams tab beside the trainings' own curves."""
    from geovq.report.hparams import HParamsRun, write_hparams

    write_hparams(root, [HParamsRun(r["unit"] + ("-finetuned" if r.get("finetuned") else ""),
                                    {k: "" if r.get(k) is None else r[k] for k in ROW_HPARAMS},
                                    {k: r.get(k) for k in ROW_METRICS}) for r in rows], ROW_METRICS)


def write_figures(out: Path, runs: Runs) -> list[Figure]:
    """Every figure of a report (each with a JSON sidecar of its data); returns them in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    figures = [rate_distortion_figure(out, runs.rows, runs.ceilings, runs.references)]
    by_bits = sorted({r["bits_per_image"] for r in runs.rows})
    for bits in by_bits:
        figures.append(compare_figure(out, runs.rows, runs.ceilings, bits))
        figures.append(usage_figure(out, runs, bits))
        figures.append(reconstruction_figure(out, runs, bits))
        figures.extend(f for f in (samples_figure(out, runs, bits), geometry_figure(out, runs, bits)) if f)
    for run in runs.dirs:  # each VAE's KL figure, drawn into its folder by the first report that finds it missing
        for done in sorted((run.root / "vae").glob("*/ceiling.json")):
            path = done.parent / "kl_histogram.png"
            if not path.exists():
                ceiling = json.loads(done.read_text())
                spec = VaeSpec.from_dict(json.loads((done.parent / "spec.json").read_text()))
                token_kl_figure(done.parent, LatentSet.load(done.parent / "latents_test.npz"),
                                ceiling["tdc_target_bits"], ceiling["tdc_tolerance"], title=spec.slug)
            figures.append(Figure(path, f"per-token KL of VAE {done.parent.name} against log2 K (test tokens)",
                                  {"panels": 2}))
    for figure in figures:
        write_json(figure.path.with_suffix(".json"), {"caption": figure.caption, **figure.data})
    return figures
