"""Encode cost of pull-back k-means (issue 13) against the decoder's own forward pass, on MNIST-sized latents.

    nice -n 10 python bench/pullback_encode.py            # MNIST trunk, UNTRAINED weights, N(0, 1) μ-grids
    nice -n 10 python bench/pullback_encode.py --checkpoint runs/mnist/vae/plain-seed0-*/model.pt \
        --latents runs/mnist/vae/plain-seed0-*/latents_test.npz \
        --train-latents runs/mnist/vae/plain-seed0-*/latents_train.npz

Latents are 7×7×16 grids (d = 16, one token per cell, 49 per image) and the decoder is the MNIST trunk
(hidden 64, two res blocks) behind `GridDecoder`, as in a sweep. Without a checkpoint its weights are random
and its μ-grids N(0, 1): the COST does not depend on the weights (the same dense convolutions run), but the
codes and the re-rank figures then mean nothing. With a trained VAE, the re-rank line also says how many
codes the exact in-context decode error changes and by how much it lowers that error.

Encoding needs every token's metric tensor G_i: d = 16 tangent passes of the full decoder around one primal
pass per token, by the trunk's forward-mode pass (`Decoder.mean_jvp`). In the same run, the decoder's plain
forward over the same images is timed (no gradients, the cheaper of batch 64 and 256, before and after the
encodes); the encode is reported in forward-equivalents = its time per image ÷ the forward's time per image,
and extrapolated to 10k images (the MNIST test split). Times are this process's CPU time at --threads
(1 by default: on a shared machine wall times swing while CPU times hold); wall time is printed beside.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from geovq.config import TrunkConfig
from geovq.latents import LatentSet
from geovq.models.vae import GaussianVAE
from geovq.quantize import make_quantizer
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model

FORWARD_BATCHES = (64, 256)


def forward_cost(decoder: GridDecoder, grids: torch.Tensor) -> tuple[float, float]:
    """(CPU, wall) seconds per image of the plain forward at the cheaper of FORWARD_BATCHES."""
    best = (np.inf, np.inf)
    with torch.no_grad():
        for batch in FORWARD_BATCHES:
            decoder(grids[:batch])  # warm-up
            cpu, wall = time.process_time(), time.perf_counter()
            for s in range(0, len(grids), batch):
                decoder(grids[s:s + batch])
            best = min(best, ((time.process_time() - cpu) / len(grids), (time.perf_counter() - wall) / len(grids)))
    return best


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained Gaussian VAE (model.pt); default: untrained MNIST trunk")
    ap.add_argument("--latents", help="its latents to encode (latents_test.npz)")
    ap.add_argument("--train-latents", help="its training latents to fit on (latents_train.npz)")
    ap.add_argument("--images", type=int, default=100, help="images encoded (49 tokens each)")
    ap.add_argument("--fit-tokens", type=int, default=5000, help="pullback max_tokens for the fit")
    ap.add_argument("--codes", type=int, default=256, help="K")
    ap.add_argument("--rerank", type=int, default=4, help="candidates re-scored in a second encode (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    if args.checkpoint:
        vae = load_model(args.checkpoint, "vae")
        test_all = LatentSet.load(args.latents)
        train_all = LatentSet.load(args.train_latents)
        test = test_all.subset(np.sort(rng.choice(test_all.n_images, args.images, replace=False)))
        train = train_all.subset(np.sort(rng.choice(train_all.n_images, min(train_all.n_images, 5000), replace=False)))
        print(f"trained VAE {args.checkpoint}")
    else:
        torch.manual_seed(args.seed)
        vae = GaussianVAE(TrunkConfig()).eval()  # MNIST: 28×28, hidden 64, C = 16, grid 7×7
        h, w = TrunkConfig().grid
        c = TrunkConfig().latent_channels

        def random_latents(n: int) -> LatentSet:
            mu = rng.standard_normal((n, h, w, c)).astype(np.float32)
            return LatentSet.from_grids(mu, np.full_like(mu, -2.0))

        train, test = random_latents(1000), random_latents(args.images)
        print("UNTRAINED MNIST trunk, N(0, 1) μ-grids: cost figures only (codes and re-rank effects mean nothing)")
    decoder = GridDecoder(vae)
    n, per_image = test.n_images, test.tokens_per_image
    print(f"grid {test.mu.shape[1:]}, d={test.token_dim}, {per_image} tokens per image, K={args.codes}, "
          f"{args.threads} thread(s), device {decoder.device}")

    q, fit_cpu, fit_wall = timed(lambda: make_quantizer("pullback", args.codes, seed=args.seed, decoder=decoder,
                                                        max_tokens=args.fit_tokens).fit(train))
    info = q.fit_info_
    metric_seconds = info["seconds"]["metrics"]
    print(f"fit on {info['tokens']} tokens: {fit_cpu:.1f} s CPU ({fit_wall:.1f} s wall); metric tensors "
          f"{metric_seconds:.1f} s wall ({1e3 * metric_seconds / info['tokens']:.2f} ms/token), "
          f"{info['iterations']} iterations {info['seconds']['iterations']:.1f} s; linearised objective "
          f"k-means {info['objective_kmeans']:.4g} -> pullback {info['objective']:.4g}")

    grids = torch.as_tensor(test.mu)
    before = forward_cost(decoder, grids)
    q.rerank = 0
    (codes, enc), enc_cpu, enc_wall = timed(lambda: q.encode_with_info(test))
    reranked = None
    if args.rerank:
        q.rerank = args.rerank
        reranked = timed(lambda: q.encode_with_info(test))
    after = forward_cost(decoder, grids)
    fwd_cpu, fwd_wall = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    print(f"plain forward: {1e3 * fwd_cpu:.3f} ms CPU per image ({1e3 * fwd_wall:.3f} ms wall; before "
          f"{1e3 * before[0]:.3f}, after {1e3 * after[0]:.3f} ms CPU)")

    def report(name: str, cpu: float, wall: float) -> None:
        ratio = cpu / n / fwd_cpu
        print(f"{name}: {n} images, {n * per_image} tokens: {cpu:.1f} s CPU ({wall:.1f} s wall) = "
              f"{ratio:.0f} forward-equivalents per image ({ratio / per_image:.1f} per token; wall ratio "
              f"{wall / n / fwd_wall:.0f}); per 10k images: {ratio * 1e4:.3g} forward-equivalents, "
              f"{cpu / n * 1e4 / 60:.1f} min CPU ({wall / n * 1e4 / 60:.1f} min wall) at {args.threads} thread(s)")

    report("encode", enc_cpu, enc_wall)
    print(f"  of which metric tensors {enc['seconds_metrics']:.1f} s, costs and argmin {enc['seconds_assign']:.1f} s "
          f"(wall); the quantizer's own estimate: {enc['encode_forward_equivalents_per_token']:.1f} "
          f"forward-equivalents per token")
    if reranked:
        (codes_r, info_r), cpu_r, wall_r = reranked
        report(f"encode + re-rank {args.rerank}", cpu_r, wall_r)
        print(f"  re-rank: {info_r['seconds_rerank']:.1f} s wall; changed {info_r['rerank_changed']} codes "
              f"({100 * info_r['rerank_changed_fraction']:.2f}%); mean in-context decode error per token "
              f"{info_r['rerank_sq_error_linearised']:.4g} (linearised argmin; its linearised prediction "
              f"{info_r['rerank_sq_error_predicted']:.4g}) -> {info_r['rerank_sq_error']:.4g} (re-ranked)")
        assert (codes_r != codes).sum() == info_r["rerank_changed"]


if __name__ == "__main__":
    main()
