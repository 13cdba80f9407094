"""Figures: the rate–distortion picture (PSNR against bits per image, one line per method)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from geovq.io import atomic_path
from geovq.report.tables import mean_ci


def write_figures(run_dir: Path, rows: list[dict[str, Any]], ceilings: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = r["method"] + (f" ({r['vae']})" if r.get("vae") not in (None, "plain") else "")
        series[label][r["bits_per_image"]].append(r)
    for label, by_bits in sorted(series.items()):
        bits = sorted(by_bits)
        for ax, metric in zip(axes, ("psnr", "usage_perplexity")):
            stats = [mean_ci([r[metric] for r in by_bits[b]]) for b in bits]
            if metric == "usage_perplexity":  # as a fraction of K, so every rate shares one axis
                stats = [(m / by_bits[b][0]["K"], (h or 0) / by_bits[b][0]["K"]) for (m, h), b in zip(stats, bits)]
            ax.errorbar(bits, [m for m, _ in stats], yerr=[h or 0 for _, h in stats], marker="o", capsize=3,
                        label=label)
    if ceilings:
        axes[0].axhline(sum(c["psnr"] for c in ceilings) / len(ceilings), ls="--", c="gray",
                        label="continuous VAE")
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
