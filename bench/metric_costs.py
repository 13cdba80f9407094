"""First-order metric costs (c_k − z)ᵀ G (c_k − z): two matrix products against the (n, K, d) difference form.

    python bench/metric_costs.py --run runs/mnist-3seeds        # its seed-0 geodesic units, 1 thread

For each fitted geodesic unit of seed 0: `--tokens` training tokens (stratified across images) encoded by the
`landmark_metric` rule (each token's metric tensor borrowed from the landmarks most like it in context, then
the cheapest code; the rule geovq uses for every MNIST split), once with `geovq.nearest.metric_costs` as geovq
runs it and once with the difference form it replaced, `einsum("nkd,nde,nke->nk")` over (n, K, d) differences,
in the same process. Prints both times, their ratio, and the share of tokens given the same code.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch

import geovq.nearest as nearest
from geovq.geometry.landmarks import stratified_tokens
from geovq.quantize.base import Quantizer, get_quantizer_class
from geovq.stages.fit import load_latents, load_vae, runtime_options
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit


#: rows per block of the replaced code (its (rows, K, d) differences stayed small)
DIFFERENCE_ROWS = 1024


def difference_form(points: np.ndarray, metrics: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(n, K) the same costs from (n, K, d) differences, DIFFERENCE_ROWS at a time as the replaced code took
    them: no cancellation, but no matrix product either."""
    out = []
    for s in range(0, len(points), DIFFERENCE_ROWS):
        delta = codes[None] - points[s:s + DIFFERENCE_ROWS, None]
        out.append(np.einsum("nkd,nde,nke->nk", delta, metrics[s:s + DIFFERENCE_ROWS], delta))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory with fitted geodesic units of seed 0")
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens encoded per unit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = RunDir(Path(args.run))
    units = sorted(glob.glob(f"{args.run}/units/geodesic-*-seed0-*/quantizer.npz"))
    if not units:
        raise SystemExit(f"no fitted geodesic unit of seed 0 in {args.run}/units")
    fast = nearest.metric_costs
    for path in units:
        unit = Unit.from_dict(json.loads((Path(path).parent / "unit.json").read_text()))
        vae = load_vae(run, unit, torch.device("cpu"))
        quantizer = Quantizer.load(path, **runtime_options(get_quantizer_class(unit.method, unit.quantizer), vae))
        train = load_latents(run, unit, "train")
        tokens = stratified_tokens(train.n_images, train.tokens_per_image, min(args.tokens, train.n_tokens),
                                   np.random.default_rng(0))
        quantizer.encode_tokens(train, tokens[:10], rule="landmark_metric")  # the landmarks' metrics, once
        seconds, codes = {}, {}
        for name, costs in (("matrix products", fast), ("difference form", difference_form)):
            nearest.metric_costs = costs
            t = time.perf_counter()
            codes[name] = quantizer.encode_tokens(train, tokens, rule="landmark_metric")
            seconds[name] = time.perf_counter() - t
        nearest.metric_costs = fast
        same = (codes["matrix products"] == codes["difference form"]).mean()
        print(f"{Path(path).parent.name:40s} {len(tokens)} tokens: matrix products {seconds['matrix products']:.1f} s, "
              f"difference form {seconds['difference form']:.1f} s, ratio "
              f"{seconds['difference form'] / seconds['matrix products']:.2f}; same code for {same:.6f} of tokens",
              flush=True)


if __name__ == "__main__":
    main()
