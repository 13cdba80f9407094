"""End-to-end geodesic fit at growing landmark counts, split by stage, on a real model.

    python bench/geodesic_fit.py --checkpoint runs/mnist/vae/plain-seed0-*/model.pt \
        --latents runs/mnist/vae/plain-seed0-*/latents_train.npz       # 10k, 30k, 60k landmarks, K=256, k=20

Each size is one `GeodesicQuantizer.fit` (quadrature="endpoint", metric neighbours, the quantizer's
defaults otherwise) on landmark tokens stratified across the training images, timed by the fit itself:
- metrics: every landmark's metric tensor G_n = J_nᵀJ_n in its own image (d tangent passes + 1 primal
  pass of the full decoder per landmark), used to choose neighbours under the metric and by the endpoint rule;
- graph: the k-NN graph (faiss exact search, NN-descent under the metric, symmetrisation, components);
- lengths: the endpoint edge lengths from those tensors;
- paths: every Dijkstra inside k-medoids (k-means++ trees, Voronoi assignments, per-cell medoid searches);
- medoids: the rest of k-medoids;
- other: landmark selection, the decoder check, coverage.
Stage times are wall seconds; "CPU s" is the CPU time of the whole fit over all threads (with other jobs on
the machine, wall time exceeds CPU time / threads). The growth exponent of a stage is the least-squares slope of log(seconds) on log(landmarks). Peak memory is
the process's peak resident set size during that fit (VmHWM, reset before each fit through
/proc/self/clear_refs where the kernel allows it; otherwise the peak since start).
Target (issue 3): the 60k fit in under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from geovq.latents import LatentSet
from geovq.stages.common import GridDecoder
from geovq.quantize import make_quantizer
from geovq.training.checkpoint import load_model

from _memory import peak_rss_mib, reset_peak_rss

STAGES = ("metrics", "graph", "lengths", "paths", "medoids")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Gaussian VAE checkpoint (model.pt)")
    ap.add_argument("--latents", required=True, help="its training latents (latents_train.npz)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000], help="landmark tokens")
    ap.add_argument("--codes", type=int, default=256, help="K")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    decoder = GridDecoder(load_model(args.checkpoint, "vae"))
    latents = LatentSet.load(args.latents)
    print(f"model {args.checkpoint}: {latents.n_images} training images × {latents.tokens_per_image} tokens of "
          f"d={latents.token_dim}; K={args.codes}, k={args.k}, endpoint rule, metric neighbours")
    print(f"threads {torch.get_num_threads()} (torch and faiss), {os.cpu_count()} cores on the machine; "
          f"peak-RSS reset per fit: {reset_peak_rss()}; load = 1-minute load average at the start of each fit")
    header = f"{'landmarks':>10}" + "".join(f"{s:>9}" for s in STAGES) + f"{'other':>8}{'total s':>9}" \
        f"{'CPU s':>8}{'edges':>9}{'iters':>6}{'peak RSS MiB':>14}{'load':>6}"
    rows = []
    for size in args.sizes:
        reset_peak_rss()
        load = os.getloadavg()[0]
        t0, cpu = time.perf_counter(), time.process_time()
        q = make_quantizer("geodesic", args.codes, seed=args.seed, decoder=decoder, k=args.k, max_landmarks=size,
                           quadrature="endpoint").fit(latents)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu
        seconds = q.fit_info_["seconds"]
        stages = [seconds[s] for s in STAGES]
        iterations = sum(1 for t in q.fit_info_["trace"] if t["stage"] == "alternate")
        rows.append((size, stages, total, q.fit_info_["graph"]["undirected_edges"], iterations, peak_rss_mib(), load))
        if len(rows) == 1:
            print(header)
        print(f"{size:>10}" + "".join(f"{s:>9.1f}" for s in stages) + f"{total - sum(stages):>8.1f}{total:>9.1f}"
              f"{cpu:>8.0f}{rows[-1][3]:>9}{iterations:>6}{rows[-1][5]:>14,.0f}{load:>6.2f}", flush=True)
    if len(rows) >= 2:
        sizes = np.log([r[0] for r in rows])
        slopes = [np.polyfit(sizes, np.log([max(r[1][i], 1e-3) for r in rows]), 1)[0] for i in range(len(STAGES))]
        total_slope = np.polyfit(sizes, np.log([r[2] for r in rows]), 1)[0]
        print(f"{'exponent':>10}" + "".join(f"{s:>9.2f}" for s in slopes) + f"{'':>8}{total_slope:>9.2f}")
    largest = rows[-1]
    print(f"target: {largest[0]} landmarks in under 600 s on {args.threads} threads: "
          f"{'met' if largest[2] < 600 else 'MISSED'} ({largest[2]:.0f} s)")


if __name__ == "__main__":
    main()
