"""Collects the unit rows of a run into results.json / results.csv / report.md.

report.md groups rows by bits per image (only rows at equal bits are comparable) and summarises seeds as
mean ± 95% confidence half-width (Student t), the per-seed rows staying in results.json/.csv.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

from geovq.io import write_json, write_text

COLUMNS = ["dataset", "method", "vae", "finetuned", "K", "token_dim", "grouping", "tokens_per_image",
           "bits_per_image", "bpp", "seed", "psnr", "ssim", "lpips", "mse", "usage_perplexity",
           "usage_perplexity_corrected", "dead_codes", "latent_error", "latent_error_sigma", "frac_beyond_sigma",
           "mean_token_kl_bits", "rate_gap_bits", "frac_tokens_in_band", "vae_psnr", "n_test", "seconds",
           "lpips_reason", "codes_path"]
SUMMARY_METRICS = ["psnr", "ssim", "lpips", "mse", "usage_perplexity", "dead_codes"]


def collect_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "units").glob("*/row*.json"))]
    return sorted(rows, key=lambda r: (r["bits_per_image"], r["method"], r.get("vae") or "", r["finetuned"], r["seed"]))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and 95% CI half-width (Student t); no half-width from a single seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def _fmt(mean: float, half: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown_report(rows: list[dict[str, Any]], ceilings: list[dict[str, Any]], config_yaml: str,
                    finished: int, planned: int) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["bits_per_image"], r["K"], r["method"], r.get("vae"), r["finetuned"])].append(r)
    title = "# geovq results" if finished >= planned else \
        f"# geovq results (PARTIAL: {finished} of {planned} units finished)"
    lines = [title, "",
             "Paired metrics on the held-out test split; mean ± 95% CI over seeds (n = seeds). "
             "Rows are comparable only within one bits-per-image group.", ""]
    by_vae: dict[tuple, list[dict]] = defaultdict(list)
    for c in ceilings:
        by_vae[(c["vae"], c.get("tdc_target_bits"))].append(c)
    for (vae, target), cs in sorted(by_vae.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        m, h = mean_ci([c["psnr"] for c in cs])
        label = "plain" if target is None else f"tdc, T = {target:g} bits"
        band = (f", {100 * sum(c['frac_tokens_in_band'] for c in cs) / len(cs):.1f}% of test tokens within "
                f"±{cs[0]['tdc_tolerance']:g} bit of T" if target is not None else "")
        lines += [f"- Continuous Gaussian VAE ({label}), no quantization (the ceiling): PSNR {_fmt(m, h, 2)} dB, "
                  f"mean token KL {sum(c['mean_token_kl_bits'] for c in cs) / len(cs):.2f} bits{band} "
                  f"(n = {len(cs)})."]
    current_bits = None
    header = ("| method | vae | decoder | K | bits/image | bpp | n | PSNR (dB) | SSIM | LPIPS | MSE | usage perplexity "
              "| dead codes |")
    for (bits, k, method, vae, tuned), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3] or "", kv[0][4])):
        if bits != current_bits:
            lines += ["", f"## {bits:g} bits per image", "", header, "|" + "---|" * 13]
            current_bits = bits
        cells = []
        for metric, digits in zip(SUMMARY_METRICS, (2, 4, 4, 5, 1, 1)):
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            cells.append(_fmt(*mean_ci(vals), digits) if vals else "n/a")
        decoder = "fine-tuned" if tuned else ("end-to-end" if vae is None else "VAE's")
        lines.append(f"| {method} | {vae or '—'} | {decoder} | {k} | {bits:g} | {rs[0]['bpp']:.3f} | {len(rs)} | "
                     + " | ".join(cells) + " |")
    lines += settings_table(rows)
    reasons = sorted({r["lpips_reason"] for r in rows if r.get("lpips") is None and r.get("lpips_reason")})
    if reasons:
        lines += ["", "LPIPS n/a: " + "; ".join(reasons)]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def settings_table(rows: list[dict[str, Any]]) -> list[str]:
    """Which settings each row used (a tuned sweep gives every method its own): the VAE's training overrides
    and the method's hyperparameters; nothing when every row runs the defaults."""
    def fmt(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items())) or "—"

    seen = sorted({(r["method"], r.get("vae") or "—", r["K"], r["token_dim"], fmt(r.get("vae_overrides") or {}),
                    fmt(r.get("params") or {})) for r in rows})
    if all(vae == params == "—" for *_, vae, params in seen):
        return []
    lines = ["", "## Settings of each row", "", "| method | vae | K | d | VAE training | hyperparameters |",
             "|" + "---|" * 6]
    return lines + [f"| {m} | {v} | {k} | {d} | {vae} | {params} |" for m, v, k, d, vae, params in seen]


def progress(run_dir: Path) -> tuple[int, int]:
    """(finished, planned) units of a run directory, planned by its config.yaml (every unit it has held)."""
    from geovq.config import SweepConfig
    from geovq.stages.rundir import RunDir
    from geovq.stages.units import plan_units

    cfg = SweepConfig.load(run_dir / "config.yaml")
    planned = plan_units(cfg)
    return sum(RunDir(run_dir).unit_done(u, cfg.finetune_decoder) for u in planned), len(planned)


def write_results(run_dir: Path) -> list[dict[str, Any]]:
    """results.json/.csv, report.md (titled partial while units are missing) and figures; returns the rows."""
    rows = collect_rows(run_dir)
    ceilings = [json.loads(p.read_text()) for p in sorted((run_dir / "vae").glob("*/ceiling.json"))]
    write_json(run_dir / "results.json", rows)
    buf = io.StringIO()
    # nested records (fit_info, encode_info, params, finetune) stay in results.json
    extra = sorted({k for r in rows for k, v in r.items() if not isinstance(v, dict)} - set(COLUMNS))
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "results.csv", buf.getvalue())
    # shared results carry no home directory (the data root of a dataset read from disk lives there)
    config_yaml = (run_dir / "config.yaml").read_text().replace(str(Path.home()), "~")
    write_text(run_dir / "report.md", markdown_report(rows, ceilings, config_yaml, *progress(run_dir)))
    from geovq.report.figures import write_figures

    write_figures(run_dir, rows, ceilings)
    return rows
