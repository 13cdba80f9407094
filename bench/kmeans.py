"""k-means backends: scikit-learn (what geovq's `kmeans` uses) against faiss, same k-means++ seeds.

    python bench/kmeans.py [--n 200000] [--dim 16] [--k 256] [--threads 2]

Prints wall time, Lloyd iterations and final inertia of each, and the faiss/sklearn time ratio. faiss's
Kmeans has no convergence test (fixed `niter`) and subsamples to 256 points per centroid unless told
otherwise; here it gets every point (max_points_per_centroid = N) so the objectives are comparable.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import faiss
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # a Gaussian mixture with more modes than K, like VAE latents: no "true" K to find
    centres = rng.normal(size=(4 * args.k, args.dim)) * 2
    x = (centres[rng.integers(0, len(centres), args.n)] + rng.normal(size=(args.n, args.dim))).astype(np.float32)
    with threadpool_limits(args.threads):
        t = time.perf_counter()
        seeds, _ = kmeans_plusplus(x[rng.choice(args.n, min(args.n, 200_000), replace=False)], args.k, random_state=0)
        t_seed = time.perf_counter() - t
        t = time.perf_counter()
        km = KMeans(args.k, init=seeds, n_init=1, max_iter=300, tol=1e-4).fit(x)
        t_sk = time.perf_counter() - t
    print(f"N={args.n} d={args.dim} K={args.k} threads={args.threads}; k-means++ seeding {t_seed:.2f} s")
    print(f"sklearn Lloyd to convergence: {t_sk:.2f} s, {km.n_iter_} iterations, inertia/N {km.inertia_ / args.n:.4f}")
    for niter in (20, km.n_iter_):
        fk = faiss.Kmeans(args.dim, args.k, niter=niter, seed=0, max_points_per_centroid=args.n, verbose=False)
        t = time.perf_counter()
        fk.train(x, init_centroids=seeds.astype(np.float32))
        t_fa = time.perf_counter() - t
        inertia = float(fk.index.search(x, 1)[0].sum())
        print(f"faiss niter={niter}: {t_fa:.2f} s, inertia/N {inertia / args.n:.4f}; "
              f"time ratio faiss/sklearn {t_fa / t_sk:.2f}, inertia ratio {inertia / km.inertia_:.4f}")


if __name__ == "__main__":
    main()
