"""The curve minimiser's line search on a flat decoder: stop cutting at E's resolution, or cut 30 times.

    python bench/line_search.py --run runs/mnist-3seeds        # its plain and TDC VAEs of seed 0, 1 thread

For each VAE: the in-context geodesic fit (`paths="context"`, K=256, --landmarks stratified training tokens,
one medoid-update round), once as geovq runs it (a step the model expects to lower the curve energy E by less
than `DECREASE_RESOLUTION` · E ends the line search: a numerical minimum) and once with that rule off (every
rejected step cut again, up to `MAX_BACKTRACKS` times), in the same process. Prints each fit's wall time,
curve evaluations and the in-context objective, the time ratio, and whether the two codebooks are equal.
A plain β-VAE's decoder is flat in most latent directions, where the first quasi-Newton step of a curve that
is already (numerically) shortest is rejected over and over, one or two curves per decoder call.
"""

from __future__ import annotations

import argparse
import glob
import time

import numpy as np
import torch

import geovq.geometry.curves as curves
from geovq.latents import LatentSet
from geovq.quantize import make_quantizer
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model


def fit(vae_dir: str, landmarks: int, n_codes: int) -> tuple[float, int, float, np.ndarray]:
    """(seconds, curve evaluations, in-context objective, codebook) of one in-context geodesic fit."""
    vae = load_model(f"{vae_dir}/model.pt", "vae")
    train = LatentSet.load(f"{vae_dir}/latents_train.npz")
    evaluations = [0]
    run = curves._Minimiser.run

    def counted(self, tol, max_iter):
        out = run(self, tol, max_iter)
        evaluations[0] += out.evaluations
        return out

    curves._Minimiser.run = counted
    try:
        q = make_quantizer("geodesic", n_codes, seed=0, decoder=GridDecoder(vae), max_landmarks=landmarks)
        t = time.perf_counter()
        q.fit(train)
        return time.perf_counter() - t, evaluations[0], q.fit_info_["context"]["objective"], q.codebook_
    finally:
        curves._Minimiser.run = run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory with trained VAEs (vae/*-seed0-*/)")
    ap.add_argument("--landmarks", type=int, default=2000)
    ap.add_argument("--k", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    resolution = curves.DECREASE_RESOLUTION
    for vae_dir in sorted(glob.glob(f"{args.run}/vae/*-seed0-*")):
        results = {}
        for name, value in (("resolution stop", resolution), ("30 cuts", 0.0)):
            curves.DECREASE_RESOLUTION = value
            results[name] = fit(vae_dir, args.landmarks, args.k)
            seconds, evaluations, objective, _ = results[name]
            print(f"{vae_dir.split('/')[-1]:32s} {name:16s} {seconds:7.1f} s  {evaluations:7d} curve evaluations  "
                  f"objective {objective:.9g}", flush=True)
        curves.DECREASE_RESOLUTION = resolution
        (fast, *_, a), (slow, *_, b) = results["resolution stop"], results["30 cuts"]
        print(f"{'':32s} time ratio (30 cuts / resolution stop) {slow / fast:.2f}; codebooks equal: "
              f"{np.array_equal(a, b)}", flush=True)


if __name__ == "__main__":
    main()
