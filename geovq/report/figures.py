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


def kl_histogram(path: Path, kl_bits, target_bits: float | None, tolerance: float, title: str) -> None:
    """Histogram of the test tokens' KL (bits), with the TDC band [T−τ, T+τ] shaded when there is a target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(kl_bits, bins=80, color="C0")
    if target_bits is not None:
        ax.axvspan(target_bits - tolerance, target_bits + tolerance, color="C1", alpha=0.25, label="T ± τ")
        ax.axvline(target_bits, color="C1")
        ax.legend()
    ax.set(xlabel="per-token KL (bits)", ylabel="test tokens", title=title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
