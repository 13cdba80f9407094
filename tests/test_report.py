"""Reports: tables and CIs, figures drawn from their data, merged runs, the HTML page, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from geovq.cli import app
from geovq.report.figures import _ceiling_lines, _stat
from geovq.report.tables import markdown_report, mean_ci


def test_mean_ci_matches_student_t_closed_form():
    # n = 3: Student t with 2 d.o.f. has the closed-form quantile (2p − 1) / sqrt(2p(1 − p)); sd of (1, 2, 3) = 1
    p = 0.975
    t = (2 * p - 1) / (2 * p * (1 - p)) ** 0.5
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(t / 3**0.5, rel=1e-10)
    assert mean_ci([5.0]) == (5.0, None)


def row(method, vae, k, seed, psnr, finetuned=False):
    return {"method": method, "vae": vae, "K": k, "bits_per_image": 16 * (k.bit_length() - 1), "bpp": 1.0,
            "seed": seed, "psnr": psnr, "ssim": 0.5, "lpips": None, "lpips_reason": "no weights", "mse": 0.01,
            "usage_perplexity": 10.0, "dead_codes": 0, "finetuned": finetuned}


def test_markdown_groups_by_bits_and_summarises_seeds():
    rows = [row("kmeans", "plain", 16, s, p) for s, p in enumerate([20.0, 21.0, 22.0])]
    rows += [row("kmeans", "plain", 16, 0, 25.0, finetuned=True), row("vqvae", None, 64, 0, 30.0)]
    ceilings = [{"vae": "plain", "tdc_target_bits": None, "psnr": 30.0, "mean_token_kl_bits": 2.0}]
    text = markdown_report(rows, ceilings, yaml.safe_dump({"dataset": "digits"}), 5, 5)
    assert text.startswith("# geovq results\n")  # every planned unit finished: not partial
    assert text.index("## 64 bits per image") < text.index("## 96 bits per image")
    kmeans_line = next(l for l in text.splitlines() if l.startswith("| kmeans | plain | VAE's |"))
    assert "| 3 | 21.00 ± 2.48 |" in kmeans_line  # 4.3027 * 1 / sqrt(3)
    assert any(l.startswith("| kmeans | plain | fine-tuned | 16 |") and "25.00" in l for l in text.splitlines())
    assert "| vqvae | — | end-to-end | 64 |" in text
    assert "LPIPS n/a: no weights" in text


def test_psnr_against_the_vqvae_is_paired_by_seed_and_matches_scipys_paired_t_interval():
    from scipy import stats

    kmeans = {0: 20.0, 1: 21.0, 2: 22.0, 3: 30.0}  # seed 3 has no VQ-VAE: it cannot be paired
    vqvae = {2: 21.0, 0: 19.5, 1: 21.5}  # another order: pairs are made by seed, not by position
    rows = [row("kmeans", "plain", 16, s, p) for s, p in kmeans.items()]
    rows += [row("vqvae", None, 16, s, p) for s, p in vqvae.items()]
    rows.append(dict(row("gq", "plain", 4, 0, 18.0), bits_per_image=64))  # the same rate at another K: no baseline
    text = markdown_report(rows, [], yaml.safe_dump({"dataset": "digits"}), 8, 8)
    header = next(l for l in text.splitlines() if l.startswith("| method |")).split(" | ")
    cells = {l.split(" | ")[0][2:].strip("*"): l.split(" | ") for l in text.splitlines() if l.startswith("| ")}
    delta = header.index("ΔPSNR vs VQ-VAE (same K)")
    seeds = sorted(vqvae)
    test = stats.ttest_rel([kmeans[s] for s in seeds], [vqvae[s] for s in seeds])
    low, high = test.confidence_interval(0.95)
    assert cells["kmeans"][delta] == f"{(low + high) / 2:.2f} ± {(high - low) / 2:.2f}"  # 0.33 ± 1.90
    assert cells["vqvae"][delta] == "—" and cells["gq"][delta] == "n/a"


def test_psnr_against_the_best_end_to_end_line_of_the_rate_names_it_and_pairs_by_seed():
    from scipy import stats

    kmeans = {0: 22.0, 1: 23.0, 2: 25.0}
    fsq = {0: 21.0, 1: 22.5, 2: 22.0}  # mean 21.83: the best end-to-end line at 64 bits
    rows = [row("kmeans", "plain", 16, s, p) for s, p in kmeans.items()]
    rows += [row("fsq", None, 16, s, p) for s, p in fsq.items()]
    rows += [row("vqvae", None, 16, s, p) for s, p in {0: 21.0, 1: 21.0, 2: 22.0}.items()]  # mean 21.33
    rows += [row("rvq", None, 16, 0, 21.9)]  # one seed of a higher single value: lines rank by their mean
    rows += [row("rvq", None, 16, 1, 21.0)]  # mean 21.45
    rows.append(row("gq", "plain", 4, 0, 18.0))  # 32 bits: no end-to-end line at this rate
    text = markdown_report(rows, [], yaml.safe_dump({"dataset": "digits"}), 8, 8)
    header = next(l for l in text.splitlines() if l.startswith("| method |")).split(" | ")
    cells = {l.split(" | ")[0][2:].strip("*"): l.split(" | ") for l in text.splitlines() if l.startswith("| ")}
    best = header.index("ΔPSNR vs best end-to-end (paired by seed)")
    test = stats.ttest_rel([kmeans[s] for s in range(3)], [fsq[s] for s in range(3)])
    low, high = test.confidence_interval(0.95)
    assert cells["kmeans"][best] == f"{(low + high) / 2:.2f} ± {(high - low) / 2:.2f} vs fsq K=16"
    assert cells["fsq"][best] == "— (fsq K=16)"
    assert cells["vqvae"][best].endswith("vs fsq K=16") and cells["vqvae"][best].startswith("-0.50 ± ")
    assert cells["gq"][best] == "n/a"
    assert cells["fsq"][header.index("ΔPSNR vs VQ-VAE (same K)")].startswith("0.50 ± ")  # still given


def test_figure_statistics_put_usage_on_a_fraction_of_k_and_one_ceiling_per_variant():
    rows = [dict(row("kmeans", "plain", 16, s, p), usage_perplexity=u) for s, p, u in [(0, 20.0, 8.0), (1, 22.0, 12.0)]]
    mean, half = _stat(rows, "usage_perplexity")
    assert mean == pytest.approx(10.0 / 16)
    assert half == pytest.approx(mean_ci([8.0, 12.0])[1] / 16)
    assert _stat(rows[:1], "psnr") == (20.0, 0.0)  # one seed: no interval
    ceilings = [{"vae": "plain", "tdc_target_bits": None, "psnr": 20.0}, {"vae": "plain", "tdc_target_bits": None,
                "psnr": 22.0}, {"vae": "tdc", "tdc_target_bits": 8.0, "psnr": 28.0}]
    assert _ceiling_lines(ceilings) == {"continuous VAE (plain)": (21.0, "--"),
                                        "continuous VAE (tdc, T=8)": (28.0, ":")}


def test_a_method_keeps_its_hue_in_every_figure_with_a_shade_per_vae():
    """tab20's pairs: one hue per method, dark on the plain VAE and light on TDC, the fine-tuned decoder dashed in its
    line's colour; the VQ-VAE's line between a method's two VAEs shifts nothing. Every figure styles its lines
    from all of the report's rows, so that a figure showing fewer lines colours them alike."""
    import matplotlib.pyplot as plt

    from geovq.report.figures import line_styles

    tab20 = plt.get_cmap("tab20").colors
    rows = [row(method, vae, 16, 0, 20.0, finetuned) for method, vae, finetuned in [
        ("vqvae", None, False), ("kmeans", "plain", False), ("kmeans", "tdc", False), ("kmeans", "plain", True),
        ("gq", "tdc", True), ("gq", "plain", False), ("gq", "tdc", False)]]
    styles = line_styles(rows)
    # methods take hues in line order (gq, kmeans, vqvae): pairs 0, 1 and 2
    assert styles == {"gq": {"color": tab20[0]}, "gq (tdc)": {"color": tab20[1]},
                      "gq (tdc) fine-tuned": {"color": tab20[1], "ls": "--", "mfc": "none"},
                      "kmeans": {"color": tab20[2]}, "kmeans fine-tuned": {"color": tab20[2], "ls": "--", "mfc": "none"},
                      "kmeans (tdc)": {"color": tab20[3]}, "vqvae": {"color": tab20[4]}}
    # the hues follow the methods of the rows given: a report without gq starts at kmeans
    assert line_styles([r for r in rows if r["method"] != "gq"])["vqvae"] == {"color": tab20[2]}


def test_the_prior_panel_appears_only_with_a_prior_on_every_seed_of_some_line(tmp_path):
    """PSNR against the prior's bits is a mean over seeds on both axes: a line with a prior on one seed of two has no
    point there, and a run with no such point draws no empty panel."""
    from geovq.report.figures import rate_distortion_figure

    (tmp_path / "figures").mkdir()
    rows = [dict(row("vqvae", None, 16, s, 20.0), prior_bits_per_image=50.0 if s == 0 else None) for s in (0, 1)]
    rows += [row("kmeans", "plain", 16, s, 19.0) for s in (0, 1)]
    assert rate_distortion_figure(tmp_path, rows, []).data["panels"] == ["psnr", "ssim", "usage_perplexity"]
    rows[1]["prior_bits_per_image"] = 52.0
    assert rate_distortion_figure(tmp_path, rows, []).data["panels"][-1] == "psnr_vs_prior_bits"


def test_a_rates_comparison_shows_only_the_ceilings_of_the_vaes_quantized_at_that_rate(tmp_path):
    """TDC trains one VAE per rate (T = log2 K): at 96 bits the T=4 VAE of the 64-bit rows is no ceiling."""
    from geovq.report.figures import compare_figure

    (tmp_path / "figures").mkdir()
    rows = [dict(row(method, vae, k, 0, 20.0 + k / 16), vae_key=key) for method, vae, k, key in [
        ("kmeans", "plain", 16, "plain-0"), ("kmeans", "plain", 64, "plain-0"), ("kmeans", "tdc", 16, "tdc-T4"),
        ("kmeans", "tdc", 64, "tdc-T6"), ("vqvae", None, 64, None)]]
    ceilings = [{"vae": "plain", "vae_key": "plain-0", "tdc_target_bits": None, "psnr": 21.0},
                {"vae": "tdc", "vae_key": "tdc-T4", "tdc_target_bits": 4.0, "psnr": 25.0},
                {"vae": "tdc", "vae_key": "tdc-T6", "tdc_target_bits": 6.0, "psnr": 26.0}]
    shown = {bits: compare_figure(tmp_path, rows, ceilings, bits).data["ceilings"] for bits in (64, 96)}
    assert shown == {64: ["continuous VAE (plain)", "continuous VAE (tdc, T=4)"],
                     96: ["continuous VAE (plain)", "continuous VAE (tdc, T=6)"]}
    assert Image.open(tmp_path / "figures" / "compare_96bits.png").format == "PNG"


def test_the_comparison_draws_the_paired_difference_only_where_the_rate_has_an_end_to_end_line(tmp_path):
    from geovq.report.figures import compare_figure

    (tmp_path / "figures").mkdir()
    rows = [row("kmeans", "plain", 64, s, p) for s, p in enumerate([24.0, 25.0, 26.0])]  # 96 bits
    rows += [row("vqvae", None, 64, s, p) for s, p in enumerate([24.5, 24.0, 25.0])]  # the best end to end
    rows += [row("fsq", None, 64, s, p) for s, p in enumerate([24.0, 24.0, 24.5])]
    rows.append(row("gq", "plain", 16, 0, 20.0))  # 64 bits: no end-to-end line there
    at_96 = compare_figure(tmp_path, rows, [], 96).data
    assert at_96["panels"] == 3 and at_96["baseline"] == "vqvae K=64"
    assert at_96["delta"] == {"kmeans": list(mean_ci([-0.5, 1.0, 1.0])), "fsq": list(mean_ci([-0.5, 0.0, -0.5]))}
    at_64 = compare_figure(tmp_path, rows, [], 64).data
    assert at_64["panels"] == 2 and at_64["delta"] == {}
    assert Image.open(tmp_path / "figures" / "compare_96bits.png").size[0] > \
        Image.open(tmp_path / "figures" / "compare_64bits.png").size[0]  # the third panel widens the picture


# -- reports of real runs ------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def two_runs(quick_run, tmp_path_factory):
    """Two runs of one configuration, as when a sweep is split over machines: a copy of the main job's run
    (every method at K 16 and 64, with priors; the test redraws a figure in it) and a run that adds k-means at
    K = 32 without a prior."""
    root = tmp_path_factory.mktemp("reports")
    shutil.copytree(quick_run, root / "a")
    # run b's VAE has run a's key: b would train it again bit for bit (its k-means row then scores the same), so
    # b starts with a's VAE files, as a sweep resumes. The geodesic settings of run a concern no unit of run b.
    # Its one unit is run by the stage functions, as `geovq sweep digits --quick --vae plain --methods kmeans
    # --codebook-sizes 32 --no-prior` would in its one trial (a sweep's Tune trial costs seconds of imports alone).
    from geovq.config import resolve_config
    from geovq.stages.common import no_progress
    from geovq.stages.rundir import RunDir
    from geovq.stages.run import run_unit
    from geovq.stages.units import plan_units

    shutil.copytree(quick_run / "vae", root / "b" / "vae")
    cfg = resolve_config("digits", (1, 16, 16), ["kmeans"], [32], None, None, True, vaes=["plain"], prior=None)
    run = RunDir(root / "b")
    run.config.write_text(cfg.to_yaml())
    (unit,) = plan_units(cfg)
    run_unit(run, cfg, unit, torch.device("cpu"), no_progress)
    return root / "a", root / "b"


def test_merged_report_figures_html_and_reconstruction_tiles(two_runs, tmp_path):
    from geovq.quantize import Quantizer
    from geovq.report.recon import recon_images
    from geovq.stages.common import load_splits
    from geovq.config import SweepConfig
    from geovq.training.checkpoint import load_model

    out = tmp_path / "merged"
    kl = next((two_runs[0] / "vae").glob("*/kl_histogram.png"))  # drawn when the VAE was scored
    kl.unlink()
    result = runner.invoke(app, ["report", str(two_runs[0]), str(two_runs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    Image.open(kl).verify()  # a missing VAE figure is drawn again from the VAE's test latents
    rows = json.loads((out / "results.json").read_text())
    methods = ["geodesic", "gq", "kmeans", "vqvae", "wasserstein"]
    assert sorted((r["run"], r["method"], r["K"]) for r in rows) == sorted(
        [("a", m, k) for m in methods for k in (16, 64)] + [("b", "kmeans", 32)])
    html = (out / "report.html").read_text()
    sidecars = sorted((out / "figures").glob("*.json"))
    # at 80 bits only run b's k-means row, which has no prior (no samples) and no geodesic diagnostics
    assert {p.stem for p in sidecars} == {"rate_distortion"} | {
        f"{kind}_{bits}bits" for bits in (64, 80, 96) for kind in ("compare", "usage", "recon")} | {
        f"{kind}_{bits}bits" for bits in (64, 96) for kind in ("samples", "geometry")}
    for sidecar in sidecars:
        png = sidecar.with_suffix(".png")
        Image.open(png).verify()  # a valid PNG
        assert f"data-file='{png.name}'" in html  # embedded in the page
    assert html.count("<tr class=best>") == 3  # one per rate
    assert all(f"<h2>{bits} bits per image</h2>" in html for bits in (64, 80, 96))
    rd = json.loads((out / "figures" / "rate_distortion.json").read_text())
    assert set(rd["lines"]) == set(methods)
    # run a has priors, so its rows have coded files too
    assert rd["panels"][0] == "psnr" and rd["panels"][-2:] == ["psnr_vs_prior_bits", "psnr_vs_coded_bpp"]
    # geodesic diagnostics: the geodesic row's sampled pairs and edges, both panels drawn
    geometry = json.loads((out / "figures" / "geometry_64bits.json").read_text())
    geodesic = next(r for r in rows if r["method"] == "geodesic" and r["K"] == 16)
    sample = geodesic["fit_info"]["diagnostics"]
    assert geometry["lines"] == ["geodesic"] and geometry["panels"] == 2
    assert geometry["points"]["geodesic"] == {"pairs": len(sample["pairs"]["graph"]),
                                              "edges": len(sample["edges"]["length"])} and len(sample["edges"]["length"]) == 400
    # distinct landmarks: every sampled edge has a positive chord and a positive decoder-metric length
    assert min(sample["edges"]["length"]) > 0 and min(sample["edges"]["euclidean"]) > 0
    assert set(json.loads((out / "figures" / "usage_64bits.json").read_text())["lines"]) == set(methods)
    assert json.loads((out / "figures" / "usage_80bits.json").read_text())["lines"] == ["kmeans"]
    compare = {bits: json.loads((out / "figures" / f"compare_{bits}bits.json").read_text()) for bits in (64, 80)}
    assert set(compare[64]["lines"]) == set(methods) and compare[80]["lines"] == ["kmeans"]
    assert compare[64]["ceilings"] == compare[80]["ceilings"] == ["continuous VAE (plain)"]  # one VAE serves both runs
    # the VQ-VAE at K = 16 is the 64-bit baseline, paired by seed (one seed: no interval); 80 bits has none
    vqvae16 = next(r for r in rows if r["method"] == "vqvae" and r["K"] == 16)
    kmeans16 = next(r for r in rows if r["method"] == "kmeans" and r["K"] == 16)
    assert compare[64]["panels"] == 3 and compare[80]["panels"] == 2 and "vqvae" not in compare[64]["delta"]
    assert compare[64]["delta"]["kmeans"] == [pytest.approx(kmeans16["psnr"] - vqvae16["psnr"]), None]
    layout = json.loads((out / "figures" / "recon_64bits.json").read_text())
    assert layout["rows"][0] == "original" and set(layout["rows"][1:]) == set(methods)
    cfg = SweepConfig.load(two_runs[0] / "config.yaml")
    test = load_splits(cfg).test
    images = recon_images(len(test), cfg.split_seed)
    assert layout["images"] == images.tolist() and len(images) == 12

    # the kmeans tiles are the kmeans unit's test codes decoded by the VAE, pixel for pixel
    kmeans = next(r for r in rows if r["method"] == "kmeans" and r["K"] == 16)
    unit = two_runs[0] / Path(kmeans["codes_path"]).parent
    q = Quantizer.load(unit / "quantizer.npz")
    vae = load_model(two_runs[0] / "vae" / kmeans["vae_key"] / "model.pt", "vae")
    codes = np.load(two_runs[0] / kmeans["codes_path"])[images]
    with torch.no_grad():
        grids = torch.as_tensor(q.layout_.tokens_to_grid(q.decode(codes))).permute(0, 3, 1, 2)
        decoded = vae.decoder.mean(grids).numpy()
    picture = np.asarray(Image.open(out / "figures" / "recon_64bits.png").convert("RGB"))
    row = layout["rows"].index("kmeans")
    h, w = layout["tile"]
    for j in range(len(images)):
        y = layout["top"] + row * (h + layout["pad"])
        x = layout["left"] + j * (w + layout["pad"])
        want = np.kron(np.rint(decoded[j, 0] * 255), np.ones((layout["scale"], layout["scale"])))
        np.testing.assert_array_equal(picture[y:y + h, x:x + w, 0], want.astype(np.uint8))

    # the sample grid's vqvae tiles are the first images the vqvae unit's prior drew, pixel for pixel
    samples = json.loads((out / "figures" / "samples_64bits.json").read_text())
    assert samples["rows"] == [f"{m}: transformer" for m in methods]  # in line order
    with np.load(two_runs[0] / samples["files"]["vqvae"]) as z:
        drawn = z["images"][:samples["n"], 0]
    picture = np.asarray(Image.open(out / "figures" / "samples_64bits.png").convert("RGB"))
    h, w = samples["tile"]
    y = samples["top"] + methods.index("vqvae") * (h + samples["pad"])
    for j in range(samples["n"]):
        x = samples["left"] + j * (w + samples["pad"])
        want = np.kron(drawn[j], np.ones((samples["scale"], samples["scale"]), np.uint8))
        np.testing.assert_array_equal(picture[y:y + h, x:x + w, 0], want)


def edited_copy(run: Path, tmp_path: Path, name: str, **changes) -> Path:
    import yaml

    copy = tmp_path / name
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[key] = value
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def test_report_bad_input_is_one_line_naming_what_was_found(two_runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello\n")
    other_dataset = edited_copy(two_runs[1], tmp_path, "c", dataset="mnist")
    other_trunk = edited_copy(two_runs[1], tmp_path, "d", **{"trunk.hidden": 64})
    cases = [
        ([str(empty)], "is not a geovq run directory: found nothing, expected config.yaml"),
        ([str(foreign)], "found notes.txt, expected config.yaml"),
        ([str(two_runs[0]), str(other_dataset), "--out", str(tmp_path / "x")], "is a mnist run"),
        ([str(two_runs[0]), str(other_trunk), "--out", str(tmp_path / "y")], "(trunk.hidden 32 -> 64)"),
        ([str(two_runs[0]), str(two_runs[1])], "--out is required when several run directories are merged"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["report", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[:len(text) // 2], ""),  # truncated: the JSON parser's own words follow
    (lambda text: text.replace('"psnr": ', '"psnr": NaN, "was": ', 1), "NaN is not a number JSON allows"),
    (lambda text: json.dumps({**json.loads(text), "psnr": "high"}), "psnr 'high' must be a number or null)"),
    (lambda text: json.dumps({**json.loads(text), "K": "16"}), "K '16' is not a valid int)"),
    (lambda text: json.dumps([1, 2]), "a results row must be a JSON object, got list)"),
])
def test_a_damaged_row_is_one_line_naming_it_and_the_report_is_left_as_it_was(two_runs, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    row = next(run.glob("units/kmeans-*/row.json"))
    if '"psnr": ' not in row.read_text():  # the writer's spacing, which the NaN case edits
        row.write_text(json.dumps(json.loads(row.read_text())))
    row.write_text(damage(row.read_text()))
    before = {p.name: p.read_bytes() for p in (run / "results.json", run / "report.md")}
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert f"{row} is not a valid results row ({message}" in result.output and "delete it and re-run" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (run / "results.json", run / "report.md")} == before


@pytest.mark.parametrize("damage, message", [
    # cut after a whole line (a cut inside one may still parse, as a key without a value)
    (lambda text: "".join(text.splitlines(True)[:text.count("\n") // 3]) + "  - [unclosed\n",
     "is not a readable geovq run configuration: while parsing"),
    (lambda text: "!!python/object/apply:os.system ['touch PWNED']\n", "is not a readable geovq run configuration: could not"),
    (lambda text: text.replace("trunk:", "trunk: [1, 2]\nold_trunk:", 1), "config.yaml: bad config:"),
])
def test_a_damaged_run_configuration_is_one_line_for_report_and_rerun(two_runs, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    config = run / "config.yaml"
    config.write_text(damage(config.read_text()))
    for args in (["report", str(run)], ["sweep", "digits", "--tiny", "--out", str(run)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and str(config) in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "PWNED").exists() and not list(tmp_path.rglob("PWNED"))


def test_paths_in_a_row_and_unit_folders_stay_inside_the_run(two_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    row = next(run.glob("units/kmeans-*/row.json"))
    original = json.loads(row.read_text())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for field, value in (("codes_path", str(outside / "codes_test.npy")), ("codes_path", "../../elsewhere/c.npy"),
                         ("vae_key", "../../elsewhere"), ("unit", "/etc")):
        row.write_text(json.dumps({**original, field: value}))
        result = runner.invoke(app, ["report", str(run)])
        assert result.exit_code == 2, result.output
        assert f"{field} {value!r} must be" in result.output and "inside the run" in result.output
    row.write_text(json.dumps(original))
    # a unit folder that is a link out of the run: refused, nothing read or written through it
    unit = row.parent
    shutil.move(unit, outside / unit.name)
    unit.symlink_to(outside / unit.name, target_is_directory=True)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "leads out of the run directory" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_report_that_fails_part_way_leaves_the_previous_one_whole(two_runs, tmp_path, monkeypatch):
    import geovq.report.build as build

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def half_the_figures(out, runs):
        (out / "figures").mkdir(exist_ok=True)
        (out / "figures" / "rate_distortion.png").write_bytes(b"half")
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(build, "write_figures", half_the_figures)
    with pytest.raises(RuntimeError, match="the disk filled up"):
        build.write_report([run])
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before and not list(run.glob(".report-*"))  # results, report.md and figures as they were
    merged = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        build.write_report([run, two_runs[1]], merged)
    assert not merged.exists()  # a folder the failed report made is removed
    monkeypatch.undo()
    build.write_report([run])  # and a report that succeeds replaces them
    assert (run / "report.md").read_bytes() == before[Path("report.md")]
    assert not list(run.glob(".report-*"))


def test_the_coded_panel_puts_real_file_rates_beside_jpeg_and_webp_on_the_same_images(tmp_path):
    """JPEG and WebP points are Pillow's real file sizes and PSNRs, computed here again independently; a line's
    coded point is its mean coded bits per native pixel, drawn only where every seed has files."""
    import io

    from geovq.data import ImageSplits
    from geovq.report.figures import rate_distortion_figure
    from geovq.stages.reference import PERFECT_PSNR, QUALITIES, reference_codecs_stage
    from geovq.stages.rundir import RunDir

    rng = np.random.default_rng(0)
    test = rng.random((5, 1, 16, 16)).astype(np.float32)
    test[4] = 1.0  # a flat white image, which may come back exactly (PSNR +inf, counted as PERFECT_PSNR)
    empty = np.zeros((0, 1, 16, 16), np.float32)
    data = ImageSplits("noise", empty, empty, test, np.zeros(0, int), np.zeros(0, int), np.zeros(5, int), (8, 8), "")
    refs = reference_codecs_stage(RunDir(tmp_path), data)
    assert (tmp_path / "reference_codecs.json").exists() and refs["qualities"] == list(QUALITIES)
    for codec, fmt in (("jpeg", "JPEG"), ("webp", "WEBP")):
        point = refs["codecs"][codec]["points"][2]  # quality 20
        sizes, psnrs, perfect = [], [], 0
        for image in test:
            buffer = io.BytesIO()
            Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(buffer, format=fmt, quality=20)
            sizes.append(len(buffer.getvalue()))
            back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), np.float32) / 255
            mse = np.mean((back - image[0]) ** 2)
            psnrs.append(PERFECT_PSNR if mse == 0 else 10 * np.log10(1 / mse))
            perfect += mse == 0
        assert point["bits_per_image"] == pytest.approx(8 * np.mean(sizes)) and point["perfect"] == perfect
        assert point["bpp"] == pytest.approx(8 * np.mean(sizes) / 64)  # per native 8×8 pixel
        assert point["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-5)

    (tmp_path / "figures").mkdir()
    rows = [dict(row("vqvae", None, 16, s, 20.0 + s), prior_bits_per_image=50.0, coded_bits_per_image=c)
            for s, c in ((0, 100.0), (1, 120.0))]
    rows += [dict(row("kmeans", "plain", 16, s, 19.0), prior_bits_per_image=50.0, coded_bits_per_image=None)
             for s in (0, 1)]
    figure = rate_distortion_figure(tmp_path, rows, [], refs)
    assert figure.data["panels"][-2:] == ["psnr_vs_prior_bits", "psnr_vs_coded_bpp"]
    # bpp 1.0 at 64 fixed-length bits: 110 coded bits are 110/64 bits per pixel
    assert figure.data["coded"] == {"vqvae": [(110.0 / 64, 20.5, pytest.approx(mean_ci([20.0, 21.0])[1]))]}
    assert figure.data["references"]["codecs"]["jpeg"]["points"][0]["quality"] == QUALITIES[0]
    assert any(p["perfect"] for c in refs["codecs"].values() for p in c["points"])  # the flat image, somewhere
    rows[0]["coded_bits_per_image"] = None  # one seed without files: no point, and no empty panel
    assert "psnr_vs_coded_bpp" not in rate_distortion_figure(tmp_path, rows, [], refs).data["panels"]
