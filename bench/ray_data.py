"""Ray Data latent extraction against a plain in-process loop, over the MNIST training split, same cores.

    python bench/ray_data.py --data-root /tmp/mnist      # 55,000 images; the MNIST trunk (untrained weights:
                                                         # extraction costs the same whatever the weights)

Both arms run the same encoder code (`geovq.stages.extract.encode_images`) on the same cores, from the split
in the driver's memory (as the sweep's driver holds it): the loop encodes it in one process with a torch
thread per core, and Ray Data's `map_batches` sends its blocks through the object store to the stage's
default actor pool (one single-threaded actor per core) that loads the model from its checkpoint and writes
each batch's latents as a Parquet shard. The loop writes nothing, so the
Ray Data arm also pays for its 350 MB of Parquet. `ray.init` is timed apart (start-up, paid once per sweep);
the ratio is the loop's wall time over Ray Data's (target >= 0.85).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("GEOVQ_DATA", "/tmp/mnist"))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the in-process loop")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)

    from geovq.config import resolve_config
    from geovq.models.vae import GaussianVAE
    from geovq.stages.common import load_splits
    from geovq.stages.extract import encode_images
    from geovq.training.checkpoint import save_checkpoint

    data = load_splits(resolve_config("mnist", (1, 28, 28), ["kmeans"], [256], 1, 1, False,
                                      data_root=args.data_root))
    cfg = resolve_config("mnist", data.image_shape, ["kmeans"], [256], 1, 1, False, data_root=args.data_root)
    torch.manual_seed(0)
    model = GaussianVAE(cfg.trunk).eval()
    work = Path(tempfile.mkdtemp(prefix="bench_raydata_"))
    save_checkpoint(work / "model.pt", "vae", model, {"trunk": cfg.trunk.as_dict()})
    n = len(data.train)
    print(f"MNIST train split: {n} images; trunk hidden={cfg.trunk.hidden}, C={cfg.trunk.latent_channels}; "
          f"{args.threads} torch threads in the loop; {os.cpu_count()} cores")

    encode_images(model, data.train[:512], torch.device("cpu"))  # warm-up
    t0 = time.perf_counter()
    encode_images(model, data.train, torch.device("cpu"))
    loop = time.perf_counter() - t0
    print(f"in-process loop:   {loop:7.2f} s  {n / loop:9,.0f} images/s")

    import ray

    from geovq.distributed.data import actor_pool, extract_latents_parquet, latents_from_parquet

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    print(f"ray.init:          {startup:7.2f} s  (start-up, once per sweep; not in the ratio)")
    t0, wall0 = time.perf_counter(), time.time()
    pool = actor_pool(0.0, read_tasks=False)
    print(f"actor pool:        {pool.size} actors x {pool.threads} torch thread(s) (the stage's default on CPUs)")
    out = extract_latents_parquet(work / "model.pt", data.train, data.train_labels, work / "parquet")
    job = time.perf_counter() - t0
    # Each actor writes a shard per batch, so the shards' times split the job: before the first shard, the
    # start-up (plan, actor scheduled, worker process, torch import, model load) and one batch; between the
    # first and the last, the steady state.
    shards = sorted((f.stat().st_mtime, pq.read_metadata(f).num_rows) for f in out.glob("*.parquet"))
    first_shard = shards[0][0] - wall0
    steady = (shards[-1][0] - shards[0][0]) / sum(rows for _, rows in shards[1:])  # s per image
    t0 = time.perf_counter()
    latents, _ = latents_from_parquet(out, cfg.layout)
    read = time.perf_counter() - t0
    assert latents.n_images == n
    print(f"Ray Data job:      {job:7.2f} s  {n / job:9,.0f} images/s  (actor start, blocks to the object store, "
          f"encode, Parquet write)")
    print(f"read back shards:  {read:7.2f} s  (driver, into one LatentSet)")
    startup_s = first_shard - steady * shards[0][1]
    print(f"  first shard at   {first_shard:7.2f} s  (start-up ~{startup_s:.2f} s + one batch of {shards[0][1]})")
    print(f"  steady state     {1 / steady:17,.0f} images/s  ({len(shards)} shards; ratio to the loop "
          f"{loop / n / steady:.2f})")
    ratio = loop / job
    print(f"throughput ratio Ray Data / loop = {ratio:.2f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})")
    ray.shutdown()


if __name__ == "__main__":
    main()
