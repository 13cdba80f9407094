"""Does pull-back k-means' linearised objective buy PSNR? Against k-means on the same VAE, in the same run.

    nice -n 10 python bench/pullback_psnr.py runs/mnist --vae tdc-T8-d16-seed0-0b8e09a2 \
        --kmeans runs/mnist/units/kmeans-tdc-K256-d16-seed0-*/quantizer.npz   # the sweep's k-means (optional)

A trained VAE of a sweep run directory (its checkpoint, latents and the run's dataset and split). Pullback
is fit on --fit-tokens of its training tokens; --images test images (a fixed random subset) are encoded and
decoded with EVERY token replaced by its code, and scored against the original images (PSNR, SSIM, as the
sweep scores them). Rows:
- the VAE itself (μ decoded): the ceiling;
- the sweep's k-means (all training tokens), when --kmeans is given; k-means on the fit subsample (pullback's
  start);
- that k-means codebook with each token assigned by its own metric (pullback's assignment rule alone);
- pullback; pullback's codebook with Euclidean assignment (its centres sit where the metric puts them);
- pullback with --rerank candidates re-scored by the true in-context decode error.
Each with the linearised error Σ_tokens (c − z)ᵀG(c − z) per image and the test-code usage (codes used of K).
The test tokens' metric tensors are computed once and shared by the rows that assign by metric.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from _trained import load_trained_vae
from geovq.metrics.image import psnr, ssim
from geovq.nearest import exact_nearest
from geovq.quantize import Quantizer, make_quantizer
from geovq.quantize.pullback import assign
from geovq.stages.common import decode_grids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a sweep run directory")
    ap.add_argument("--vae", required=True, help="the VAE's key (a directory under RUN/vae)")
    ap.add_argument("--kmeans", help="a kmeans quantizer.npz fitted on that VAE's latents (the sweep's unit)")
    ap.add_argument("--codes", type=int, default=256, help="K")
    ap.add_argument("--images", type=int, default=200, help="test images encoded and scored")
    ap.add_argument("--fit-tokens", type=int, default=20_000, help="pullback max_tokens")
    ap.add_argument("--rerank", type=int, default=4, help="candidates re-scored (0: skip that row)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    device = torch.device("cpu")

    trained = load_trained_vae(args.run, args.vae, args.images, args.seed, device)
    cfg, vae, decoder, train, test, originals = (trained.cfg, trained.vae, trained.decoder, trained.train,
                                                 trained.test, trained.originals)
    n, d = test.n_images, test.token_dim

    t0 = time.process_time()
    pb = make_quantizer("pullback", args.codes, seed=args.seed, decoder=decoder, max_tokens=args.fit_tokens).fit(train)
    info = pb.fit_info_
    print(f"{cfg.dataset} VAE {args.vae}: K={args.codes}, {test.tokens_per_image} tokens of d={d} per image; "
          f"pullback fit on {info['tokens']} tokens in {time.process_time() - t0:.0f} s CPU, {info['iterations']} "
          f"iterations, regularised {info['regularised']}, re-seeded {info['reseeded']}")
    dec, metrics = pb.token_metrics(test, np.arange(test.n_tokens))
    points = dec.points

    def row(name: str, codebook: np.ndarray | None, codes: np.ndarray | None, baseline: float | None) -> float:
        grids = test.mu if codebook is None else test.layout.tokens_to_grid(codebook[codes].reshape(n, -1, d))
        recons = decode_grids(vae.decoder, grids, device)
        p, s = psnr(originals, recons).mean(), ssim(originals, recons).mean()
        extra = ""
        if codebook is not None:
            delta = codebook[codes].astype(np.float64) - points
            linear = np.einsum("ni,nij,nj->", delta, metrics, delta) / n
            extra = f"  linearised/image {linear:8.3f}  usage {len(np.unique(codes)):4d}"
        vs = "" if baseline is None else f"  ({p - baseline:+.2f} dB)"
        print(f"{name:48s} PSNR {p:6.2f}{vs:12s} SSIM {s:.4f}{extra}")
        return p

    def euclidean(codebook: np.ndarray) -> np.ndarray:
        return exact_nearest(codebook, points)[1][:, 0]

    row("VAE (μ decoded): the ceiling", None, None, None)
    baseline = None
    if args.kmeans:
        kmeans = Quantizer.load(args.kmeans)
        baseline = row("kmeans (the sweep's, all training tokens)", kmeans.codebook_, euclidean(kmeans.codebook_),
                       None)
    start = pb.kmeans_codebook_
    start_psnr = row("kmeans on the fit subsample (pullback's start)", start, euclidean(start), baseline)
    baseline = start_psnr if baseline is None else baseline
    row("  ... with each token's own metric assigning", start, assign(points, metrics, start)[0], baseline)
    codes = assign(points, metrics, pb.codebook_)[0]
    row("pullback", pb.codebook_, codes, baseline)
    row("  ... its codebook, Euclidean assignment", pb.codebook_, euclidean(pb.codebook_), baseline)
    if args.rerank:
        pb.rerank = args.rerank
        reranked, enc = pb.encode_with_info(test)
        row(f"pullback + re-rank {args.rerank}", pb.codebook_, reranked.ravel(), baseline)
        print(f"  re-rank changed {enc['rerank_changed']} of {test.n_tokens} codes; mean single-token in-context "
              f"error {enc['rerank_sq_error_linearised']:.4g} -> {enc['rerank_sq_error']:.4g}")


if __name__ == "__main__":
    main()
