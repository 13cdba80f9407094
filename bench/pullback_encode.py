"""Pull-back k-means' encode: the probed rule (issue 26) against the exact rule, in one run, on a trained VAE.

    nice -n 10 python bench/pullback_encode.py runs/mnist-tdc --vae tdc-T8-d16-seed0-0b8e09a2 --images 1000

A trained VAE of a sweep run directory (its checkpoint, latents and the run's dataset and split). Pullback is fit on
--fit-tokens of its training tokens; --images test images (a fixed random subset) are encoded by
- the exact rule (`probes=0`): every token's metric G_i = J_iᵀJ_i by d forward-mode passes in its own image;
- the probed rule (`probes`, `confidence`): output probes per image estimate every token's metric at once, and
  the tokens whose best code the estimate cannot tell apart are settled by exact passes (quantize/pullback.py).
For each: seconds (this process's CPU time at --threads, and wall), decoder forward-equivalents per token (the
encode's time over a plain batched forward of the same images, timed in the same run), tokens per second; then
the share of tokens given the same code, and the test PSNR of the decoded codes (every token replaced) against
the original images, with the difference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from _trained import load_trained_vae
from geovq.metrics.image import psnr
from geovq.quantize import make_quantizer
from geovq.stages.common import GridDecoder, decode_grids

FORWARD_BATCH = 64


def forward_cpu_seconds(decoder: GridDecoder, grids: torch.Tensor) -> float:
    """CPU seconds per image of the plain forward in batches of FORWARD_BATCH, the fastest of three."""
    best = np.inf
    with torch.no_grad():
        decoder(grids[:2])
        for _ in range(3):
            cpu = time.process_time()
            for s in range(0, len(grids), FORWARD_BATCH):
                decoder(grids[s:s + FORWARD_BATCH])
            best = min(best, (time.process_time() - cpu) / len(grids))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a sweep run directory")
    ap.add_argument("--vae", required=True, help="the VAE's key (a directory under RUN/vae)")
    ap.add_argument("--codes", type=int, default=256, help="K")
    ap.add_argument("--images", type=int, default=1000, help="test images encoded by both rules")
    ap.add_argument("--fit-tokens", type=int, default=20_000, help="pullback max_tokens")
    ap.add_argument("--probes", type=int, default=32, help="output probes per image of the probed rule")
    ap.add_argument("--confidence", type=float, default=2.0, help="the probed rule's confidence (standard errors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    device = torch.device("cpu")

    trained = load_trained_vae(args.run, args.vae, args.images, args.seed, device)
    cfg, vae, decoder, train, test, originals = (trained.cfg, trained.vae, trained.decoder, trained.train,
                                                 trained.test, trained.originals)
    n, d = test.n_images, test.token_dim

    q = make_quantizer("pullback", args.codes, seed=args.seed, decoder=decoder, max_tokens=args.fit_tokens,
                       probes=args.probes, confidence=args.confidence).fit(train)
    print(f"{cfg.dataset} VAE {args.vae}: K={args.codes}, {test.tokens_per_image} tokens of d={d} per image, "
          f"{n} test images, {args.threads} thread(s); probed rule: {args.probes} probes, confidence "
          f"{args.confidence}")
    grids = torch.as_tensor(test.mu)
    forward = forward_cpu_seconds(decoder, grids)
    results = {}
    for rule, probes in (("exact", 0), ("probed", args.probes)):
        q.probes = probes
        if probes:  # warm-up: torch.func's first call
            q.encode_probed(test.subset(np.arange(2)))
        cpu, wall = time.process_time(), time.perf_counter()
        codes = q._encode_tokens(test)  # the encode alone (encode_with_info adds the check against exact)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        recons = decode_grids(vae.decoder, test.layout.tokens_to_grid(q.codebook_[codes].reshape(n, -1, d)), device)
        results[rule] = codes, float(psnr(originals, recons).mean())
        stats = q._encode_stats
        extra = (f"; unsure {stats['unsure'] / test.n_tokens:.1%} of tokens, {stats['verify_passes'] / test.n_tokens:.2f} "
                 f"exact passes per token" if probes else "")
        print(f"{rule:7s}: {cpu:7.1f} s CPU ({wall:.1f} s wall), {cpu / test.n_tokens / forward:5.2f} forward-equivalents "
              f"per token, {test.n_tokens / cpu:8.0f} tokens/s; PSNR {results[rule][1]:.3f} dB{extra}", flush=True)
    (exact, psnr_exact), (probed, psnr_probed) = results["exact"], results["probed"]
    print(f"probed against exact: {(exact == probed).mean():.4%} of tokens given the same code, "
          f"ΔPSNR {psnr_probed - psnr_exact:+.4f} dB")


if __name__ == "__main__":
    main()
