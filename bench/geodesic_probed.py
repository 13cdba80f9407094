"""The geodesic quantizer's probed in-context rule against its exact rule, on a trained VAE (issue 26, item 2).

    python bench/geodesic_probed.py runs/mnist-quick-coded --vae tdc-T6-d16-seed0-ac20d79c [--images 100]

Fits a geodesic quantizer (K, landmarks and seed as given; paths="context") on the VAE's training latents, then
encodes the first --images test images by the exact rule "context" and by "context_probed" (the default for large
MNIST splits), one thread each, in this run, and prints: seconds and decoder forward-equivalents per token of each,
the ratio, the share of tokens the probed rule sent to curves, its agreement with the exact codes, the first-order
landmark_metric rule's agreement, and the check-sample figures `encode_info` records (agreement, ΔPSNR).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from geovq.latents import LatentSet
from geovq.quantize import make_quantizer
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a sweep's run directory")
    parser.add_argument("--vae", required=True, help="the VAE's folder name under RUN/vae")
    parser.add_argument("--images", type=int, default=100, help="test images encoded by both rules")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--landmarks", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=None, help="[default: the quantizer's]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    vae_dir = args.run / "vae" / args.vae
    decoder = GridDecoder(load_model(vae_dir / "model.pt", "vae").eval())
    train = LatentSet.load(vae_dir / "latents_train.npz")
    test = LatentSet.load(vae_dir / "latents_test.npz").subset(np.arange(args.images))
    t0 = time.perf_counter()
    q = make_quantizer("geodesic", args.k, seed=0, decoder=decoder, max_landmarks=args.landmarks).fit(train)
    print(f"fit: {time.perf_counter() - t0:.1f} s ({args.landmarks} landmarks, K {args.k})")
    t0 = time.perf_counter()
    exact = q.encode_tokens(test, rule="context")
    exact_seconds = time.perf_counter() - t0
    q.exact_encode_limit, q.approx_rule = 0, "context_probed"
    q.probes = args.probes or q.probes
    codes, info = q.encode_with_info(test)
    codes = codes.reshape(-1)
    seconds = info["seconds_probes"] + info["seconds_curves"]
    per_token = info["encode_forward_equivalents_per_token"] / seconds  # forward-equivalents per token per second
    first_order = q.encode_tokens(test, rule="landmark_metric")
    print(f"{args.images} test images, {test.n_tokens} tokens, {q.probes} probes, margin {q.margin}")
    print(f"  exact   {exact_seconds:7.1f} s  {exact_seconds * per_token:6.2f} forward-equivalents/token")
    print(f"  probed  {seconds:7.1f} s  {seconds * per_token:6.2f} forward-equivalents/token  "
          f"({exact_seconds / seconds:.2f}x cheaper; {info['curve_fraction']:.1%} of tokens to curves)")
    print(f"  agreement with the exact codes: probed {np.mean(codes == exact):.4f}, landmark_metric "
          f"{np.mean(first_order == exact):.4f}; encode_info check sample: agreement {info['agreement']:.4f}, "
          f"dPSNR {info['delta_psnr_db']:+.4f} dB")


if __name__ == "__main__":
    main()
