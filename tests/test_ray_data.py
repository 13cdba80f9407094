"""Ray Data stages on real local Ray: latent extraction to Parquet shards and edge re-weighting of a Parquet
edge table give the in-process numbers."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_config
from geovq.stages.common import no_progress
from geovq.stages.rundir import RunDir
from geovq.stages.units import VaeSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from geovq.stages.common import load_splits
    from geovq.stages.run import run_vae

    cfg = tiny_config(["kmeans"])
    run = RunDir(tmp_path_factory.mktemp("raydata"))
    spec = VaeSpec("plain", 0)
    data = load_splits(cfg)
    run_vae(run, cfg, spec, CPU, no_progress, data)
    return run, cfg, spec, data


def test_ray_data_extraction_writes_parquet_shards_with_the_in_process_latents(trained, tmp_path):
    from geovq.distributed.data import extract_latents_parquet, latents_from_parquet
    from geovq.latents import LatentSet

    run, cfg, spec, data = trained
    out = extract_latents_parquet(run.vae(spec) / "model.pt", data.train, data.train_labels, tmp_path / "train")
    shards = sorted(out.glob("*.parquet"))
    assert shards and set(pq.read_schema(shards[0]).names) == {"index", "mu", "logvar", "label"}
    layout = cfg.layout.with_token_dim(cfg.trunk.latent_channels)
    latents, labels = latents_from_parquet(out, layout)
    in_process = LatentSet.load(run.latents(spec, "train"))
    np.testing.assert_allclose(latents.mu, in_process.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latents.logvar, in_process.logvar, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, data.train_labels)


def test_the_sweep_extracts_every_split_of_a_vae_in_one_job_with_the_in_process_latents(trained, tmp_path):
    import shutil

    from geovq.distributed.tune import Job, extract_on_cluster
    from geovq.latents import LatentSet

    run, cfg, spec, _ = trained
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.vae(spec), copy.vae(spec))
    for split in ("val", "test"):  # as after an interrupted extraction: train is kept, its stale shards too
        copy.latents(spec, split).unlink()
    (copy.vae(spec) / "parquet").mkdir()
    (copy.vae(spec) / "parquet" / "part-000009999.parquet").write_bytes(b"stale")
    extract_on_cluster([Job(copy, cfg, spec)])
    for split in ("train", "val", "test"):
        got, want = LatentSet.load(copy.latents(spec, split)), LatentSet.load(run.latents(spec, split))
        np.testing.assert_allclose(got.mu, want.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.logvar, want.logvar, rtol=1e-5, atol=1e-6)
    rows = sum(pq.read_metadata(f).num_rows for f in (copy.vae(spec) / "parquet").glob("*.parquet"))
    assert rows == sum(LatentSet.load(run.latents(spec, split)).n_images for split in ("val", "test"))  # one job


def test_ray_data_edge_reweighting_gives_the_in_process_lengths(trained, tmp_path):
    from geovq.distributed.data import edge_lengths_parquet
    from geovq.geometry import GridTokenDecoder, edge_lengths, knn_graph
    from geovq.latents import LatentSet
    from geovq.stages.common import GridDecoder
    from geovq.training.checkpoint import load_model

    run, cfg, spec, _ = trained
    latents = LatentSet.load(run.latents(spec, "train")).with_tokens(2, "contiguous")
    tokens = np.sort(np.random.default_rng(0).choice(latents.n_tokens, 300, replace=False))
    decoder = GridDecoder(load_model(run.vae(spec) / "model.pt", "vae"))
    nodes = GridTokenDecoder.from_latents(decoder, latents, tokens)
    edges = knn_graph(nodes.points, 5).edges
    want = edge_lengths(nodes, edges, "midpoint")
    got = edge_lengths_parquet(run.vae(spec) / "model.pt", run.latents(spec, "train"), 2, "contiguous", tokens,
                               edges, "midpoint", tmp_path / "edges", threads=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (tmp_path / "edges" / "edges.parquet").exists() and list((tmp_path / "edges" / "lengths").glob("*.parquet"))


def test_cpu_actor_pools_use_every_core_once_and_spare_one_cpu_for_read_tasks(ray_local):
    from geovq.distributed.data import actor_pool

    cpus = ray_local.cluster_resources()["CPU"]
    for read_tasks in (False, True):
        pool = actor_pool(0.0, read_tasks)
        assert pool.size * pool.threads == cpus  # every core busy, none oversubscribed
        reserved = pool.size * pool.num_cpus
        assert reserved == (cpus - 1 if read_tasks else cpus)  # a read task can always be scheduled
    one_block = actor_pool(0.0, False, max_actors=1)  # no actor Ray Data cannot feed; its threads use the cores
    assert (one_block.size, one_block.threads) == (1, cpus)


def test_ray_data_codes_of_a_split_are_the_in_process_codes(trained, tmp_path):
    """A fitted pull-back quantizer's probed codes of the test split, sharded over an actor pool in batches of 48
    images, are the in-process encode's of the same latents: each shard's probes are drawn by its images' indices
    in the split."""
    from geovq.distributed.data import encode_codes_parquet, extract_latents_parquet, latents_from_parquet
    from geovq.latents import LatentSet
    from geovq.quantize import make_quantizer
    from geovq.stages.common import GridDecoder
    from geovq.training.checkpoint import load_model

    run, cfg, spec, data = trained
    checkpoint = run.vae(spec) / "model.pt"
    decoder = GridDecoder(load_model(checkpoint, "vae"))
    train = LatentSet.load(run.latents(spec, "train"))
    q = make_quantizer("pullback", 16, seed=0, decoder=decoder, max_tokens=2000, probes=16).fit(train)
    q.save(tmp_path / "quantizer.npz")
    shards = extract_latents_parquet(checkpoint, data.test, data.test_labels, tmp_path / "test")
    test, _ = latents_from_parquet(shards, train.layout)
    assert q.rule_for(test) == "probed"  # 16 probes: the rule whose draws depend on the image's index
    in_process = q.encode(test)
    sharded = encode_codes_parquet(checkpoint, tmp_path / "quantizer.npz", shards, train.layout, batch_size=48)
    np.testing.assert_array_equal(sharded, in_process)
    # the index matters: the same images numbered from 0 in each shard would draw other probes
    shard = test.subset(np.arange(48, 96))
    np.testing.assert_array_equal(q.encode(shard), in_process[48:96])
    renumbered = LatentSet(shard.mu, shard.logvar, shard.layout)
    assert (q.encode(renumbered) != in_process[48:96]).any()
