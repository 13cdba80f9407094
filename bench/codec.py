"""geovq.Codec on a run's test images: real bytes against the prior's estimate and against fixed length (issue 28).

    python bench/codec.py runs/digits-quick [--images N]

For every unit of the run whose prior the sweep trained (the Transformer's, where there are both), the test
images (all, or the first --images) are compressed one file each, and decompressed. Printed per unit:
- files: mean bits per image with the 7-byte header, the payload's mean bits, the prior's estimate
  (−Σ log2 p of the same codes), the payload over the estimate (the coder's flush: at most one 32-bit word
  per file), the largest payload − estimate of any one image (bits; at most 32), and the file over fixed length
  (tokens × log2 K, no header: the sweep's `bits_per_image`);
- round trip: the share of images whose decoded codes equal the sweep's saved test codes (must be 100%);
- speed: compress and entropy-decode images/s (the prior stepped through blocks of 16 images: see geovq/codec.py);
  baselines in the same run: the fixed-length codec's compress images/s on the same images, and format 2's decoder
  (one causal forward of the prior per code, one image at a time, the prior's share of decoding) on the first
  --baseline-images images, with the new decoder's speed over it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from geovq.codec import HEADER_BYTES, Codec
from geovq.stages.common import load_splits
from geovq.stages.plan import RunPlan
from geovq.training.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a sweep's run directory with priors")
    parser.add_argument("--images", type=int, default=None, help="the first N test images [default: all]")
    parser.add_argument("--baseline-images", type=int, default=32, help="images format 2's decoder is timed on")
    args = parser.parse_args()
    plan = RunPlan.load(args.run)
    images = load_splits(plan.cfg).test[:args.images]
    print(f"{args.run}: {len(images)} test images, header {HEADER_BYTES} bytes")
    print(f"{'unit':44s} {'file':>7s} {'payload':>8s} {'estimate':>9s} {'pay/est':>8s} {'max over':>8s} "
          f"{'file/fixed':>10s} {'same codes':>10s} {'comp/s':>8s} {'decomp/s':>9s} {'fixed comp/s':>12s} "
          f"{'v2 decomp/s':>11s} {'decomp ×':>8s}")
    for unit in plan.with_codes():
        prior_path = plan.run.prior(unit, "transformer") / "prior.pt"
        if not prior_path.exists():
            continue
        codec, fixed = Codec.for_unit(plan, unit, "transformer"), Codec.for_unit(plan, unit, None)
        saved = np.load(plan.run.codes(unit, "test"))[:len(images)]
        t0 = time.perf_counter()
        files = codec.compress(images)
        compress_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = codec.coder.decode(files)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed.compress(images)
        fixed_s = time.perf_counter() - t0
        prior = load_model(prior_path, "prior")
        baseline_s = format2_decode_seconds(prior, saved[:args.baseline_images])
        baseline = min(args.baseline_images, len(saved)) / baseline_s
        with torch.no_grad():
            estimate = prior.token_nll(torch.as_tensor(saved, dtype=torch.long)).sum(1).numpy() / math.log(2)
        sizes = np.array([8 * len(f) for f in files])
        payload = sizes - 8 * HEADER_BYTES
        fixed_bits = codec.coder.tokens * math.log2(unit.n_codes)
        print(f"{unit.key:44s} {sizes.mean():7.1f} {payload.mean():8.1f} {estimate.mean():9.1f} "
              f"{payload.mean() / estimate.mean():8.3f} {(payload - estimate).max():8.2f} "
              f"{sizes.mean() / fixed_bits:10.3f} {(decoded == saved).all(1).mean():10.1%} "
              f"{len(images) / compress_s:8.1f} "
              f"{len(images) / decode_s:9.1f} {len(images) / fixed_s:12.1f} {baseline:11.1f} "
              f"{len(images) / decode_s / baseline:8.1f}")


def format2_decode_seconds(prior: torch.nn.Module, codes: np.ndarray) -> float:
    """Seconds format 2's decoder spent in the prior on these images: per image, per code t, one causal forward
    of the whole (1, T) sequence with the codes before t and zeros after, on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prior.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for row in torch.as_tensor(codes, dtype=torch.long):
            for t in range(len(row)):
                torch.softmax(prior.logits(torch.where(torch.arange(len(row)) < t, row, 0)[None])[0, t].double(), -1)
    torch.set_num_threads(threads)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
