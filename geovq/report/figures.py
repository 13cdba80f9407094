"""Figures of a report: rate–distortion curves, the methods at each rate, codebook usage, geodesic diagnostics
and each VAE's per-token KL (reconstruction and sample grids: geovq.report.recon; all of them in reading order:
geovq.report.build.write_figures). No comparison across rates appears without its rate."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from geovq.io import atomic_path
from geovq.latents import LatentSet
from geovq.report.tables import best_end_to_end, mean_ci, paired_difference

if TYPE_CHECKING:
    from geovq.report.runs import Runs


@dataclass
class Figure:
    """A written PNG, its caption, and the data it was drawn from (saved beside it as JSON, for checks)."""

    path: Path
    caption: str
    data: dict[str, Any] = field(default_factory=dict)


def _series(rows: list[dict[str, Any]]) -> dict[str, dict[float, list[dict]]]:
    """Rows by line label (method, VAE unless plain, fine-tuned) and bits per image."""
    series: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(rows, key=line_key):  # labels in line order
        series[line_label(r)][r["bits_per_image"]].append(r)
    return series


def first_seed_rows(rows: list[dict[str, Any]], bits: float,
                    keep: Callable[[dict[str, Any]], Any] = lambda r: True) -> dict[str, dict[str, Any]]:
    """{line label: its lowest-seed row} among the rows at `bits` that `keep` accepts: what a figure drawing
    one example per line shows."""
    firsts: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (line_key(r), r["seed"])):  # labels in line order
        if r["bits_per_image"] == bits and keep(r):
            firsts.setdefault(line_label(r), r)
    return firsts


def line_key(row: dict[str, Any]) -> tuple[str, str, bool]:
    """The order of lines in legends, grids and sidecars: by method, then VAE (plain before tdc), the VAE's own
    decoder before the fine-tuned one, so that a method's variants sit together."""
    return row["method"], row.get("vae") or "", bool(row["finetuned"])


def line_label(row: dict[str, Any]) -> str:
    return row["method"] + (f" ({row['vae']})" if row.get("vae") not in (None, "plain") else "") + (
        " fine-tuned" if row["finetuned"] else "")


def line_styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{line label: matplotlib keyword arguments} for every line of a report's rows, so that a line looks the same in
    every figure, also in those that show only some lines (usage, geometry).

    A method keeps one hue of tab20's ten dark/light pairs: dark on the plain VAE, light on the TDC VAE. A
    fine-tuned decoder draws dashed with open markers in its line's colour. Colouring lines by their position
    instead gave a method's two VAEs shades of two different pairs as soon as a line without VAE (the VQ-VAE)
    sat between them.
    """
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20").colors  # 20 colours: pairs (2h, 2h + 1) of one hue
    ordered = sorted(rows, key=line_key)
    methods = list(dict.fromkeys(r["method"] for r in ordered))
    styles = {}
    for r in ordered:
        hue = methods.index(r["method"]) % (len(palette) // 2)
        style = {"color": palette[2 * hue + (r.get("vae") == "tdc")]}
        if r["finetuned"]:
            style.update(ls="--", mfc="none")
        styles.setdefault(line_label(r), style)
    return styles


def line_colours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{line label: colour} of `line_styles`, for figures that draw no error bars (curves, scatters, histograms)."""
    return {label: style["color"] for label, style in line_styles(rows).items()}


def _psnr_against(series: dict[str, dict[float, list[dict]]], rate: str,
                  scale: Callable[[float, list[dict]], float] = lambda bits, rows: 1.0
                  ) -> dict[str, list[tuple[float, float, float]]]:
    """{line label: [(mean `rate` × scale(bits, rows), PSNR mean, its CI half-width), ...]} over the line's
    fixed-length rates (mean over seeds on both axes); a rate has a point only where every seed's row has `rate`."""
    return {label: [(_stat(by_bits[b], rate)[0] * scale(b, by_bits[b]), *_stat(by_bits[b], "psnr"))
                    for b in sorted(by_bits) if all(r.get(rate) is not None for r in by_bits[b])]
            for label, by_bits in series.items()}


def rate_distortion_figure(out: Path, rows: list[dict[str, Any]], ceilings: list[dict[str, Any]],
                           references: dict[str, Any] | None = None) -> Figure:
    """PSNR, SSIM, LPIPS (where measured) and usage/K against bits per image, mean ± 95% CI over seeds; with priors,
    PSNR against the prior's bits, and against bits per pixel of real files (the geovq codec's, beside JPEG and WebP
    on the same test images: `references`, stages.reference)."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = _series(rows)
    styles = line_styles(rows)
    metrics = ["psnr", "ssim"] + (["lpips"] if any(r.get("lpips") is not None for r in rows) else []) + \
        ["usage_perplexity"]
    names = {"psnr": "test PSNR (dB)", "ssim": "test SSIM", "lpips": "test LPIPS (AlexNet)",
             "usage_perplexity": "usage perplexity / K"}
    # with priors, PSNR again against the prior's code length: the rate an entropy coder driven by the prior
    # would reach (mean over seeds on both axes). A point needs a prior on every seed of its line and rate; the
    # panel is drawn only when some line has one (a run whose priors cover only some seeds has no such point).
    prior_points = _psnr_against(series, "prior_bits_per_image")
    with_prior = any(prior_points.values())
    # real files: 8 × the mean file size (header included) per native pixel (a row's bpp / its fixed-length bits)
    coded_points = _psnr_against(series, "coded_bits_per_image", lambda b, rs: rs[0]["bpp"] / b)
    with_coded = any(coded_points.values())
    panels = metrics + (["psnr_vs_prior_bits"] if with_prior else []) + (["psnr_vs_coded_bpp"] if with_coded else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for label, by_bits in series.items():
        bits = sorted(by_bits)
        for ax, metric in zip(axes, metrics):
            stats = [_stat(by_bits[b], metric) for b in bits]
            ax.errorbar(bits, [m for m, _ in stats], yerr=[h for _, h in stats], marker="o", capsize=3,
                        label=label, **styles[label])
        if prior_points[label]:
            x, y, h = zip(*prior_points[label])
            axes[panels.index("psnr_vs_prior_bits")].errorbar(x, y, yerr=h, marker="s", capsize=3, **styles[label])
        if coded_points[label]:
            x, y, h = zip(*coded_points[label])
            axes[panels.index("psnr_vs_coded_bpp")].errorbar(x, y, yerr=h, marker="D", capsize=3, **styles[label])
    if with_coded and references:
        ax = axes[panels.index("psnr_vs_coded_bpp")]
        for codec, colour in (("jpeg", "black"), ("webp", "dimgray")):
            points = references["codecs"].get(codec, {}).get("points", [])
            if points:
                ax.plot([p["bpp"] for p in points], [p["psnr"] for p in points], ls=":", marker=".", c=colour,
                        label=f"{codec.upper()} (Pillow, quality {points[0]['quality']}–{points[-1]['quality']})")
        ax.legend(fontsize=7, loc="lower right")
    for name, (psnr, style) in _ceiling_lines(ceilings).items():
        axes[0].axhline(psnr, ls=style, c="gray", label=name)
    rates = sorted({b for by_bits in series.values() for b in by_bits})
    # the same rates per pixel of the native image (bpp), on a second axis: what codec papers plot against
    pixels = next((r["bits_per_image"] / r["bpp"] for r in rows if r.get("bpp")), None)
    for ax, metric in zip(axes, metrics):
        ax.set(xlabel="bits per image (fixed-length: tokens × log2 K)", ylabel=names[metric])
        ax.set_xscale("log", base=2)
        # ticks at the measured rates: a log axis would label powers of 2 only (96 bits got no tick)
        ax.set_xticks(rates, [f"{b:g}" for b in rates])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        if pixels:
            top = ax.secondary_xaxis("top", functions=(lambda b: b / pixels, lambda bpp: bpp * pixels))
            top.set_xticks([b / pixels for b in rates], [f"{b / pixels:.3g}" for b in rates])
            top.minorticks_off()
            top.set_xlabel("bits per pixel (native image)", fontsize=8)
    axes[len(metrics) - 1].set_ylim(0, 1.05)
    if with_prior:
        ax = axes[panels.index("psnr_vs_prior_bits")]
        ax.set(xlabel="bits per image under the prior (test codes)", ylabel=names["psnr"],
               title="with the prior as entropy model")
        ax.grid(alpha=0.3)
    if with_coded:
        ax = axes[panels.index("psnr_vs_coded_bpp")]
        ax.set(xlabel="bits per pixel of real files (header included)", ylabel=names["psnr"],
               title="coded: geovq files, JPEG, WebP")
        ax.set_xscale("log")
        # plain numbers at the decades only: the log axis's minor labels (2×10⁰, 3×10⁰, …) ran into each other
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    # one legend beside the panels: inside the first it hid the curves once a run has 20 lines
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=7)
    path = out / "figures" / "rate_distortion.png"
    _save(fig, path, legend_outside=True)
    return Figure(path, "rate–distortion: test metrics against bits per image (mean ± 95% CI over seeds)"
                  + ("; PSNR against the prior's bits per image" if with_prior else "")
                  + ("; PSNR against bits per pixel of real files (geovq's codec, header included; JPEG and WebP "
                     "on the same test images, whose headers dominate on small images)" if with_coded else ""),
                  {"panels": panels, "lines": list(series),
                   "coded": {label: points for label, points in coded_points.items() if points},
                   "references": references})


def compare_figure(out: Path, rows: list[dict[str, Any]], ceilings: list[dict[str, Any]], bits: float) -> Figure:
    """The methods at one rate, best PSNR on top, with the continuous VAEs' ceilings, each line's PSNR minus the best
    end-to-end line's seed by seed (`best_end_to_end`, as report.md's first ΔPSNR column) and usage/K."""
    import matplotlib.pyplot as plt

    series = _series(rows)
    styles = line_styles(rows)
    # only the continuous VAEs these rows were quantized from: a TDC VAE trained for another rate is no ceiling here
    used = {r.get("vae_key") for r in rows if r["bits_per_image"] == bits}
    ceiling_lines = _ceiling_lines([c for c in ceilings if c.get("vae_key") in used])
    labels = sorted((label for label in series if bits in series[label]),
                    key=lambda label: _stat(series[label][bits], "psnr")[0])
    # {label: (mean, half-width or None)} of PSNR minus the best end-to-end line's, paired by seed
    baseline = best_end_to_end(rows, bits)
    deltas = {} if baseline is None else {
        label: delta for label in labels if baseline[1][0] not in series[label][bits]
        and (delta := paired_difference(series[label][bits], baseline[1]))}
    panels = ["psnr"] + (["delta"] if deltas else []) + ["usage_perplexity"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 + 3.35 * len(panels), 0.9 + 0.32 * len(labels)),
                             sharey=True)
    for y, label in enumerate(labels):
        for ax, panel in zip(axes, panels):
            if panel == "delta":
                if label not in deltas:
                    continue
                mean, half = deltas[label][0], deltas[label][1] or 0.0
            else:
                mean, half = _stat(series[label][bits], panel)
            ax.errorbar([mean], [y], xerr=[half], marker="o", capsize=3, **styles[label])
    for name, (psnr, style) in ceiling_lines.items():
        axes[0].axvline(psnr, ls=style, c="gray", label=name)
    if ceiling_lines:
        axes[0].legend(fontsize=7, loc="lower right")
    n_seeds = max(len(series[label][bits]) for label in labels)
    axes[0].set(yticks=range(len(labels)), yticklabels=labels, xlabel="test PSNR (dB)",
                title=f"{bits:g} bits per image (" + (f"mean ± 95% CI, up to {n_seeds} seeds)" if n_seeds > 1
                                                       else "1 seed)"))
    if deltas:
        axes[1].axvline(0, c="gray", lw=1)
        axes[1].set_xlabel(f"Δ test PSNR vs {baseline[0]} (dB)")
        axes[1].set_title("vs the best end-to-end line, paired by seed", fontsize=9)
    axes[-1].set(xlabel="usage perplexity / K", xlim=(0, 1.05), title="codebook usage (test)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    path = out / "figures" / f"compare_{bits:g}bits.png"
    _save(fig, path)
    return Figure(path, f"the methods at {bits:g} bits per image, ranked by test PSNR",
                  {"lines": labels, "ceilings": sorted(ceiling_lines), "panels": len(panels),
                   "baseline": None if baseline is None else baseline[0],
                   "delta": {label: list(d) for label, d in deltas.items()}})


def usage_figure(out: Path, runs: Runs, bits: float) -> Figure:
    """Sorted code frequencies of the test codes, one curve per line (its lowest seed), annotated with usage
    perplexity and dead codes: how evenly each method spends its K codes."""
    import matplotlib.pyplot as plt

    from geovq.metrics.codebook import code_histogram, dead_codes, usage_perplexity

    firsts = first_seed_rows(runs.rows, bits, lambda r: not r["finetuned"])  # fine-tuning keeps the codes
    colour = line_colours(runs.rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    curves = {}
    for label, r in firsts.items():
        codes = np.load(runs.run_of(r).root / r["codes_path"])
        freq = np.sort(code_histogram(codes, r["K"]))[::-1] / codes.size
        curves[label] = freq.tolist()
        ax.plot(np.arange(1, r["K"] + 1), freq, color=colour[label],
                label=f"{label}: perplexity {usage_perplexity(codes, r['K']):.1f} of {r['K']}, "
                      f"{dead_codes(codes, r['K'])} dead")
    ax.set(xlabel="code rank", ylabel="share of test tokens", yscale="log",
           title=f"codebook usage at {bits:g} bits per image (seed {min(r['seed'] for r in firsts.values())})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "figures" / f"usage_{bits:g}bits.png"
    _save(fig, path)
    return Figure(path, f"sorted code frequencies at {bits:g} bits per image", {"lines": list(curves),
                                                                                "curves": curves})


def geometry_figure(out: Path, runs: Runs, bits: float) -> Figure | None:
    """Geodesic diagnostics of each geodesic line at one rate (lowest seed): graph geodesic against Euclidean
    distance for sampled landmark pairs, and the edges' decoder-metric lengths against their chords. None
    without a geodesic row that recorded them."""
    import matplotlib.pyplot as plt

    firsts = first_seed_rows(runs.rows, bits,
                             lambda r: not r["finetuned"] and (r.get("fit_info") or {}).get("diagnostics"))
    if not firsts:
        return None
    colour = line_colours(runs.rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    points = {}
    for label, r in firsts.items():
        sample = r["fit_info"]["diagnostics"]
        pairs, edges = sample["pairs"], sample["edges"]
        axes[0].scatter(pairs["euclidean"], pairs["graph"], s=5, alpha=0.5, color=colour[label], label=label)
        axes[1].hist(np.log10(np.divide(edges["length"], edges["euclidean"])), bins=40, histtype="step",
                     color=colour[label], label=label)
        points[label] = {"pairs": len(pairs["graph"]), "edges": len(edges["length"])}
    axes[0].set(xlabel="Euclidean distance in latent space", ylabel="graph geodesic distance",
                title=f"landmark pairs ({bits:g} bits per image)")
    axes[1].set(xlabel="log10 (edge length under the decoder / Euclidean chord)", ylabel="edges",
                title="edge-length distribution")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = out / "figures" / f"geometry_{bits:g}bits.png"
    _save(fig, path)
    return Figure(path, f"geodesic diagnostics at {bits:g} bits per image: graph against Euclidean distances and "
                        "the edge lengths' stretch (decoder-metric length over chord)",
                  {"panels": 2, "lines": list(firsts), "points": points})


def _stat(rows: list[dict[str, Any]], metric: str) -> tuple[float, float]:
    """(mean, 95% CI half-width or 0) over seeds; usage perplexity as a fraction of K, so rates share an axis."""
    values = [r[metric] for r in rows if r.get(metric) is not None]
    if not values:
        return float("nan"), 0.0
    mean, half = mean_ci(values)
    scale = rows[0]["K"] if metric == "usage_perplexity" else 1
    return mean / scale, (half or 0.0) / scale


def _ceiling_lines(ceilings: list[dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """The continuous VAEs' mean test PSNR, one line per variant (and TDC target)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for c in ceilings:
        target = c.get("tdc_target_bits")
        groups[f"continuous VAE ({c['vae']}" + (f", T={target:g})" if target is not None else ")")].append(c["psnr"])
    return {name: (sum(v) / len(v), "--" if "plain" in name else ":") for name, v in sorted(groups.items())}


def _save(fig, path: Path, legend_outside: bool = False) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        # "tight" widens the picture to a legend beside the axes (it measures every artist again: ~0.2 s)
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight" if legend_outside else None)
    plt.close(fig)


def token_kl_figure(vae_dir: Path, test: LatentSet, target_bits: float | None, tolerance: float,
                    title: str) -> Path:
    """vae_dir/kl_histogram.png from the VAE's test latents: the per-token KL histogram (TDC band shaded)
    beside a map of the mean KL at each grid cell, where each cell also shows the share of its tokens in the band.

    The map shows what one number hides: on MNIST, empty border cells have nothing to encode and stay below
    the band while the centre of the digit sits above it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = test.token_kl_bits_grid()
    fig, (hist, cells) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    hist.hist(kl.ravel(), bins=80, color="C0")
    if target_bits is not None:
        hist.axvspan(target_bits - tolerance, target_bits + tolerance, color="C1", alpha=0.25, label="T ± τ")
        hist.axvline(target_bits, color="C1")
        hist.legend()
    hist.set(xlabel="per-token KL (bits)", ylabel="test tokens", title=title)
    cell_means = kl.mean(axis=(0, 3))
    image = cells.imshow(cell_means, cmap="viridis")
    fig.colorbar(image, ax=cells, label="mean KL (bits)")
    if target_bits is not None:
        in_band = (np.abs(kl - target_bits) <= tolerance).mean(axis=(0, 3))
        for (row, col), share in np.ndenumerate(in_band):
            dark = image.norm(cell_means[row, col]) < 0.6  # white text on the dark end of viridis
            cells.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=7,
                       color="w" if dark else "k")
    cells.set(title="by grid cell" + (" (% of tokens in band)" if target_bits is not None else ""),
              xticks=[], yticks=[])
    fig.tight_layout()
    with atomic_path(vae_dir / "kl_histogram.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return vae_dir / "kl_histogram.png"
