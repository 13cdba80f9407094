"""Do graph paths measure the geometry of the images whose tokens they compare? (issue 14, DESIGN.md §3.9)

    python bench/geodesic_context.py --run /tmp/mnist_tdc      # the MNIST TDC VAE (K=256, seed 0), 1 thread

Setup: 10,000 stratified training tokens as landmarks, the geodesic quantizer's graph (k=20, midpoint
edges, metric neighbours) and its k-medoids (K=256). Pairs: --sources landmarks, each with landmarks of other
images at the 20th-80th percentile of graph distance (the percentiles of all distances from the sources),
--pairs in all. For each pair:
- graph: the shortest-path length, its hops, and the share of its intermediate tokens in border cells of the
  grid (row or column 0 or last), beside the landmarks' own share;
- straight: the straight segment's length, in both ends' images (the mean of the two maps, as an edge) and
  in the source's image alone (d_i, the distance that decides a code);
- refined: the discrete geodesic (`geovq.geometry.curves`) under the same two context rules, in the latent
  box of the landmarks (what the `paths="context"` quantizer uses), and, to show why the box, refined in the
  source's image without it, to a tight tolerance (1e-9, --free-steps steps at most), with how far its curves
  leave the data.
Rules: on --rule-tokens landmark tokens, the code the old rule gives (graph insertion: paths mixing
contexts) and the new one (`paths="context"`: refined curves in the token's own image among its shortlist),
for the same medoids: how often they differ.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import faiss
import numpy as np
import torch

from geovq.geometry import build_geodesic_graph, path_nodes, refine_pairs, shortest_path_trees, stratified_tokens
from geovq.latents import LatentSet
from geovq.quantize import make_quantizer
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model


def quantiles(values: np.ndarray) -> str:
    return f"median {np.median(values):.3f} (p10 {np.quantile(values, 0.1):.3f}, p90 {np.quantile(values, 0.9):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with a trained MNIST TDC VAE")
    parser.add_argument("--landmarks", type=int, default=10_000)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--sources", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=250)
    parser.add_argument("--free-steps", type=int, default=300)
    parser.add_argument("--rule-tokens", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    vae_dir = sorted(glob.glob(os.path.join(args.run, "vae", "tdc-*")))[0]
    model = load_model(os.path.join(vae_dir, "model.pt"), "vae", torch.device("cpu"))
    latents = LatentSet.load(os.path.join(vae_dir, "latents_train.npz"))
    t0 = time.perf_counter()
    q = make_quantizer("geodesic", args.codes, seed=args.seed, decoder=GridDecoder(model), k=args.k,
                       quadrature="midpoint", neighbours="metric", max_landmarks=args.landmarks).fit(latents)
    land = q.landmarks_
    print(f"{os.path.basename(vae_dir)}: {land.n_nodes} landmarks, k={args.k}, midpoint, metric neighbours, "
          f"K={args.codes}: graph k-medoids fit in {time.perf_counter() - t0:.0f} s", flush=True)
    graph = build_geodesic_graph(land, args.k, "midpoint", neighbours="metric", metrics=q.landmark_metrics_).graph

    # the landmarks' token ids: the quantizer's first draw from its seed (checked against their points)
    tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, land.n_nodes,
                               np.random.default_rng(args.seed))
    assert np.array_equal(latents.token_mu[tokens].astype(np.float64), land.points)
    layout = latents.layout
    cell = layout.flat_positions(tokens % latents.tokens_per_image)[:, 0] // layout.channels
    row, col = np.divmod(cell, layout.width)
    land_border = (row == 0) | (row == layout.height - 1) | (col == 0) | (col == layout.width - 1)

    rng = np.random.default_rng(args.seed)
    sources = rng.choice(land.n_nodes, args.sources, replace=False)
    dist, pred = shortest_path_trees(graph, sources)
    finite = dist[np.isfinite(dist) & (dist > 0)]
    lo, hi = np.quantile(finite, [0.2, 0.8])
    per_source = int(np.ceil(args.pairs / args.sources))
    tree, src, tgt = [], [], []
    for s, source in enumerate(sources):
        ok = np.flatnonzero((dist[s] >= lo) & (dist[s] <= hi) & (land.image != land.image[source]))
        pick = rng.choice(ok, size=min(per_source, len(ok)), replace=False)
        tree += [s] * len(pick)
        src += [source] * len(pick)
        tgt += list(pick)
    tree, src, tgt = np.array(tree), np.array(src), np.array(tgt)
    graph_d = dist[tree, tgt]
    paths = path_nodes(pred, tree, tgt)
    hops = (paths[:, 1:] != paths[:, :-1]).sum(1)
    inner = [np.unique(p[1:-1][(p[1:-1] != p[0]) & (p[1:-1] != p[-1])]) for p in paths]
    border_share = np.array([land_border[i].mean() if len(i) else np.nan for i in inner])
    print(f"{len(src)} pairs from {args.sources} sources at graph distance {lo:.3f}-{hi:.3f} (20th-80th percentile)")
    print(f"graph paths: hops {quantiles(hops)}; intermediate tokens in border cells: "
          f"{np.nanmean(border_share):.0%} of a path's (median {np.nanmedian(border_share):.0%}), "
          f"against {land_border.mean():.0%} of the landmarks")

    box = q._box()
    rows = {}
    for context in ("both", "source"):
        t1 = time.perf_counter()
        straight = refine_pairs(land, src, tgt, context=context, max_iter=0).lengths
        refined = refine_pairs(land, src, tgt, context=context, bounds=box)
        rows[context] = (straight, refined, time.perf_counter() - t1)
    free = refine_pairs(land, src, tgt, context="source", tol=1e-9, max_iter=args.free_steps)
    reach = np.array([np.linalg.norm(c, axis=1).max() for c in free.points]) / np.maximum(
        np.linalg.norm(land.points[src], axis=1), np.linalg.norm(land.points[tgt], axis=1))
    for context, (straight, refined, seconds) in rows.items():
        name = "both ends' images (mean)" if context == "both" else "the source's image (d_i)"
        print(f"in {name}: graph / refined {quantiles(graph_d / refined.lengths)}; graph shorter for "
              f"{(graph_d < refined.lengths).mean():.0%}; straight / refined {quantiles(straight / refined.lengths)}"
              f"; refined converged {refined.converged.mean():.0%} ({seconds:.0f} s)")
    print(f"in the source's image without the box (tol 1e-9, {args.free_steps} steps at most): free / boxed "
          f"{quantiles(free.lengths / rows['source'][1].lengths)}; the farthest curve point's |z| / the ends' "
          f"{quantiles(reach)}")

    t1 = time.perf_counter()
    sample = rng.choice(land.n_nodes, min(args.rule_tokens, land.n_nodes), replace=False)
    old = q.encode_tokens(latents, tokens[sample], rule="graph")
    new = q.encode_tokens(latents, tokens[sample], rule="context")
    print(f"rules on {len(sample)} landmark tokens, same {args.codes} medoids: the in-context rule gives another "
          f"code than the graph rule to {(old != new).mean():.1%} ({time.perf_counter() - t1:.0f} s); codes used: "
          f"graph {len(np.unique(old))}, in-context {len(np.unique(new))}")



if __name__ == "__main__":
    main()
