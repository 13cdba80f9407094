"""Edge-length throughput of each quadrature against the decoder's own forward throughput, on a real model.

    python bench/edge_lengths.py --checkpoint runs/mnist/vae/plain-seed0-*/model.pt \
        --latents runs/mnist/vae/plain-seed0-*/latents_train.npz          # 5000 nodes, k=20, 1 thread

Nodes are training tokens stratified across images, each in its own image's μ-grid (DESIGN.md §3.3b); the
k-NN graph is built as the geodesic quantizer builds it (neighbours under the pull-back metric). An edge is
an undirected edge after symmetrisation. In the same run, the decoder's full-image forward throughput
(no gradients, the cheapest of a few batch sizes) is timed on the nodes' own μ-grids, and again at that batch
size right before and after each quadrature. Each quadrature is reported as decoder-forward-equivalents per
edge = CPU seconds per edge ÷ CPU seconds per forward image (mean of before and after), in this process's
CPU time: on a machine shared with other jobs, wall times swing by 2× within minutes while CPU times hold;
the wall-clock ratio is printed beside it.
Targets (issue 3): endpoint ≤ 1, midpoint ≤ 5.

- `endpoint` is timed from scratch: it includes every node's metric tensor G_n (d tangent passes around one
  primal pass), which then gives all of that node's endpoint terms. In the quantizer's fit the same tensors
  are already computed for metric neighbour selection, so there its marginal cost is the last line.
- `adaptive` (at least 8 Simpson panels per segment side) is timed on a random subset of edges
  (--adaptive-edges), its cost being per edge.
Peak memory is the process's peak resident set size (VmHWM, reset before each stage through
/proc/self/clear_refs where the kernel allows it; otherwise the peak since start).
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from geovq.geometry import GridTokenDecoder, QUADRATURES, edge_lengths, knn_graph, node_metrics, stratified_tokens
from geovq.geometry.lengths import CHUNK_ELEMENTS
from geovq.latents import LatentSet
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model

from _memory import peak_rss_mib, reset_peak_rss

FORWARD_BATCHES = (64, 256, 1024)


def forward_cost(decoder, grids: torch.Tensor, batches=FORWARD_BATCHES) -> tuple[float, float, int]:
    """(CPU seconds per image, wall images/s, batch) of the full-image forward at the cheapest of `batches`."""
    best = (np.inf, 0.0, 0)
    with torch.no_grad():
        for batch in batches:
            decoder(grids[:batch])  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            for s in range(0, len(grids), batch):
                decoder(grids[s:s + batch])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            best = min(best, (cpu / len(grids), len(grids) / wall, batch))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Gaussian VAE checkpoint (model.pt)")
    ap.add_argument("--latents", required=True, help="its training latents (latents_train.npz)")
    ap.add_argument("--nodes", type=int, default=5000, help="landmark tokens (graph nodes)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (CPU-time ratios are "
                    "cleanest with 1: idle OpenMP threads spin and count as CPU time)")
    ap.add_argument("--adaptive-edges", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    decoder = GridDecoder(load_model(args.checkpoint, "vae"))
    latents = LatentSet.load(args.latents)
    tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, args.nodes, rng)
    dec = GridTokenDecoder.from_latents(decoder, latents, tokens)
    n, d, out_dim = dec.n_nodes, dec.dim, dec.out_dim
    print(f"model {args.checkpoint}: grid {dec.grid_shape}, token d={d}, decoder output values P={out_dim}")
    print(f"threads {torch.get_num_threads()} (torch and faiss); nodes {n} tokens from {len(dec.grids)} images; "
          f"load average {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    metrics = node_metrics(dec)
    knn = knn_graph(dec.points, args.k, metrics=metrics)
    edges = knn.edges
    print(f"graph: k={args.k}, metric neighbours ({knn.metric_rounds} NN-descent rounds), {len(edges)} undirected "
          f"edges = {len(edges) / n:.2f} per node, {knn.n_components} component(s), built in "
          f"{time.perf_counter() - t0:.1f} s")

    images = torch.as_tensor(dec.grids[np.sort(dec.image)], dtype=dec.dtype)[:4096]
    reset_peak_rss()
    _, wall_rate, batch = forward_cost(decoder, images)
    print(f"decoder full-image forward: batch {batch} (cheapest of {FORWARD_BATCHES}), {wall_rate:,.0f} images/s "
          f"wall; peak RSS {peak_rss_mib():,.0f} MiB. It is timed again right before and after each quadrature.")
    print(f"JVP batches: chunk_elements={CHUNK_ELEMENTS} output values per call = "
          f"{CHUNK_ELEMENTS // (d * out_dim)} nodes × {d} tangents (metric tensors), "
          f"{CHUNK_ELEMENTS // out_dim} segment points (midpoint/simpson/adaptive)")
    print("fwd-equiv/edge = CPU seconds per edge ÷ CPU seconds per forward image (CPU time of this process: other "
          "jobs on a shared machine change wall times, not CPU times); wall-clock ratio beside it")
    print(f"{'quadrature':<11}{'edges':>7}{'wall s':>8}{'edges/s':>9}{'fwd img/s':>10}{'fwd-equiv/edge':>15}"
          f"{'(wall)':>8}{'target':>15}{'peak RSS MiB':>13}")
    targets = {"endpoint": 1.0, "midpoint": 5.0}
    subset = np.sort(rng.choice(len(edges), size=min(args.adaptive_edges, len(edges)), replace=False))
    for quadrature in QUADRATURES:
        timed = edges[subset] if quadrature == "adaptive" else edges
        cpu_before, wall_before, _ = forward_cost(decoder, images, (batch,))
        reset_peak_rss()
        cpu, wall = time.process_time(), time.perf_counter()
        edge_lengths(dec, timed, quadrature)  # no metric tensors given: every quadrature pays its own Jacobians
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peak = peak_rss_mib()
        cpu_after, wall_after, _ = forward_cost(decoder, images, (batch,))
        forward_cpu, forward_rate = 0.5 * (cpu_before + cpu_after), 0.5 * (wall_before + wall_after)
        ratio = cpu / len(timed) / forward_cpu
        rate = len(timed) / wall
        target = targets.get(quadrature)
        verdict = "" if target is None else f"<= {target:g} {'met' if ratio <= target else 'MISSED'}"
        print(f"{quadrature:<11}{len(timed):>7}{wall:>8.1f}{rate:>9,.0f}{forward_rate:>10,.0f}{ratio:>15.2f}"
              f"{forward_rate / rate:>8.2f}{verdict:>15}{peak:>13,.0f}", flush=True)
    # the fit's case: metric tensors already there (computed for metric neighbours), endpoint terms only
    cpu = time.process_time()
    edge_lengths(dec, edges, "endpoint", metrics=metrics)
    cpu = time.process_time() - cpu
    print(f"endpoint with the metric tensors already computed (as in the fit): "
          f"{cpu / len(edges) / forward_cpu:.4f} forward-equivalents per edge")
    per_node = len(edges) / n
    print(f"why endpoint costs what it does: {d} tangent passes + 1 primal per node, shared by its "
          f"{2 * per_node:.1f} edge ends, i.e. {(d + 1) / per_node:.2f} passes per undirected edge")


if __name__ == "__main__":
    main()
