"""Typed units and separable stages: identities, each stage on its own, the edge-length stage feeding the
geodesic fit, and a quantizer defined outside geovq run through a sweep on real local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from geovq.config import resolve_config
from geovq.errors import GeovqError
from geovq.stages.common import no_progress
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, VaeSpec, plan_units, work_from_dict

CPU = torch.device("cpu")


def test_unit_identity_is_a_slug_and_a_hash_of_its_content():
    vae = VaeSpec("tdc", 1, target_bits=4.0, token_dim=2, grouping="contiguous")
    unit = Unit("geodesic", 16, 1, 2, "contiguous", vae, params=(("k", 25),), quantizer="geovq.quantize.geodesic:G")
    assert unit.key.startswith("geodesic-tdc-K16-d2-seed1-") and len(unit.key.rsplit("-", 1)[1]) == 8
    assert vae.key.startswith("tdc-T4-d2-seed1-")
    again = work_from_dict(json.loads(json.dumps(unit.to_dict())))  # as a Tune trial receives it
    assert again == unit and again.key == unit.key and isinstance(again.vae, VaeSpec)
    assert replace(unit, params=(("k", 10),)).key != unit.key  # hyperparameters are part of the identity
    assert replace(unit, vae=replace(vae, overrides=(("train.lr", 1e-3),))).key != unit.key
    assert replace(unit, quantizer="elsewhere:G").key == unit.key  # where the code lives is not
    assert VaeSpec.from_dict(vae.to_dict()) == vae


def test_planned_units_share_vaes_by_configuration():
    cfg = resolve_config("digits", (1, 16, 16), ["vqvae", "kmeans", "gq"], [16, 64], 2, 1, False,
                         vaes=["plain", "tdc"], method_params={"gq": {"beta": 0.5}})
    units = plan_units(cfg)
    assert len(units) == 2 * 2 * (1 + 2 * 2)
    assert len({u.key for u in units}) == len(units)
    vaes = {u.vae for u in units if u.vae}
    assert len(vaes) == 2 * (1 + 2)  # per seed: one plain VAE for every K, one TDC VAE per K
    gq = next(u for u in units if u.method == "gq")
    assert dict(gq.params) == {"beta": 0.5} and gq.quantizer == "geovq.quantize.gq:GaussianQuant"
    assert all(u.vae is None and u.quantizer is None for u in units if u.method == "vqvae")


def test_config_imports_no_torch():
    code = "import sys, geovq.config, geovq.stages.units; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_or_invalid_hyperparameters_are_refused_before_anything_runs():
    with pytest.raises(GeovqError, match="gq has no hyperparameter 'betta'; valid: beta"):
        tiny_config(["gq"], method_params={"gq": {"betta": 1.0}})
    with pytest.raises(GeovqError, match="gq beta=-1.0 must be >= 0"):
        tiny_config(["gq"], method_params={"gq": {"beta": -1.0}})


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A run directory with one finished tiny VAE (train -> extract -> score, called as plain functions)."""
    from geovq.stages.common import load_splits
    from geovq.stages.run import run_vae

    cfg = tiny_config(["kmeans", "geodesic"], method_params={"geodesic": {"max_landmarks": 400, "k": 5,
                                                                          "quadrature": "midpoint"}})
    run = RunDir(tmp_path_factory.mktemp("stages"))
    data = load_splits(cfg)
    spec = VaeSpec("plain", 0)
    ceiling = run_vae(run, cfg, spec, CPU, no_progress, data)
    return run, cfg, data, spec, ceiling


def test_each_stage_runs_alone_and_writes_its_files(vae_run):
    from geovq.stages.encode import encode_stage
    from geovq.stages.fit import fit_stage
    from geovq.stages.run import run_unit

    run, cfg, data, spec, ceiling = vae_run
    assert {p.name for p in run.vae(spec).iterdir()} >= {"model.pt", "latents_train.npz", "latents_val.npz",
                                                         "latents_test.npz", "ceiling.json", "spec.json"}
    assert ceiling["vae_key"] == spec.key and np.isfinite(ceiling["psnr"])
    unit = next(u for u in plan_units(cfg) if u.method == "kmeans")
    quantizer = fit_stage(run, cfg, unit, CPU)  # a stage on its own: needs only the VAE's files
    assert (run.unit(unit) / "quantizer.npz").exists() and not run.codes(unit, "test").exists()
    info = encode_stage(run, unit, quantizer)
    assert set(info) == {"train", "val", "test"}
    assert np.load(run.codes(unit, "val")).shape == (len(data.val), 16)
    row = run_unit(run, cfg, unit, CPU, no_progress, data)  # the composite resumes after encode: it only scores
    assert row.unit == unit.key and row.metrics["encode_info"] == info["test"]
    refit = fit_stage(run, cfg, unit, CPU)  # a second call loads the saved quantizer
    np.testing.assert_array_equal(refit.codebook_, quantizer.codebook_)


def test_the_edge_length_stage_gives_the_geodesic_fit_its_in_process_numbers(vae_run):
    """The geodesic fit consumes lengths measured by the edge stage (as Ray Data workers will, one shard
    each), and gets the graph, codebook and codes it gets in process."""
    from geovq.stages.edges import edge_lengths_stage
    from geovq.stages.fit import load_latents, load_vae, runtime_options
    from geovq.quantize import get_quantizer_class

    run, cfg, data, spec, _ = vae_run
    unit = next(u for u in plan_units(cfg) if u.method == "geodesic")
    # a third of the training images and 40 test images: the comparison holds on any set, and each fit and
    # in-context encode costs seconds
    train = load_latents(run, unit, "train")
    train, test = train.subset(np.arange(train.n_images // 3)), load_latents(run, unit, "test").subset(np.arange(40))
    qcls = get_quantizer_class("geodesic")
    params = dict(unit.params)
    in_process = qcls(16, **params, **runtime_options(qcls, load_vae(run, unit, CPU))).fit(train)
    calls = []

    def sharded(tokens, edges):  # two shards, each measured by the stage from the checkpoint alone
        calls.append(len(edges))
        halves = np.array_split(np.arange(len(edges)), 2)
        return np.concatenate([edge_lengths_stage(run.vae(spec) / "model.pt", train, tokens, edges[h],
                                                  "midpoint", CPU) for h in halves])

    delegated = qcls(16, **params, **runtime_options(qcls, load_vae(run, unit, CPU))).fit(train, edge_lengths=sharded)
    assert calls == [in_process.fit_info_["graph"]["undirected_edges"]]
    assert delegated.fit_info_["median_edge_length"] == pytest.approx(in_process.fit_info_["median_edge_length"],
                                                                      rel=1e-6)
    np.testing.assert_allclose(delegated.landmark_distance_, in_process.landmark_distance_, rtol=1e-5)
    np.testing.assert_array_equal(delegated.codebook_, in_process.codebook_)
    np.testing.assert_array_equal(delegated.encode(test), in_process.encode(test))


def test_a_quantizer_defined_outside_geovq_runs_through_a_sweep_on_local_ray(plugin_sweep):
    import geovq_toy  # tests/plugins: registers "toy-q" here; Ray workers import it by the units' path

    from geovq.quantize import Quantizer
    from geovq.stages.fit import load_latents

    run, cfg, _ = plugin_sweep  # toy-q beside crash-q, which killed its own worker (test_failures)
    (unit,) = [u for u in plan_units(cfg) if u.method == "toy-q"]
    assert unit.quantizer == "geovq_toy:RandomTokens" and unit.key.startswith("toy-q-plain-K16-d4-seed0-")
    row = json.loads((run.unit(unit) / "row.json").read_text())
    assert row["method"] == "toy-q" and row["params"] == {"spread": 0.5}
    q = Quantizer.load(run.unit(unit) / "quantizer.npz")
    assert isinstance(q, geovq_toy.RandomTokens) and q.spread == 0.5
    train = load_latents(run, unit, "train")
    chosen = np.random.default_rng(0).choice(train.n_tokens, 16, replace=False)  # the toy's own rule
    np.testing.assert_allclose(q.codebook_, 0.5 * train.token_mu[chosen], rtol=1e-6)
    test = load_latents(run, unit, "test")
    nearest = ((test.token_mu[:, None] - q.codebook_[None]) ** 2).sum(-1).argmin(1)
    assert (np.load(run.codes(unit, "test")).ravel() == nearest).mean() > 0.99  # float32 ties aside
    assert Path(run.root / "ray").exists()  # it really went through Tune
