"""The main job end to end on real local Ray: `geovq sweep digits --quick` (all methods), then resume."""

import csv
import json
import logging
import math
import re
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from geovq.cli import app
from geovq.metrics.codebook import code_histogram
from geovq.stages.units import Unit
from geovq.training.checkpoint import load_model

from sweeps import QUICK

runner = CliRunner()

# The pinned results of QUICK: (method, K) -> (test PSNR dB, usage perplexity, bits per image), for each set of CPU
# kernels torch dispatches to (`torch.backends.cpu.get_cpu_capability()`). The same code drifts across them (other
# SIMD kernels, amplified by 20 epochs of training): the AVX2 numbers, measured before the stages were reshaped
# (commit 10acae2), moved by up to 0.054 dB PSNR and 6% usage perplexity on another AVX2 machine; on an AVX-512
# machine (a 2-core AMD EPYC, 2026-12-07) the run is bit for bit the same from run to run and across the restructured
# sweep path (issue 25), but geodesic's usage at K = 16 sits 13% from the AVX2 pin. A change that moves them on
# purpose re-pins them and says why in its commit message. The tolerances sit above the drift within a kernel set,
# so a regression smaller than them goes unseen here (the closed-form and invariant tests of each stage are the
# finer net).
PSNR_TOLERANCE_DB, USAGE_TOLERANCE = 0.1, 0.1
PINNED_BY_KERNELS = {
    "AVX2": {
        ("geodesic", 16): (18.0760, 11.9276, 64),
        ("gq", 16): (18.2649, 8.9189, 64),
        ("kmeans", 16): (18.1004, 14.5557, 64),
        ("vqvae", 16): (23.3626, 14.7898, 64),
        ("wasserstein", 16): (18.0497, 14.8828, 64),
        ("geodesic", 64): (18.1519, 49.2987, 96),
        ("gq", 64): (18.3138, 21.8890, 96),
        ("kmeans", 64): (18.1782, 56.9974, 96),
        ("vqvae", 64): (25.2427, 56.5787, 96),
        ("wasserstein", 64): (18.1469, 57.6817, 96),
    },
    "AVX512": {
        ("geodesic", 16): (18.0925, 13.5306, 64),
        ("gq", 16): (18.2917, 9.0123, 64),
        ("kmeans", 16): (18.1221, 14.7893, 64),
        ("vqvae", 16): (23.3478, 14.8160, 64),
        ("wasserstein", 16): (18.0997, 14.8953, 64),
        ("geodesic", 64): (18.1937, 50.8430, 96),
        ("gq", 64): (18.4316, 22.8350, 96),
        ("kmeans", 64): (18.2176, 57.3744, 96),
        ("vqvae", 64): (25.3268, 57.4606, 96),
        ("wasserstein", 64): (18.1897, 57.5688, 96),
    },
}


def pinned() -> dict:
    """This machine's pins: those of its kernel set, else the AVX2 ones (the most common)."""
    import torch

    return PINNED_BY_KERNELS.get(torch.backends.cpu.get_cpu_capability(), PINNED_BY_KERNELS["AVX2"])


def rows_of(run):
    return json.loads((run / "results.json").read_text())


def test_pinned_quick_results(quick_run):
    rows, pins = rows_of(quick_run), pinned()
    assert {(r["method"], r["K"]) for r in rows} == set(pins)
    for r in rows:
        psnr, usage, bits = pins[r["method"], r["K"]]
        assert r["psnr"] == pytest.approx(psnr, abs=PSNR_TOLERANCE_DB), r["method"]
        assert r["usage_perplexity"] == pytest.approx(usage, rel=USAGE_TOLERANCE), r["method"]
        assert r["bits_per_image"] == bits


def test_results_rows_at_matched_rate(quick_run):
    rows = rows_of(quick_run)
    cfg = yaml.safe_load((quick_run / "config.yaml").read_text())
    methods = set(cfg["methods"])
    assert {r["method"] for r in rows} == methods
    for k in cfg["codebook_sizes"]:
        at_k = [r for r in rows if r["K"] == k]
        assert {r["method"] for r in at_k} == methods
        assert {r["bits_per_image"] for r in at_k} == {16 * math.log2(k)}  # 4×4 grid, d = C: 16 tokens
        for r in at_k:
            assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
            assert r["bpp"] == pytest.approx(r["bits_per_image"] / 64)  # digits are natively 8×8
            if r["lpips"] is None:
                assert r["lpips_reason"]


def test_every_split_is_encoded_and_saved_codes_reproduce_usage(quick_run):
    from geovq.data import load_dataset

    digits = load_dataset("digits")  # 70/10/20 of 1,797 images: under the quick cap of 2,000
    assert len(digits.train) == 1258
    for r in rows_of(quick_run):
        unit_dir = quick_run / r["codes_path"].rsplit("/", 1)[0]
        unit = Unit.from_dict(json.loads((unit_dir / "unit.json").read_text()))
        assert unit.key == unit_dir.name == r["unit"]  # the directory is the unit's identity
        assert (unit.method, unit.n_codes, unit.seed) == (r["method"], r["K"], r["seed"])
        sizes = {split: len(getattr(digits, split)) for split in ("train", "val", "test")}
        encode = json.loads((unit_dir / "encode.json").read_text())
        for split, n in sizes.items():
            codes = np.load(unit_dir / f"codes_{split}.npy")
            assert codes.shape == (n, r["tokens_per_image"]) and codes.min() >= 0 and codes.max() < r["K"]
            assert encode[split]["seconds"] >= 0
        codes = np.load(quick_run / r["codes_path"])
        counts = np.bincount(codes.ravel(), minlength=r["K"])
        np.testing.assert_array_equal(counts, code_histogram(codes, r["K"]))
        p = counts[counts > 0] / counts.sum()
        assert r["usage_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
        assert r["dead_codes"] == int((counts == 0).sum())


def test_run_directory_layout_csv_report_and_checkpoints(quick_run):
    with open(quick_run / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    rows = rows_of(quick_run)
    assert len(csv_rows) == len(rows)
    assert float(csv_rows[0]["psnr"]) == pytest.approx(rows[0]["psnr"])
    report = (quick_run / "report.md").read_text()
    assert "## 64 bits per image" in report and "## 96 bits per image" in report
    for figure in ("rate_distortion.png", "compare_64bits.png", "compare_96bits.png"):
        assert (quick_run / "figures" / figure).stat().st_size > 1000
    (vae_dir,) = (quick_run / "vae").iterdir()  # one plain VAE serves every post-hoc unit at every K
    assert vae_dir.name.startswith("plain-seed0-")
    assert {r["vae_key"] for r in rows if r["vae"]} == {vae_dir.name}
    assert (vae_dir / "kl_histogram.png").stat().st_size > 1000
    log = (quick_run / "sweep.log").read_text().splitlines()
    assert sum("finished" in line for line in log) >= len(rows)
    # every training's epochs and every prior's validations, named by their directories: the progress that a
    # sweep redirected to a file (no bars) keeps
    for name in [vae_dir.name] + [r["unit"] for r in rows if r["method"] == "vqvae"]:
        epochs = [int(re.search(r" epoch (\d+)/20: val loss ", line).group(1)) for line in log
                  if line.endswith(f"({name})") and " epoch " in line]
        assert epochs == list(range(1, 21)), name
    for unit in {r["unit"] for r in rows}:
        assert any("prior transformer step " in line and line.endswith(f"({unit})") for line in log), unit
    vae = load_model(vae_dir / "model.pt", "vae")
    assert not vae.training
    assert not list(quick_run.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_tensorboard_events_parse_back(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (vae_dir,) = (quick_run / "vae").iterdir()
    acc = EventAccumulator(str(vae_dir / "tb")).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/kl", "val/loss"} <= set(tags["scalars"])
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == 20 and all(math.isfinite(v) for v in val)  # one per quick epoch
    assert val[-1] < val[0]  # it learned something
    assert tags["images"]


def test_tensorboard_shows_geovqs_runs_and_an_hparams_view_of_the_rows(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = sorted(p.relative_to(quick_run).parts[0] for p in quick_run.rglob("events.out.tfevents.*"))
    assert set(events) == {"vae", "units", "tb"}  # no Tune logger's run under ray/
    rows = json.loads((quick_run / "results.json").read_text())
    runs = sorted((quick_run / "tb" / "rows").iterdir())
    assert [r.name for r in runs] == sorted(r["unit"] for r in rows)  # one run per row, named by its unit
    by_unit = {r["unit"]: r for r in rows}
    for run in runs:
        acc = EventAccumulator(str(run)).Reload()
        row = by_unit[run.name]
        assert acc.Scalars("hparam/psnr")[0].value == pytest.approx(row["psnr"], rel=1e-6)
        assert acc.Scalars("hparam/bits_per_image")[0].value == row["bits_per_image"]
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert (start.hparams["method"].string_value, start.hparams["K"].number_value) == (row["method"], row["K"])


@pytest.fixture
def own_quick_run(quick_run, tmp_path):
    """A copy of the main job's run, for a test that runs the sweep in it again: other tests (pytest-xdist's
    other worker among them) read the main job's own run meanwhile."""
    return shutil.copytree(quick_run, tmp_path / "digits-quick")


def test_rerun_resumes_only_unfinished_units(own_quick_run):
    rows = sorted((own_quick_run / "units").glob("*/row.json"))
    victim = next(p for p in rows if p.parent.name.startswith("kmeans-plain-K16"))
    kept = {p: p.stat().st_mtime_ns for p in rows if p != victim}
    (vae_dir,) = (own_quick_run / "vae").iterdir()
    vae_mtime = (vae_dir / "model.pt").stat().st_mtime_ns
    codes_mtime = (victim.parent / "codes_test.npy").stat().st_mtime_ns
    victim.unlink()  # as if the sweep had been interrupted while scoring this unit
    result = runner.invoke(app, QUICK + ["--out", str(own_quick_run)])
    assert result.exit_code == 0, result.output
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (vae_dir / "model.pt").stat().st_mtime_ns == vae_mtime
    assert (victim.parent / "codes_test.npy").stat().st_mtime_ns == codes_mtime  # only the score was redone
    assert "resuming" in (own_quick_run / "sweep.log").read_text()
    # the command's log handlers end with it: what this process logs afterwards is not the run's
    logging.getLogger("geovq.training").info("after the sweep")
    assert "after the sweep" not in (own_quick_run / "sweep.log").read_text()


def test_rerun_with_another_model_config_is_refused_naming_the_option(quick_run):
    result = runner.invoke(app, QUICK + ["--epochs", "3", "--out", str(quick_run)])
    assert result.exit_code == 2 and "different configuration (--epochs 20 -> 3)" in result.output


def test_a_rerun_of_other_methods_keeps_the_settings_of_the_methods_it_leaves_out(own_quick_run):
    """--geodesic-* is refused without geodesic among --methods, so a k-means re-run cannot repeat them: they
    neither block it nor get reset to their defaults in the run's configuration."""
    before = (own_quick_run / "config.yaml").read_text()
    result = runner.invoke(app, ["sweep", "digits", "--quick", "--vae", "plain", "--methods", "kmeans", "--prior",
                                 "transformer", "--out", str(own_quick_run)])
    assert result.exit_code == 0, result.output
    assert "0 jobs to run" in result.output  # every k-means unit was finished: nothing ran again
    assert (own_quick_run / "config.yaml").read_text() == before
    assert yaml.safe_load(before)["method_params"]["geodesic"] == {"max_landmarks": 5000, "paths": "graph"}


def test_run_directory_of_an_older_layout_is_refused(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "methods": ["kmeans"]}))
    result = runner.invoke(app, QUICK + ["--out", str(old)])
    assert result.exit_code == 2, result.output
    assert "written by an older geovq (run layout 1; this geovq reads layout 2)" in result.output
    assert "Traceback" not in result.output


def test_every_row_carries_its_prior_rate_and_sample_metrics(quick_run):
    for r in rows_of(quick_run):
        unit_dir = quick_run / r["codes_path"].rsplit("/", 1)[0]
        prior = json.loads((unit_dir / "prior-transformer" / "prior.json").read_text())
        assert r["prior"] == "transformer" and r["prior_bits_per_image"] == prior["prior_bits_per_image"]
        assert r["prior_bits_per_image"] == pytest.approx(16 * r["prior_bits_per_token"])  # 16 tokens per image
        assert 0 < r["prior_bits_per_image"] < r["unigram_bits_per_image"] + 1  # a prior learns the codes' order
        assert math.isfinite(r["domain_fid"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["sample_n"] == 2000 and r["classifier_test_accuracy"] > 0.9
        assert r["fid"] is None and "FID/KID not computed" in r["fid_reason"]  # no Inception weights here


def test_sample_command_writes_samples_and_refuses_bad_input(quick_run, tmp_path):
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(quick_run), "--method", "vqvae", "--k", "16", "-n", "64",
                                 "--top-p", "0.9", "--no-metrics", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as f:
        assert f["codes"].shape == (64, 16) and f["images"].shape == (64, 1, 16, 16)
    assert (out / "samples.png").stat().st_size > 1000
    for args, message in [(["--method", "magic", "-n", "5"], "no 'magic' unit"), (["--method", "vqvae", "-n", "0"], "n=0"),
                          (["--method", "vqvae", "-n", "5", "--temperature", "0"], "temperature 0.0 must be > 0"),
                          (["--method", "vqvae", "-n", "5", "--top-p", "1.5"], "top-p 1.5 must lie in (0, 1]"),
                          (["--method", "vqvae", "-n", "5"], "choose one of")]:
        result = runner.invoke(app, ["sample", str(quick_run), *args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, result.output
    empty = tmp_path / "empty"
    (empty / "units").mkdir(parents=True)
    (empty / "config.yaml").write_text((quick_run / "config.yaml").read_text())
    result = runner.invoke(app, ["sample", str(empty), "--method", "vqvae", "-n", "5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "holds no unit with codes yet" in result.output
