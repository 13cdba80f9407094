"""Ray Data stages: latent extraction, edge re-weighting and a fitted quantizer's codes sharded over an actor pool
(GPU workers on a cluster).

Each wraps a plain stage function (`geovq.stages.extract.encode_images`, `geovq.stages.edges.measure_edges`, a
fitted quantizer's `encode`) in a callable class for `map_batches` over `ActorPoolStrategy`: each actor loads the
model from its checkpoint path once, on the GPU Ray assigned it, then handles batch after batch. Extraction's
dataset is the split the driver already holds (index, image, label blocks in the object store: 172 MB for MNIST's
training split), so an actor does not re-read and re-split the whole dataset before its first batch, and each actor
writes its batches' latents as Parquet shards itself: sent back through the object store to Ray Data's write tasks,
MNIST's 350 MB of latents cost 4x what pyarrow takes to write them (bench/ray_data.py). Edge re-weighting's output
is small, and Ray Data writes it. The codes stage's input is a split's latents, its output one code per token, both
small beside the decoder passes that make them.

The sweep runs these from the driver between Tune phases when it runs on a cluster (`--address`): inside a
trial, a Ray Data job would wait for CPUs that the trials hold. When Ray Data reads a stage's input (the edge
table), the actors' CPU reservations leave one CPU of the cluster free for the read tasks: a pool that
reserves every CPU hangs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet, TokenLayout

#: rows per map_batches call: a multiple of the encoder's own inference batch, so batches line up
EXTRACT_BATCH = 2048
EDGE_BATCH = 65536


@dataclass(frozen=True)
class ActorPool:
    """An actor pool's shape: how many actors, what each reserves, and the torch threads each runs."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int

    def map_batches_args(self) -> dict[str, Any]:
        from ray.data import ActorPoolStrategy

        return {"compute": ActorPoolStrategy(size=self.size), "num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def actor_pool(num_gpus: float, read_tasks: bool, max_actors: int | None = None) -> ActorPool:
    """One actor per num_gpus of the cluster's GPUs (num_gpus > 0), else one single-threaded actor per CPU
    (less one CPU for read tasks, whose threads the actors use meanwhile); at most `max_actors` (the blocks
    there are to hand out: Ray Data warns of actors it cannot feed), each then with more threads.

    On CPUs one process per core can beat one process with a thread per core: torch's intra-op threads scale
    imperfectly on these small convolutions (2 single-threaded encoders did up to 1.3x the images/s of one
    encoder with 2 threads on the 2-core bench machine). A stage whose input Ray Data reads (read_tasks) keeps
    one CPU of the cluster out of the actors' reservations for those tasks: a pool that reserves every CPU
    then hangs."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    spare = 1.0 if read_tasks and cpus > 1 else 0.0
    if num_gpus > 0 and gpus < num_gpus:
        raise GeovqError(f"Ray Data stage asks {num_gpus:g} GPU(s) per actor; the cluster has {gpus:g}")
    size = max(1, int(gpus // num_gpus) if num_gpus > 0 else int(cpus - spare))
    size = min(size, max_actors or size)
    if num_gpus > 0:
        cpus_per_actor = min(1.0, (cpus - spare) / size)
        return ActorPool(size, max(0.1, cpus_per_actor), num_gpus, max(1, int(cpus_per_actor)))
    return ActorPool(size, 1.0, 0.0, max(1, round(cpus / size)))  # the spare CPU's threads: read tasks are brief


def _actor_device(num_gpus: float):
    import ray
    import torch

    if num_gpus > 0 and ray.get_gpu_ids():
        if not torch.cuda.is_available():
            raise GeovqError(f"a Ray Data actor was assigned GPU {ray.get_gpu_ids()}, but torch sees no CUDA device")
        return torch.device("cuda", 0)
    return torch.device("cpu")


class LatentExtractor:
    """map_batches callable: (index, image, label) rows -> one Parquet shard of (index, μ, log σ² flattened to
    h·w·C, label) in out_dir per batch; returns the shard's (first index, rows, path)."""

    def __init__(self, checkpoint: str, out_dir: str, num_gpus: float, threads: int) -> None:
        import torch

        from geovq.training.checkpoint import load_model

        torch.set_num_threads(threads)
        self.device = _actor_device(num_gpus)
        self.model = load_model(checkpoint, "vae", self.device)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from geovq.io import atomic_path
        from geovq.stages.extract import encode_images

        index = batch["index"]
        mu, logvar = encode_images(self.model, batch["image"], self.device)  # (B, h, w, C) each
        columns = {"index": index, "label": batch["label"]}
        for name, value in (("mu", mu), ("logvar", logvar)):  # fixed-size lists: any Parquet reader reads them
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value[0].size)
        path = self.out_dir / f"part-{int(index[0]):09d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
        return {"first": index[:1], "rows": np.array([len(index)]), "path": np.array([str(path)])}


def extract_latents_parquet(checkpoint: Path, images: np.ndarray, labels: np.ndarray, out_dir: Path,
                            num_gpus: float = 0.0, threads: int | None = None) -> Path:
    """Write the latents of a split's images (N, ch, H, W) as Parquet shards in out_dir (one Ray Data job over
    blocks of EXTRACT_BATCH images); returns out_dir."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = [pa.table({"index": np.arange(start, min(start + EXTRACT_BATCH, len(images))),
                        "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[start:start + EXTRACT_BATCH])),
                        "label": np.asarray(labels[start:start + EXTRACT_BATCH])})
              for start in range(0, len(images), EXTRACT_BATCH)]
    pool = actor_pool(num_gpus, read_tasks=False, max_actors=len(blocks))  # in-memory blocks: no read task
    shards = ray.data.from_arrow(blocks).map_batches(
        LatentExtractor, batch_size=EXTRACT_BATCH,
        fn_constructor_kwargs=dict(checkpoint=str(checkpoint), out_dir=str(out_dir), num_gpus=num_gpus,
                                   threads=threads or pool.threads),
        **pool.map_batches_args()).take_all()
    written = sum(int(shard["rows"]) for shard in shards)
    if written != len(images):
        raise GeovqError(f"{out_dir}: the shards hold {written} of {len(images)} images")
    return out_dir


def latents_from_parquet(path: Path, layout: TokenLayout) -> tuple[LatentSet, np.ndarray]:
    """The LatentSet (in image order) and labels of Parquet shards written by `extract_latents_parquet`."""
    table = _read(path)
    order = np.argsort(table["index"])
    if not np.array_equal(table["index"][order], np.arange(len(order))):
        raise GeovqError(f"{path} does not hold every image of its split exactly once")
    shape = (len(order), layout.height, layout.width, layout.channels)
    return (LatentSet(table["mu"][order].reshape(shape), table["logvar"][order].reshape(shape), layout),
            table["label"][order])


class CodeEncoder:
    """map_batches callable: latents rows (index, id, split_images, μ and log σ² flattened), as
    `encode_split_codes` lays them out -> (index, codes, and the encode's additive figures as `stat:NAME` columns)
    by a unit's fitted quantizer, loaded once per actor with the VAE's decoder on the actor's device. Each image
    keeps its index in its split (id: `LatentSet.image_ids`), so what is drawn per image (pull-back's probes) is
    what the in-process encode of the whole split draws, and its split's size (`LatentSet.split_images`), so that
    its rule is the split's. A batch's figures (`Quantizer.encode_stats`) are spread evenly over its rows, so that
    the column sums are the job's."""

    def __init__(self, checkpoint: str, quantizer: str, layout: dict, num_gpus: float, threads: int) -> None:
        import torch

        from geovq.quantize.base import Quantizer
        from geovq.stages.fit import runtime_options
        from geovq.training.checkpoint import load_model

        torch.set_num_threads(threads)
        vae = load_model(checkpoint, "vae", _actor_device(num_gpus))
        self.quantizer = Quantizer.load(quantizer, **runtime_options(Quantizer.load_class(quantizer), vae))
        self.layout = TokenLayout(**layout)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lay = self.layout
        rows = len(batch["index"])
        shape = (rows, lay.height, lay.width, lay.channels)
        mu = np.stack(batch["mu"]).reshape(shape).astype(np.float32)
        logvar = np.stack(batch["logvar"]).reshape(shape).astype(np.float32)
        # rows of several splits (encode_split_codes): each image by its index in its split (id) and each split's
        # images by the rule of the split's size (split_images)
        ids, sizes = batch["id"], batch["split_images"]
        codes = np.empty((rows, lay.tokens_per_image), dtype=np.int64)
        totals: dict[str, float] = {}
        for size in np.unique(sizes):
            mine = np.flatnonzero(sizes == size)
            codes[mine] = self.quantizer.encode(LatentSet(mu[mine], logvar[mine], lay, ids[mine], int(size)))
            for name, value in self.quantizer.encode_stats().items():
                totals[name] = totals.get(name, 0.0) + value
        stats = {f"stat:{name}": np.full(rows, value / rows) for name, value in totals.items()}
        return {"index": batch["index"], "codes": codes, **stats}


@dataclass
class ShardedCodes:
    """What the Ray Data codes stage returns: a split's (N, T) codes in image order, the sum of its actors'
    `encode_stats`, the pool's size, and the job's wall seconds."""

    codes: np.ndarray
    stats: dict[str, float]
    actors: int
    seconds: float


def encode_split_codes(checkpoint: Path, quantizer: Path, splits: list[LatentSet], num_gpus: float = 0.0,
                       threads: int | None = None, batch_size: int = 512) -> list[ShardedCodes]:
    """The codes of each of a unit's splits (its latents_{split}.npz, cut into the unit's tokens, held by the
    driver) by one Ray Data job (its start-up paid once): the splits' rows one after another, each image drawing
    by its index in its own split (`LatentSet.ids`) and encoded by the rule of its split's size (a method whose
    rule depends on it: `LatentSet.split_images`), sharded over an actor pool (`encode_codes_table`). The figures
    and seconds of each split's record are the job's, shared out by images."""
    import pyarrow as pa

    def rows(arrays: list[np.ndarray]) -> pa.FixedSizeListArray:  # (N, h, w, C) each -> N lists of h·w·C floats
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(len(a), -1) for a in arrays])
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])

    sizes = [s.n_images for s in splits]
    table = pa.table({"index": pa.array(np.arange(sum(sizes), dtype=np.int64)),
                      "id": pa.array(np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in splits])),
                      "split_images": pa.array(np.repeat(np.asarray(sizes, dtype=np.int64), sizes)),
                      "mu": rows([s.mu for s in splits]), "logvar": rows([s.logvar for s in splits])})
    whole = encode_codes_table(checkpoint, quantizer, table, splits[0].layout, num_gpus, threads, batch_size)
    bounds = np.cumsum([0, *sizes])
    return [ShardedCodes(whole.codes[a:b], {k: v * (b - a) / bounds[-1] for k, v in whole.stats.items()},
                         whole.actors, whole.seconds * (b - a) / bounds[-1]) for a, b in zip(bounds[:-1], bounds[1:])]


def encode_codes_table(checkpoint: Path, quantizer: Path, table: Any, layout: TokenLayout, num_gpus: float = 0.0,
                       threads: int | None = None, batch_size: int = 512) -> ShardedCodes:
    """(N, T) codes, in index order, of latents rows (a pyarrow table: index 0..N-1, μ, log σ²) by a unit's fitted
    quantizer, sharded over an actor pool of `batch_size`-image batches: a pull-back or geodesic encode's decoder
    passes, one actor per GPU on a cluster. The codes are the in-process encode's; its record (the rule's agreement
    with the exact one) is the caller's to make once, from the summed figures (`Quantizer.encode_record`)."""
    import ray

    t0 = time.perf_counter()
    # the driver holds the table and hands out blocks of `batch_size` images: no read task needs a CPU, so the pool
    # may take every core (a pool beside read tasks leaves one free)
    blocks = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]
    if not blocks:
        raise GeovqError("no latents to encode: the split is empty")
    pool = actor_pool(num_gpus, read_tasks=False, max_actors=len(blocks))
    rows = ray.data.from_arrow(blocks).map_batches(
        CodeEncoder, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(checkpoint=str(checkpoint), quantizer=str(quantizer), layout=layout.as_dict(),
                                   num_gpus=num_gpus, threads=threads or pool.threads),
        **pool.map_batches_args()).take_all()
    index = np.array([int(r["index"]) for r in rows])
    order = np.argsort(index)
    if not np.array_equal(index[order], np.arange(len(index))):
        raise GeovqError("the encoded shards do not hold every image of the split exactly once")
    stats = {name.removeprefix("stat:"): float(sum(r[name] for r in rows)) for name in rows[0] if
             name.startswith("stat:")}
    return ShardedCodes(np.stack([np.asarray(rows[i]["codes"]) for i in order]).astype(np.int64), stats, pool.size,
                        time.perf_counter() - t0)


class EdgeMeasurer:
    """map_batches callable: edge rows (edge, a, b as landmark ids) -> (edge, length) in the VAE's metric."""

    def __init__(self, checkpoint: str, latents: str, token_dim: int, grouping: str, tokens: np.ndarray,
                 quadrature: str, num_gpus: float, threads: int) -> None:
        import torch

        from geovq.stages.common import GridDecoder
        from geovq.training.checkpoint import load_model

        torch.set_num_threads(threads)
        self.decoder = GridDecoder(load_model(checkpoint, "vae", _actor_device(num_gpus)))
        self.latents = LatentSet.load(latents).with_tokens(token_dim, grouping)
        self.tokens, self.quadrature = np.asarray(tokens), quadrature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from geovq.stages.edges import measure_edges

        edges = np.stack([batch["a"], batch["b"]], axis=1)
        return {"edge": batch["edge"], "length": measure_edges(self.decoder, self.latents, self.tokens, edges,
                                                              self.quadrature)}


def edge_lengths_parquet(checkpoint: Path, latents: Path, token_dim: int, grouping: str, tokens: np.ndarray,
                         edges: np.ndarray, quadrature: str, work_dir: Path, num_gpus: float = 0.0,
                         threads: int | None = None) -> np.ndarray:
    """(E,) lengths of `edges` (E, 2; ids into `tokens`): the edge table is written as Parquet, re-weighted by
    an actor pool, and read back in edge order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    work_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"edge": np.arange(len(edges)), "a": edges[:, 0], "b": edges[:, 1]})
    pq.write_table(table, work_dir / "edges.parquet", row_group_size=EDGE_BATCH)
    lengths_dir = work_dir / "lengths"
    pool = actor_pool(num_gpus, read_tasks=True)
    ray.data.read_parquet(str(work_dir / "edges.parquet")).map_batches(
        EdgeMeasurer, batch_size=EDGE_BATCH,
        fn_constructor_kwargs=dict(checkpoint=str(checkpoint), latents=str(latents), token_dim=token_dim,
                                   grouping=grouping, tokens=tokens, quadrature=quadrature, num_gpus=num_gpus,
                                   threads=threads or pool.threads),
        **pool.map_batches_args()).write_parquet(str(lengths_dir))
    result = _read(lengths_dir)
    out = np.full(len(edges), np.nan)
    out[result["edge"]] = result["length"]
    if np.isnan(out).any():
        raise GeovqError(f"{lengths_dir} misses {int(np.isnan(out).sum())} of {len(edges)} edge lengths")
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every column of a folder of Parquet shards as numpy arrays (tensor columns as 2-D arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's Arrow tensor extension type for 2-D columns)

    table = pq.read_table(str(path))
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):  # (rows, width), without a Python object per row
            out[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
        else:
            out[name] = column.to_numpy_ndarray() if hasattr(column, "to_numpy_ndarray") else column.to_numpy()
    return out
