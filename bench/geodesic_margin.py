"""How far first-order rules are from the geodesic quantizer's in-context codes, and what a margin rule would cost
(issue 26, item 2).

    python bench/geodesic_margin.py runs/digits-quick [--split test]

For every geodesic unit of the run whose saved codes of the split were decided by its exact in-context rule
(`encode.json`'s rule "context": a split within `exact_encode_limit` tokens), printed per unit:
- borrowed: agreement with those codes of the first-order rule with metric tensors borrowed from landmarks
  (`landmark_metric`, what larger splits get today; no decoder call);
- own: agreement of the first-order rule with each token's own metric tensor G_i = J_iᵀJ_i in its own image
  (argmin_c ‖c − z_i‖_{G_i}; d tangent passes per token), and the seconds its metric tensors took;
- margin r: a rule that keeps the own first-order code where the runner-up is more than r times farther, and
  leaves the rest to the exact rule's curves: the share of tokens it sends to curves, and its agreement (those
  tokens take their saved exact code, so the agreement is what the rule would reach);
- probed: the rule built on it, `context_probed` (each token's metric estimated by the quantizer's output probes,
  its margin shown at PROBE_CONFIDENCE standard errors; the rest by the exact rule), run for real: the share of
  tokens it sent to curves, its agreement, its seconds against the exact rule's (both timed here, one thread) and
  its decoder forward-equivalents per token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from geovq.geometry.decoders import GridTokenDecoder
from geovq.geometry.lengths import node_metrics
from geovq.nearest import metric_costs
from geovq.stages.fit import load_fitted, load_latents
from geovq.stages.plan import RunPlan

MARGINS = (1.05, 1.1, 1.2, 1.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a sweep's run directory with geodesic units (paths=context)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = RunPlan.load(args.run)
    print(f"{'unit':40s} {'tokens':>7s} {'borrowed':>9s} {'own':>7s} {'own s':>6s} "
          + " ".join(f"{'r=' + str(r) + ' curves/agree':>20s}" for r in MARGINS)
          + f" {'probed curves/agree':>20s} {'probed s':>8s} {'exact s':>8s} {'FE/tok':>7s}")
    for unit in plan.with_codes():
        record = json.loads((plan.run.unit(unit) / "encode.json").read_text()).get(args.split, {})
        if unit.method != "geodesic" or record.get("rule") != "context":
            continue
        _, quantizer = load_fitted(plan.run, unit, torch.device("cpu"))
        latents = load_latents(plan.run, unit, args.split)
        exact = np.load(plan.run.codes(unit, args.split)).reshape(-1)
        borrowed = quantizer.encode_tokens(latents, rule="landmark_metric")
        t0 = time.perf_counter()
        tokens = GridTokenDecoder.from_latents(quantizer.decoder, latents)
        metrics = node_metrics(tokens)  # (N, d, d)
        seconds = time.perf_counter() - t0
        # ‖c − z_i‖_{G_i} for every code: the first-order cost the quantizer's own rules use
        dist = np.sqrt(np.maximum(metric_costs(tokens.points, metrics, quantizer.codebook_), 0))  # (N, K)
        nearest = np.sort(dist, axis=1)
        ratio = nearest[:, 1] / np.maximum(nearest[:, 0], 1e-12)
        own = dist.argmin(1)
        cells = []
        for r in MARGINS:
            sure = ratio > r
            cells.append(f"{1 - sure.mean():9.3f} / {np.mean(np.where(sure, own, exact) == exact):.4f}")
        t0 = time.perf_counter()
        again = quantizer.encode_tokens(latents, rule="context")  # the exact rule, timed beside the probed one
        exact_seconds = time.perf_counter() - t0
        assert (again == exact).all(), f"{unit.key}: the exact rule no longer gives the saved codes"
        quantizer.exact_encode_limit, quantizer.approx_rule = 0, "context_probed"  # (a saved unit keeps its own)
        probed, info = quantizer.encode_with_info(latents)
        probed = probed.reshape(-1)
        cells.append(f"{info['curve_fraction']:9.3f} / {np.mean(probed == exact):.4f}")
        print(f"{unit.key:40s} {len(exact):7d} {np.mean(borrowed == exact):9.4f} {np.mean(own == exact):7.4f} "
              f"{seconds:6.1f} " + " ".join(f"{c:>20s}" for c in cells)
              + f" {info['seconds_probes'] + info['seconds_curves']:8.2f} {exact_seconds:8.2f}"
              f" {info['encode_forward_equivalents_per_token']:7.2f}")


if __name__ == "__main__":
    main()
