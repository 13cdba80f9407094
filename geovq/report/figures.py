"""Figures: the rate–distortion picture (PSNR against bits per image, one line per method) and each VAE's
per-token KL (histogram and map by grid cell)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from geovq.io import atomic_path
from geovq.latents import LatentSet
from geovq.report.tables import mean_ci


def write_figures(run_dir: Path, rows: list[dict[str, Any]], ceilings: list[dict[str, Any]]) -> None:
    """figures/rate_distortion.png (one line per method across rates), figures/compare_{bits}bits.png (the
    methods at one rate, best PSNR on top), and each VAE's KL figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = r["method"] + (f" ({r['vae']})" if r.get("vae") not in (None, "plain") else "") + (
            " fine-tuned" if r["finetuned"] else "")
        series[label][r["bits_per_image"]].append(r)
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: methods × VAEs × fine-tuning stay apart
    colour = {label: palette[i % len(palette)] for i, label in enumerate(sorted(series))}
    ceiling_lines = _ceiling_lines(ceilings)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, by_bits in sorted(series.items()):
        bits = sorted(by_bits)
        for ax, metric in zip(axes, ("psnr", "usage_perplexity")):
            stats = [_stat(by_bits[b], metric) for b in bits]
            ax.errorbar(bits, [m for m, _ in stats], yerr=[h for _, h in stats], marker="o", capsize=3,
                        label=label, color=colour[label])
    for name, (psnr, style) in ceiling_lines.items():
        axes[0].axhline(psnr, ls=style, c="gray", label=name)
    axes[0].set(xlabel="bits per image", ylabel="test PSNR (dB)", title="rate–distortion")
    axes[1].set(xlabel="bits per image", ylabel="usage perplexity / K", title="codebook usage (test)", ylim=(0, 1.05))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, run_dir / "figures" / "rate_distortion.png")

    for bits in sorted({b for by_bits in series.values() for b in by_bits}):
        labels = sorted((label for label in series if bits in series[label]),
                        key=lambda label: _stat(series[label][bits], "psnr")[0])
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.32 * len(labels)), sharey=True)
        for y, label in enumerate(labels):
            for ax, metric in zip(axes, ("psnr", "usage_perplexity")):
                mean, half = _stat(series[label][bits], metric)
                ax.errorbar([mean], [y], xerr=[half], marker="o", capsize=3, color=colour[label])
        for name, (psnr, style) in ceiling_lines.items():
            axes[0].axvline(psnr, ls=style, c="gray", label=name)
        if ceiling_lines:
            axes[0].legend(fontsize=7, loc="lower right")
        n_seeds = max(len(series[label][bits]) for label in labels)
        axes[0].set(yticks=range(len(labels)), yticklabels=labels, xlabel="test PSNR (dB)",
                    title=f"{bits:g} bits per image (mean ± 95% CI, up to {n_seeds} seeds)")
        axes[1].set(xlabel="usage perplexity / K", xlim=(0, 1.05), title="codebook usage (test)")
        for ax in axes:
            ax.grid(alpha=0.3, axis="x")
        _save(fig, run_dir / "figures" / f"compare_{bits:g}bits.png")

    for done in sorted((run_dir / "vae").glob("*/ceiling.json")):
        ceiling = json.loads(done.read_text())
        token_kl_figure(done.parent, LatentSet.load(done.parent / "latents_test.npz"), ceiling["tdc_target_bits"],
                        ceiling["tdc_tolerance"], title=done.parent.name)


def _stat(rows: list[dict[str, Any]], metric: str) -> tuple[float, float]:
    """(mean, 95% CI half-width or 0) over seeds; usage perplexity as a fraction of K, so rates share an axis."""
    mean, half = mean_ci([r[metric] for r in rows])
    scale = rows[0]["K"] if metric == "usage_perplexity" else 1
    return mean / scale, (half or 0.0) / scale


def _ceiling_lines(ceilings: list[dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """The continuous VAEs' mean test PSNR, one line per variant (and TDC target)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for c in ceilings:
        target = c.get("tdc_target_bits")
        groups[f"continuous VAE ({c['vae']}" + (f", T={target:g})" if target is not None else ")")].append(c["psnr"])
    return {name: (sum(v) / len(v), "--" if "plain" in name else ":") for name, v in sorted(groups.items())}

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def token_kl_figure(vae_dir: Path, test: LatentSet, target_bits: float | None, tolerance: float,
                    title: str) -> None:
    """vae_dir/kl_histogram.png from the VAE's test latents: the per-token KL histogram (TDC band shaded)
    beside a map of the mean KL at each grid cell, where each cell also shows the share of its tokens in the band.

    The map shows what one number hides: on MNIST, empty border cells have nothing to encode and stay below
    the band while the centre of the digit sits above it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
