"""Refined geodesic distances: geovq's batched curves against StochMan 0.3.0, same pairs, decoder and cores.

    python bench/geodesic_refine.py --run /tmp/mnist_tdc     # 16-D analytic cases + MNIST TDC pairs, 1 thread

For each case both methods get the same pairs and the same decoder, in this one process:
- geovq: `refine_pairs` on all pairs at once (straight start, T = 4 segments, subdivided where chords do not
  resolve the decoder, tol = 1e-2, resolution 4e-2; its defaults). Reported distance: the curve's length.
- StochMan: its documented call per pair, `manifold.connecting_geodesic(p0, p1)` on an `EmbeddedManifold`
  whose `embed` is the decoder (a `CubicSpline` with its default 5 nodes, `geodesic_minimizing_energy`: Adam,
  lr 0.1, up to 150 steps on 20 curve points). Reported distance: `manifold.curve_length` at 100 points.
Speed is pairs per CPU second of this process (wall clock beside it: on a shared machine wall times swing).

Cases:
- analytic 16-D (`geovq.geometry.manifolds`): warped_flat, sphere, warped_sphere; error = |d − truth| / truth
  against the closed form.
- MNIST TDC VAE (--run: a run directory with a trained `vae/tdc-*` model and its training latents): pairs of
  stratified training tokens of different images, measured in the source token's own image (context
  "source", the distance that decides its code) and in both ends' images (context "both", the mean of the
  two maps, as an edge). The pull-back metric of this decoder lets curves escape far outside the latents the
  encoder produces (|z| ~ 50-100× the data's) into saturated regions where the decoder hardly reacts; there
  the minimisation crawls for thousands of steps. So both methods minimise in the latent box spanned by the
  stratified tokens (geovq: `bounds=`; StochMan: its curve lives in w with z = lo + (hi − lo)·sigmoid(w), the
  same set of curves). No closed form: the reference is the shortest of every method's curve and a long geovq
  run (T = 16, tol 1e-6, 300 steps), each curve's length measured on 256 segments; error = |d − ref| / ref.
Targets (issue 14): geovq >= 100× StochMan's pairs/s, with geovq's median error <= 1%.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time

import numpy as np
import torch

from geovq.geometry import FlatTokenDecoder, GridTokenDecoder, stratified_tokens
from geovq.geometry.curves import refine_pairs, resample_paths
from geovq.geometry.manifolds import make

FINE = 256  # segments on which every method's final curve is measured for the MNIST reference
GEOVQ: dict = {}  # refine_pairs options from the command line (none: its defaults)


def stochman_available() -> bool:
    try:
        import stochman  # noqa: F401
    except ImportError:
        return False
    return True


def stochman_curves(embed, starts: np.ndarray, ends: np.ndarray, to_latent=None):
    """StochMan's connecting geodesic per pair. Returns (reported lengths, curves at FINE+1 latent points,
    CPU seconds, wall seconds). `embed`: (n, d) float64 -> (n, D); `to_latent`: w -> z for box curves."""
    from stochman.manifold import EmbeddedManifold

    class Decoded(EmbeddedManifold):
        def embed(self, points, jacobian=False):
            return embed(points.reshape(-1, points.shape[-1])).reshape(*points.shape[:-1], -1)

    manifold = Decoded()
    lengths, curves = np.empty(len(starts)), []
    t = torch.linspace(0, 1, 100, dtype=torch.float64)
    fine = torch.linspace(0, 1, FINE + 1, dtype=torch.float64)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(len(starts)):
        curve, _ = manifold.connecting_geodesic(torch.as_tensor(starts[i:i + 1]), torch.as_tensor(ends[i:i + 1]))
        with torch.no_grad():
            lengths[i] = float(manifold.curve_length(curve(t)))
            curves.append(curve(fine).reshape(FINE + 1, -1))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    with torch.no_grad():
        curves = torch.stack(curves)
        if to_latent is not None:
            curves = to_latent(curves)
    return lengths, curves.numpy(), cpu, wall


def geovq_curves(dec, sources, targets, **options):
    cpu, wall = time.process_time(), time.perf_counter()
    curves = refine_pairs(dec, sources, targets, **GEOVQ, **options)
    return curves, time.process_time() - cpu, time.perf_counter() - wall


def report(case: str, n: int, geo_err, geo_cpu, geo_wall, st_err, st_cpu, st_wall, extra: str = "") -> None:
    line = (f"{case:28s} {n:5d}  geovq err med {np.median(geo_err):.4%} p90 {np.quantile(geo_err, .9):.4%} "
            f"{n / geo_cpu:7.1f} pairs/cpu-s ({n / geo_wall:6.1f}/s wall)")
    if st_err is not None:
        line += (f" | StochMan err med {np.median(st_err):.4%} p90 {np.quantile(st_err, .9):.4%} "
                 f"{n / st_cpu:7.2f} pairs/cpu-s ({n / st_wall:6.2f}/s wall) | ratio {st_cpu / geo_cpu:6.1f}× cpu, "
                 f"{st_wall / geo_wall:6.1f}× wall")
    print(line + extra, flush=True)


def analytic(args, with_stochman: bool) -> None:
    for name in ("warped_flat", "sphere", "warped_sphere"):
        manifold = make(name, args.dim)
        rng = np.random.default_rng(args.seed)
        a, b = manifold.sample(args.pairs, rng), manifold.sample(args.pairs, rng)
        truth = manifold.distances(a, b)
        dec = FlatTokenDecoder(manifold.decoder, np.concatenate([a, b]))
        ids = np.arange(args.pairs)
        refine_pairs(dec, ids[:2], ids[:2] + args.pairs)  # warm-up
        curves, cpu, wall = geovq_curves(dec, ids, ids + args.pairs)
        geo_err = np.abs(curves.lengths / truth - 1)
        st = [None] * 3
        if with_stochman:
            lengths, _, st_cpu, st_wall = stochman_curves(manifold.decoder, a, b)
            st = [np.abs(lengths / truth - 1), st_cpu, st_wall]
        report(f"{name} d={args.dim}", args.pairs, geo_err, cpu, wall, *st,
               f" | straight err med {np.median(np.abs(curves.initial_lengths / truth - 1)):.2%}")


def fine_lengths(dec, curves: np.ndarray, contexts: list[np.ndarray]) -> np.ndarray:
    """Length of latent polylines (B, FINE+1, d) measured on FINE segments, mean over the contexts."""
    out = np.zeros(len(curves))
    with torch.no_grad():
        for nodes in contexts:
            for s in range(0, len(curves), 16):
                part = curves[s:s + 16]
                f = dec.decode(dec.tensor(part.reshape(-1, part.shape[-1])),
                               dec.tensor(np.repeat(nodes[s:s + 16], part.shape[1]), torch.long))
                f = f.double().reshape(len(part), part.shape[1], -1)
                out[s:s + 16] += (f[:, 1:] - f[:, :-1]).norm(dim=2).sum(1).cpu().numpy()
    return out / len(contexts)


def mnist(args, with_stochman: bool) -> None:
    from geovq.latents import LatentSet
    from geovq.stages.common import GridDecoder
    from geovq.training.checkpoint import load_model

    vae_dir = sorted(glob.glob(os.path.join(args.run, "vae", "tdc-*")))[0]
    model = load_model(os.path.join(vae_dir, "model.pt"), "vae", torch.device("cpu"))
    latents = LatentSet.load(os.path.join(vae_dir, "latents_train.npz"))
    rng = np.random.default_rng(args.seed)
    tokens = stratified_tokens(latents.n_images, latents.tokens_per_image, args.tokens, rng)
    dec = GridTokenDecoder.from_latents(GridDecoder(model), latents, tokens)
    span = dec.points.max(0) - dec.points.min(0)
    lo, hi = dec.points.min(0) - 0.01 * span, dec.points.max(0) + 0.01 * span  # ends strictly inside
    src = rng.choice(dec.n_nodes, args.mnist_pairs, replace=False)
    tgt = rng.choice(dec.n_nodes, args.mnist_pairs, replace=False)
    keep = dec.image[src] != dec.image[tgt]
    src, tgt = src[keep], tgt[keep]
    n = len(src)
    lo_t, width_t = torch.as_tensor(lo), torch.as_tensor(hi - lo)
    print(f"MNIST: {os.path.basename(vae_dir)}, {args.tokens} stratified training tokens, {n} pairs of different "
          f"images, latent box = the tokens' range", flush=True)
    for context in args.contexts.split(","):
        contexts = [src] if context == "source" else [src, tgt]
        refine_pairs(dec, src[:2], tgt[:2], context=context, bounds=(lo, hi))  # warm-up
        curves, cpu, wall = geovq_curves(dec, src, tgt, context=context, bounds=(lo, hi))
        candidates = [fine_lengths(dec, np.stack([resample_paths(p[None], FINE)[0] for p in curves.points]),
                                   contexts)]
        st = [None] * 3
        if with_stochman:
            def in_context(i, contexts=contexts):  # the decoder in pair i's context(s), on box coordinates w
                def embed(w):
                    z = (lo_t + width_t * torch.sigmoid(w)).to(dec.dtype)
                    maps = [dec.decode(z, torch.full((len(z),), int(c[i]), dtype=torch.long)).double()
                            for c in contexts]
                    return torch.cat(maps, 1) / np.sqrt(len(maps))  # its energy: the mean of the maps'
                return embed

            def run_one(i):
                w = torch.logit((torch.as_tensor(dec.points[[src[i], tgt[i]]]) - lo_t) / width_t).numpy()
                return stochman_curves(in_context(i), w[:1], w[1:], lambda w: lo_t + width_t * torch.sigmoid(w))

            runs = [run_one(i) for i in range(n)]
            st_len = np.array([r[0][0] for r in runs])
            # its curve_length of the concatenated map is not the mean of the two maps' lengths: measure it
            st_fine = fine_lengths(dec, np.concatenate([r[1] for r in runs]), contexts)
            if context == "both":
                st_len = st_fine  # (on FINE segments rather than 100 points: to its advantage)
            candidates.append(st_fine)
            st = [st_len, sum(r[2] for r in runs), sum(r[3] for r in runs)]
        long_run = refine_pairs(dec, src, tgt, context=context, bounds=(lo, hi), n_segments=16, tol=1e-6,
                                max_iter=300)
        candidates.append(fine_lengths(dec, np.stack([resample_paths(p[None], FINE)[0] for p in long_run.points]),
                                       contexts))
        ref = np.min(candidates, axis=0)
        if with_stochman:
            st[0] = np.abs(st[0] / ref - 1)
        report(f"MNIST context={context}", n, np.abs(curves.lengths / ref - 1), cpu, wall, *st,
               f" | straight err med {np.median(np.abs(curves.initial_lengths / ref - 1)):.2%}"
               f" | geovq converged {curves.converged.mean():.0%}, segments {np.median([len(p) - 1 for p in curves.points]):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run directory with a trained MNIST TDC VAE (skip MNIST if unset)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=100, help="pairs per analytic case")
    parser.add_argument("--mnist-pairs", type=int, default=60, help="MNIST pairs drawn (same-image pairs dropped)")
    parser.add_argument("--tokens", type=int, default=10_000, help="stratified MNIST training tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="analytic,mnist", help="comma list: analytic, mnist")
    parser.add_argument("--contexts", default="source,both", help="MNIST contexts, comma list: source, both")
    parser.add_argument("--resolution", type=float, default=None, help="geovq's resolution (default: its own)")
    parser.add_argument("--tol", type=float, default=None, help="geovq's tolerance (default: its own)")
    args = parser.parse_args()
    GEOVQ.update({k: v for k, v in (("resolution", args.resolution), ("tol", args.tol)) if v is not None})
    torch.set_num_threads(args.threads)
    logging.getLogger("stochman").setLevel(logging.WARNING)
    with_stochman = stochman_available()
    if not with_stochman:
        print("StochMan is not installed (pip install --no-deps stochman==0.3.0): geovq alone, no ratio")
    print(f"threads={args.threads}; geovq: straight start, T=4 subdivided to resolve, {GEOVQ or 'its defaults'}; StochMan 0.3.0 connecting_geodesic per pair")
    cases = args.cases.split(",")
    if "analytic" in cases:
        analytic(args, with_stochman)
    if "mnist" in cases and args.run:
        mnist(args, with_stochman)


if __name__ == "__main__":
    main()
