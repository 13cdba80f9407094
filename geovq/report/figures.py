"""Figures: the rate–distortion picture (PSNR against bits per image, one line per method) and each VAE's
per-token KL (histogram and map by grid cell)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from geovq.config import TDC_TOLERANCE_BITS
from geovq.io import atomic_path
from geovq.report.tables import mean_ci


def write_figures(run_dir: Path, rows: list[dict[str, Any]], ceilings: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = r["method"] + (f" ({r['vae']})" if r.get("vae") not in (None, "plain") else "") + (
            " fine-tuned" if r["finetuned"] else "")
        series[label][r["bits_per_image"]].append(r)
    for label, by_bits in sorted(series.items()):
        bits = sorted(by_bits)
        for ax, metric in zip(axes, ("psnr", "usage_perplexity")):
            stats = [mean_ci([r[metric] for r in by_bits[b]]) for b in bits]
            if metric == "usage_perplexity":  # as a fraction of K, so every rate shares one axis
                stats = [(m / by_bits[b][0]["K"], (h or 0) / by_bits[b][0]["K"]) for (m, h), b in zip(stats, bits)]
            ax.errorbar(bits, [m for m, _ in stats], yerr=[h or 0 for _, h in stats], marker="o", capsize=3,
                        label=label)
    plain = [c for c in ceilings if c["vae"] == "plain"]
    if plain:
        axes[0].axhline(sum(c["psnr"] for c in plain) / len(plain), ls="--", c="gray", label="continuous VAE (plain)")
    axes[0].set(xlabel="bits per image", ylabel="test PSNR (dB)", title="rate–distortion")
    axes[1].set(xlabel="bits per image", ylabel="usage perplexity / K", title="codebook usage (test)", ylim=(0, 1.05))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(run_dir / "figures" / "rate_distortion.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    for done in sorted((run_dir / "vae").glob("*/seed*/ceiling.json")):  # redrawn: older runs get the map too
        token_kl_figure(done.parent, json.loads(done.read_text())["tdc_target_bits"], TDC_TOLERANCE_BITS)


def token_kl_figure(vae_dir: Path, target_bits: float | None, tolerance: float) -> None:
    """vae_dir/kl_histogram.png from its test latents: the per-token KL histogram (TDC band shaded) beside a
    map of the mean KL at each grid cell, where each cell also shows the share of its tokens in the band.

    The map shows what one number hides: on MNIST, empty border cells have nothing to encode and stay below
    the band while the centre of the digit sits above it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from geovq.latents import LatentSet

    kl = LatentSet.load(vae_dir / "latents_test.npz").token_kl_bits_grid()
    fig, (hist, cells) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    hist.hist(kl.ravel(), bins=80, color="C0")
    if target_bits is not None:
        hist.axvspan(target_bits - tolerance, target_bits + tolerance, color="C1", alpha=0.25, label="T ± τ")
        hist.axvline(target_bits, color="C1")
        hist.legend()
    hist.set(xlabel="per-token KL (bits)", ylabel="test tokens", title=f"{vae_dir.parent.name}/{vae_dir.name}")
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
