"""The main job end to end on real local Ray: `geovq sweep digits --quick` (all methods), then resume."""

import csv
import json
import math

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from geovq.cli import app
from geovq.metrics.codebook import code_histogram
from geovq.training.checkpoint import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "digits-quick"
    result = runner.invoke(app, ["sweep", "digits", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_results_rows_at_matched_rate(quick_run):
    rows = json.loads((quick_run / "results.json").read_text())
    cfg = yaml.safe_load((quick_run / "config.yaml").read_text())
    methods = set(cfg["methods"])
    assert {"kmeans", "vqvae"} <= methods
    assert {r["method"] for r in rows} == methods
    for k in cfg["codebook_sizes"]:
        at_k = [r for r in rows if r["K"] == k]
        assert {r["method"] for r in at_k} == methods
        bits = {r["bits_per_image"] for r in at_k}
        assert bits == {16 * math.log2(k)}  # 4×4 grid, d = C: 16 tokens per image
        for r in at_k:
            assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
            assert r["bpp"] == pytest.approx(r["bits_per_image"] / 64)  # digits are natively 8×8
            for key in ("dataset", "method", "K", "tokens_per_image", "bits_per_image", "bpp", "seed", "psnr",
                        "ssim", "lpips", "mse", "usage_perplexity", "dead_codes"):
                assert key in r
            if r["lpips"] is None:
                assert r["lpips_reason"]


def test_saved_codes_reproduce_rate_usage_and_dead_codes(quick_run):
    for r in json.loads((quick_run / "results.json").read_text()):
        codes = np.load(quick_run / r["codes_path"])
        assert codes.shape == (r["n_test"], r["tokens_per_image"])
        assert r["bits_per_image"] == codes.shape[1] * math.log2(r["K"])
        counts = np.bincount(codes.ravel(), minlength=r["K"])
        np.testing.assert_array_equal(counts, code_histogram(codes, r["K"]))
        p = counts[counts > 0] / counts.sum()
        assert r["usage_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
        assert r["dead_codes"] == int((counts == 0).sum())


def test_run_directory_layout_csv_report_and_checkpoints(quick_run):
    with open(quick_run / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    rows = json.loads((quick_run / "results.json").read_text())
    assert len(csv_rows) == len(rows)
    assert float(csv_rows[0]["psnr"]) == pytest.approx(rows[0]["psnr"])
    report = (quick_run / "report.md").read_text()
    assert "## 64 bits per image" in report and "## 96 bits per image" in report
    for figure in ("rate_distortion.png", "compare_64bits.png", "compare_96bits.png"):
        assert (quick_run / "figures" / figure).stat().st_size > 1000
    assert (quick_run / "vae" / "plain" / "seed0" / "kl_histogram.png").stat().st_size > 1000
    assert (quick_run / "sweep.log").read_text().count("finished") >= len(rows)
    vae = load_model(quick_run / "vae" / "plain" / "seed0" / "model.pt", "vae")
    assert not vae.training
    assert not list(quick_run.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_tensorboard_events_parse_back(quick_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(quick_run / "vae" / "plain" / "seed0" / "tb")).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/kl", "val/loss"} <= set(tags["scalars"])
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == 20 and all(math.isfinite(v) for v in val)  # one per quick epoch
    assert val[-1] < val[0]  # it learned something
    assert tags["images"]


def test_rerun_resumes_only_unfinished_units(quick_run):
    rows = sorted((quick_run / "units").glob("*/row.json"))
    victim = next(p for p in rows if p.parent.name.startswith("kmeans-plain-K16"))
    kept = {p: p.stat().st_mtime_ns for p in rows if p != victim}
    vae_mtime = (quick_run / "vae" / "plain" / "seed0" / "model.pt").stat().st_mtime_ns
    victim.unlink()  # as if the sweep had been interrupted during this unit
    result = runner.invoke(app, ["sweep", "digits", "--quick", "--out", str(quick_run)])
    assert result.exit_code == 0, result.output
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (quick_run / "vae" / "plain" / "seed0" / "model.pt").stat().st_mtime_ns == vae_mtime
    assert "resuming" in (quick_run / "sweep.log").read_text()


def test_rerun_with_another_model_config_is_refused(quick_run):
    result = runner.invoke(app, ["sweep", "digits", "--quick", "--epochs", "3", "--out", str(quick_run)])
    assert result.exit_code == 2 and "different configuration (train)" in result.output
