"""The tables of a report: results rows summarised per rate, as report.md (and report.html) show them.

report.md groups rows by bits per image (only rows at equal bits are comparable) and summarises seeds as
mean ± 95% confidence half-width (Student t), the per-seed rows staying in results.json/.csv.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from scipy import stats


COLUMNS = ["dataset", "method", "vae", "finetuned", "K", "token_dim", "grouping", "tokens_per_image",
           "bits_per_image", "bpp", "seed", "psnr", "ssim", "lpips", "mse", "usage_perplexity",
           "usage_perplexity_corrected", "dead_codes", "latent_error", "latent_error_sigma", "frac_beyond_sigma",
           "mean_token_kl_bits", "rate_gap_bits", "frac_tokens_in_band", "vae_psnr", "n_test", "seconds",
           "lpips_reason", "codes_path"]
SUMMARY_METRICS = ["psnr", "ssim", "lpips", "mse", "usage_perplexity", "dead_codes", "coded_bits_per_image"]


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["bits_per_image"], r["method"], r.get("vae") or "", r["finetuned"],
                                       r["seed"], r.get("run", "")))


def decoder_label(finetuned: bool, vae: str | None) -> str:
    """Which decoder made a row's reconstructions: its VAE's own, the one fine-tuned on the codebook, or (no VAE)
    the VQ-VAE's, trained end to end with its codebook."""
    return "fine-tuned" if finetuned else ("end-to-end" if vae is None else "VAE's")


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


@dataclass
class SummaryLine:
    """One (method, VAE, decoder, K) at one rate: metrics as mean ± 95% CI over its seeds."""

    method: str
    vae: str | None
    decoder: str  # decoder_label
    k: int
    bits: float
    bpp: float
    n: int
    cells: list[str]  # one per SUMMARY_HEADER column after "n"
    psnr: float  # mean, to rank lines within their rate


def paired_difference(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> tuple[float, float | None] | None:
    """PSNR of `rows` minus the baseline's, paired by seed (seed s seeds both the VAE's and the VQ-VAE's
    initialisation and batch order): mean and 95% CI half-width over the seeds both hold, None if they share
    none. Two lines' own intervals overlap whenever the seeds spread widely; the interval of their difference is
    what says whether a method beats the baseline. A seed that holds several rows (merged runs) counts with
    their mean."""
    def by_seed(rs: list[dict[str, Any]]) -> dict[int, float]:
        seeds: dict[int, list[float]] = defaultdict(list)
        for r in rs:
            seeds[r["seed"]].append(r["psnr"])
        return {s: sum(v) / len(v) for s, v in seeds.items()}

    mine, base = by_seed(rows), by_seed(baseline)
    diffs = [mine[s] - base[s] for s in sorted(mine.keys() & base.keys())]
    return mean_ci(diffs) if diffs else None


def vqvae_difference(line: list[dict[str, Any]], rows: list[dict[str, Any]]) -> tuple[float, float | None] | None:
    """`paired_difference` of a line (its rows at one rate) against the end-to-end VQ-VAE among `rows` at
    the same rate and K (so with the same token layout); None for the VQ-VAE itself or where there is none."""
    first = line[0]
    if first["method"] == "vqvae":
        return None
    baseline = [r for r in rows if r["method"] == "vqvae" and r["bits_per_image"] == first["bits_per_image"]
                and r["K"] == first["K"]]
    return paired_difference(line, baseline)


def best_end_to_end(rows: list[dict[str, Any]], bits: float) -> tuple[str, list[dict[str, Any]]] | None:
    """The baseline to beat at a rate: the end-to-end line (method and K, its own decoder) with the highest mean test
    PSNR among `rows` at `bits` per image, as (its label, e.g. "fsq K=256", its rows); None where the rate has none."""
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("vae") is None and not r["finetuned"] and r["bits_per_image"] == bits:
            lines[(r["method"], r["K"])].append(r)
    if not lines:
        return None
    (method, k), best = max(lines.items(), key=lambda kv: (mean_ci([r["psnr"] for r in kv[1]])[0], kv[0]))
    return f"{method} K={k}", best


def summary_by_bits(rows: list[dict[str, Any]]) -> dict[float, list[SummaryLine]]:
    """Lines grouped by bits per image: only lines at equal bits are comparable. Each line's PSNR is also given
    against the best end-to-end line of its rate (`best_end_to_end`, named in the cell; "—" for that line itself)
    and against the VQ-VAE of its rate and K (`vqvae_difference`), both paired by seed."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["bits_per_image"], r["K"], r["method"], r.get("vae"), r["finetuned"])].append(r)
    out: dict[float, list[SummaryLine]] = defaultdict(list)
    baselines = {bits: best_end_to_end(rows, bits) for bits in {r["bits_per_image"] for r in rows}}
    for (bits, k, method, vae, tuned), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3] or "", kv[0][4])):
        cells = []
        for metric, digits in zip(SUMMARY_METRICS, (2, 4, 4, 5, 1, 1, 1)):
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            cells.append(_fmt(*mean_ci(vals), digits) if vals else "n/a")
        baseline = baselines[bits]
        if baseline is None:
            best_cell = "n/a"
        elif baseline[1][0] in rs:
            best_cell = f"— ({baseline[0]})"
        else:
            delta = paired_difference(rs, baseline[1])
            best_cell = f"{_fmt(*delta, 2)} vs {baseline[0]}" if delta else "n/a"
        delta = vqvae_difference(rs, rows)
        cells[1:1] = [best_cell, "—" if method == "vqvae" else _fmt(*delta, 2) if delta else "n/a"]
        out[bits].append(SummaryLine(method, vae, decoder_label(tuned, vae), k, bits, rs[0]["bpp"], len(rs), cells,
                                     mean_ci([r["psnr"] for r in rs])[0]))
    return out


SUMMARY_HEADER = ["method", "vae", "decoder", "K", "bits/image", "bpp", "n", "PSNR (dB)",
                  "ΔPSNR vs best end-to-end (paired by seed)", "ΔPSNR vs VQ-VAE (same K)", "SSIM", "LPIPS", "MSE",
                  "usage perplexity", "dead codes", "coded bits/image (files)"]


def ceiling_lines(ceilings: list[dict[str, Any]]) -> list[str]:
    """One sentence per continuous VAE variant: its own test PSNR, the ceiling of every code made from it."""
    by_vae: dict[tuple, list[dict]] = defaultdict(list)
    for c in ceilings:
        by_vae[(c["vae"], c.get("tdc_target_bits"))].append(c)
    lines = []
    for (vae, target), cs in sorted(by_vae.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        m, h = mean_ci([c["psnr"] for c in cs])
        label = "plain" if target is None else f"tdc, T = {target:g} bits"
        band = (f", {100 * sum(c['frac_tokens_in_band'] for c in cs) / len(cs):.1f}% of test tokens within "
                f"±{cs[0]['tdc_tolerance']:g} bit of T" if target is not None else "")
        lines.append(f"Continuous Gaussian VAE ({label}), no quantization (the ceiling): PSNR {_fmt(m, h, 2)} dB, "
                     f"mean token KL {sum(c['mean_token_kl_bits'] for c in cs) / len(cs):.2f} bits{band} "
                     f"(n = {len(cs)}).")
    return lines


def title(finished: int, planned: int) -> str:
    return "geovq results" if finished >= planned else f"geovq results (PARTIAL: {finished} of {planned} units finished)"


INTRO = ("Paired metrics on the held-out test split; mean ± 95% CI over seeds (n = seeds). "
         "Rows are comparable only within one bits-per-image group; the best PSNR of each group is marked. "
         "ΔPSNR is a line's PSNR minus a baseline's, seed by seed: first the best end-to-end line of the rate "
         "(VQ-VAE, FSQ, LFQ or residual VQ, named in the cell), then the VQ-VAE at the same rate and K. Its CI, "
         "not the two lines' own, says whether they differ.")


def markdown_report(rows: list[dict[str, Any]], ceilings: list[dict[str, Any]], config_yaml: str,
                    finished: int, planned: int) -> str:
    lines = [f"# {title(finished, planned)}", "", INTRO, ""]
    lines += [f"- {line}" for line in ceiling_lines(ceilings)]
    for bits, group in summary_by_bits(rows).items():
        best = max(range(len(group)), key=lambda i: group[i].psnr)
        lines += ["", f"## {bits:g} bits per image", "", "| " + " | ".join(SUMMARY_HEADER) + " |",
                  "|" + "---|" * len(SUMMARY_HEADER)]
        for i, line in enumerate(group):
            cells = list(line.cells)
            if i == best:
                cells[0] = f"**{cells[0]}**"
            lines.append(f"| {line.method} | {line.vae or '—'} | {line.decoder} | {line.k} | {bits:g} | "
                         f"{line.bpp:.3f} | {line.n} | " + " | ".join(cells) + " |")
    lines += settings_table(rows)
    reasons = sorted({r["lpips_reason"] for r in rows if r.get("lpips") is None and r.get("lpips_reason")})
    if reasons:
        lines += ["", "LPIPS n/a: " + "; ".join(reasons)]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


SETTINGS_HEADER = ["method", "vae", "K", "d", "VAE training", "hyperparameters"]


def row_settings(rows: list[dict[str, Any]]) -> list[tuple]:
    """Which settings each row used (a tuned sweep gives every method its own), one tuple per distinct setting
    (SETTINGS_HEADER): the VAE's training overrides and the method's hyperparameters; none when every row runs
    the defaults."""
    def fmt(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in sorted(values.items())) or "—"

    seen = sorted({(r["method"], r.get("vae") or "—", r["K"], r.get("token_dim", "—"),
                    fmt(r.get("vae_overrides") or {}), fmt(r.get("params") or {})) for r in rows})
    return [] if all(vae == params == "—" for *_, vae, params in seen) else seen


def settings_table(rows: list[dict[str, Any]]) -> list[str]:
    """report.md's table of `row_settings`."""
    seen = row_settings(rows)
    if not seen:
        return []
    lines = ["", "## Settings of each row", "", "| " + " | ".join(SETTINGS_HEADER) + " |", "|" + "---|" * 6]
    return lines + ["| " + " | ".join(map(str, s)) + " |" for s in seen]
