"""Pull-back codes of a split sharded over a Ray Data actor pool against the plain in-process encode, same cores.

    python bench/ray_data_codes.py --data-root /tmp/mnist [--images 2000]   # MNIST test images, the MNIST trunk

Both arms encode the same latents (the first --images test images, written as the extraction stage's Parquet
shards) by the same fitted pull-back quantizer (its probed rule: 32 output probes per image, unsure tokens settled
exactly), with an untrained MNIST trunk (the decoder passes cost the same whatever the weights). The loop encodes
in one process with a torch thread per core; Ray Data hands blocks of --batch images to one single-threaded actor
per core, each of which loads the VAE and the quantizer once. `ray.init` is timed apart (paid once per sweep);
the actors' start-up is inside the Ray Data arm. Printed: both arms' wall seconds and tokens/s, the codes'
agreement (must be 100%), and the ratio, the loop's wall time over Ray Data's (issue 26's target: >= 0.85 on a job
long enough that the pool's fixed start-up does not dominate).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("GEOVQ_DATA", "/tmp/mnist"))
    ap.add_argument("--images", type=int, default=2000, help="test images encoded by both arms")
    ap.add_argument("--batch", type=int, default=250, help="images per Ray Data block")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the in-process loop")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from geovq.config import resolve_config
    from geovq.distributed.data import encode_split_codes, extract_latents_parquet, latents_from_parquet
    from geovq.models.vae import GaussianVAE
    from geovq.quantize import make_quantizer
    from geovq.stages.common import GridDecoder, load_splits
    from geovq.stages.extract import extract_latents
    from geovq.training.checkpoint import save_checkpoint

    cfg = resolve_config("mnist", (1, 28, 28), ["pullback"], [256], 1, None, False, data_root=args.data_root)
    data = load_splits(cfg)
    torch.manual_seed(0)
    vae = GaussianVAE(cfg.trunk).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-codes-"))
    save_checkpoint(work / "model.pt", "vae", vae, {"trunk": cfg.trunk.as_dict()})
    train = extract_latents(vae, data.train[:1000], cfg.layout, torch.device("cpu"))
    torch.set_num_threads(args.threads)
    q = make_quantizer("pullback", 256, seed=0, decoder=GridDecoder(vae), max_tokens=5000).fit(train)
    q.save(work / "quantizer.npz")

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    images = data.test[:args.images]
    shards = extract_latents_parquet(work / "model.pt", images, data.test_labels[:args.images], work / "test")
    latents, _ = latents_from_parquet(shards, cfg.layout)
    assert q.rule_for(latents) == "probed"

    t0 = time.perf_counter()
    loop = q.encode(latents)
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    (sharded,) = encode_split_codes(work / "model.pt", work / "quantizer.npz", [latents], batch_size=args.batch)
    sharded = sharded.codes
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    tokens = latents.n_tokens
    print(f"pull-back probed codes of {args.images} MNIST test images ({tokens} tokens of d={cfg.d}), "
          f"{os.cpu_count()} cores; ray.init {ray_start:.1f} s (apart)")
    print(f"in-process loop ({args.threads} threads): {loop_s:7.1f} s  {tokens / loop_s:8.0f} tokens/s")
    print(f"Ray Data ({os.cpu_count()} actors, blocks of {args.batch}): {ray_s:7.1f} s  {tokens / ray_s:8.0f} tokens/s")
    print(f"same codes: {100 * (loop == sharded).mean():.2f}%   ratio (loop s / Ray Data s): {loop_s / ray_s:.2f}")


if __name__ == "__main__":
    main()
