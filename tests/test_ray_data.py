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


def test_a_splits_shards_give_its_codes_and_figures_when_each_image_keeps_its_index(trained):
    """What the Ray Data codes stage relies on (its end-to-end test follows): pull-back's probed codes of the test
    split encoded in shards of 48 images, each image by its index in the split, are the whole split's codes, and
    the shards' additive figures (`encode_stats`: tokens left unsure by the probes, exact passes to settle them)
    sum to the whole's; the same images numbered from 0 in their shard draw other probes."""
    from geovq.latents import LatentSet
    from geovq.quantize import make_quantizer
    from geovq.stages.common import GridDecoder
    from geovq.training.checkpoint import load_model

    run, cfg, spec, data = trained
    decoder = GridDecoder(load_model(run.vae(spec) / "model.pt", "vae"))
    train = LatentSet.load(run.latents(spec, "train"))
    q = make_quantizer("pullback", 16, seed=0, decoder=decoder, max_tokens=2000, probes=16).fit(train)
    test = LatentSet.load(run.latents(spec, "test"))
    assert q.rule_for(test) == "probed"  # 16 probes: the rule whose draws depend on the image's index
    whole, stats = q.encode(test), q.encode_stats()
    parts, summed = [], dict.fromkeys(stats, 0.0)
    for start in range(0, test.n_images, 48):
        parts.append(q.encode(test.subset(np.arange(start, min(start + 48, test.n_images)))))
        summed = {k: summed[k] + v for k, v in q.encode_stats().items()}
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert stats["unsure"] > 0 and all(summed[k] == stats[k] for k in ("unsure", "verify_passes"))
    shard = test.subset(np.arange(48, 96))
    renumbered = LatentSet(shard.mu, shard.logvar, shard.layout)
    assert (q.encode(renumbered) != whole[48:96]).any()


def test_on_a_cluster_a_decoder_methods_codes_come_from_ray_data_with_the_in_process_codes_and_record(trained,
                                                                                                     tmp_path):
    """The sweep's cluster path (`--address`) for pull-back on a trained VAE: its unit is fitted alone (a "fit"
    phase), the Ray Data codes stage encodes its three splits in one job, and the "posthoc" phase scores those
    codes without encoding again. The codes and encode.json's record (rule, probed figures summed over the actors,
    agreement with the exact rule) are the in-process encode's."""
    import json
    import shutil
    from dataclasses import replace

    import ray

    from geovq.distributed.tune import codes_by_ray_data, run_sweep
    from geovq.stages.fit import load_fitted, load_latents
    from geovq.stages.plan import RunPlan

    run, _, spec, _ = trained
    cfg = tiny_config(["pullback"], method_params={"pullback": {"max_tokens": 2000, "probes": 16}})
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.vae(spec), copy.vae(spec))
    copy.config.write_text(cfg.to_yaml())
    (unit,) = RunPlan.of(copy, cfg).units
    assert codes_by_ray_data(copy, unit) and not codes_by_ray_data(copy, replace(unit, method="kmeans", params=()))
    run_sweep(copy, cfg, ray.get_runtime_context().gcs_address)  # k-means (above) would encode in its trial
    assert RunPlan.of(copy, cfg).finished() == 1 and not codes_by_ray_data(copy, unit)
    _, quantizer = load_fitted(copy, unit, CPU)
    sharded = json.loads((copy.unit(unit) / "encode.json").read_text())
    records = {}
    for split in ("train", "val", "test"):
        codes, records[split] = quantizer.encode_with_info(load_latents(copy, unit, split))
        np.testing.assert_array_equal(np.load(copy.codes(unit, split)), codes)
        assert set(sharded[split]) - set(records[split]) == {"ray_data_actors"}
        assert sharded[split]["ray_data_actors"] == 2 and sharded[split]["rule"] == records[split]["rule"] == "probed"
        for key in ("tokens", "check_tokens", "agreement"):
            assert sharded[split][key] == pytest.approx(records[split][key]), key
    # one job encoded the three splits: its figures are shared out by tokens, so each split's rates are the job's
    tokens = {split: record["tokens"] for split, record in records.items()}
    for key in ("unsure_fraction", "verify_passes_per_token"):
        whole = sum(records[s][key] * tokens[s] for s in records) / sum(tokens.values())
        assert all(sharded[split][key] == pytest.approx(whole) for split in records), key
    assert copy.read_row(unit).metrics["encode_info"] == sharded["test"]  # scored from the stage's codes


def test_a_batch_mixing_two_splits_gives_each_image_its_own_splits_index_and_rule(trained, tmp_path):
    """The codes stage's actor (CodeEncoder, called here without Ray) on one batch holding the ends of two splits:
    pull-back's exact rule (probes=0) takes its metric tensors from fit tokens ("borrowed") above
    exact_encode_limit tokens of a SPLIT, so the larger split's rows are encoded as that whole split is, though the
    batch itself is small; each row as its own split's in-process encode codes it."""
    from geovq.distributed.data import CodeEncoder
    from geovq.latents import LatentSet
    from geovq.quantize import make_quantizer
    from geovq.stages.common import GridDecoder
    from geovq.training.checkpoint import load_model

    run, _, spec, _ = trained
    checkpoint = run.vae(spec) / "model.pt"
    train = LatentSet.load(run.latents(spec, "train"))
    val, test = (LatentSet.load(run.latents(spec, split)) for split in ("val", "test"))
    limit = (val.n_tokens + test.n_tokens) // 2  # val (180 images) below it, test (359) above
    q = make_quantizer("pullback", 16, seed=0, decoder=GridDecoder(load_model(checkpoint, "vae")), max_tokens=2000,
                       probes=0, exact_encode_limit=limit).fit(train)
    q.save(tmp_path / "quantizer.npz")
    assert (q.rule_for(val), q.rule_for(test)) == ("exact", "borrowed")
    picked = np.arange(30, 40)  # test images where the two rules part (image 33, on this VAE)
    want = np.concatenate([q.encode(val)[-5:], q.encode(test)[picked]])
    rows = [(val, np.arange(val.n_images - 5, val.n_images)), (test, picked)]
    batch = {"index": np.arange(15), "id": np.concatenate([ids for _, ids in rows]),
             "split_images": np.concatenate([np.full(len(ids), s.n_images) for s, ids in rows]),
             "mu": np.concatenate([s.mu[ids].reshape(len(ids), -1) for s, ids in rows]),
             "logvar": np.concatenate([s.logvar[ids].reshape(len(ids), -1) for s, ids in rows])}
    encoder = CodeEncoder(str(checkpoint), str(tmp_path / "quantizer.npz"), val.layout.as_dict(), 0.0, 1)
    np.testing.assert_array_equal(encoder(batch)["codes"], want)
    alone = test.subset(picked)  # the same 10 rows as a split of their own: the exact rule, other codes
    assert q.rule_for(alone) == "exact" and (q.encode(alone) != want[5:]).any()
