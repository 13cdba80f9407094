"""`geovq tune` (Ray Tune + Optuna + ASHA on validation) and `geovq sweep --tuned`.

Fast unit tests first (space parsing, rate allocation, conditional sampling, the grid, the epoch callback, the
withheld test split), then small searches on real local Ray: digits, a 300-image training cap, 2 epochs.
"""

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from consoles import sigint_at_default
from geovq.cli import app
from geovq.config import END_TO_END, TrainConfig, TrunkConfig
from geovq.data import load_dataset
from geovq.errors import GeovqError
from geovq.latents import TokenLayout
from geovq.search.space import load_space, parse_space
from geovq.search.trial import VAE_HISTORY, WithheldSplitAccess, WithheldSplits
from geovq.stages.common import no_progress
from geovq.training.loop import train_vae

runner = CliRunner()
SPACES = Path(__file__).resolve().parent.parent / "geovq" / "tune_spaces"
GRIDS = {"digits": (4, 4, 8), "mnist": (7, 7, 16), "fashion": (7, 7, 16), "cifar10": (8, 8, 32)}
# A small space: the VAE settings are choices, so 6 gq trials must share the 5 distinct VAEs (plain; TDC with 2
# factors at 2 rates); gq's β and the VQ-VAE's settings are ranges.
SMALL = """
bits: 64
rate: {token_dims: [8, 4], min_codes: 4, max_codes: 256}
sampler: {n_startup_trials: 2}
asha: {grace_period: 1, reduction_factor: 2}
max_train_images: 300
vae:
  variants: [plain, tdc]
  train.lr: 0.003
  train.epochs: 2
  train.beta: 1.0
  tdc.factor: {choices: [1.01, 1.02]}
vqvae:
  train.lr: {low: 1.0e-3, high: 5.0e-3, log: true}
  train.epochs: 2
  vq.commitment: {low: 0.1, high: 0.5}
methods:
  gq: {beta: {low: 0.0, high: 1.0}}
  kmeans: {}
"""
EPOCHS, TRIALS = 2, 6


def space_file(tmp_path: Path, text: str = SMALL, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


# -- the space file --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_shipped_spaces_parse_and_allocate_the_budget_exactly(name):
    space = load_space(SPACES / f"{name}.yaml", GRIDS[name])
    h, w, c = GRIDS[name]
    rates = space.rates(space.bits)
    assert len(rates) >= 2
    for k, d in rates:
        assert (h * w * c // d) * math.log2(k) == space.bits  # tokens × log2 K = the budget
    for method in space.method_names:  # every method's study builds, with its parameters
        assert space.study(method, space.bits).distributions()


def test_mnist_392_bits_are_d16_k256_d8_k16_d4_k4():
    space = load_space(SPACES / "mnist.yaml", GRIDS["mnist"])
    assert space.rates(392) == [(256, 16), (16, 8), (4, 4)]


@pytest.mark.parametrize("edit, message", [
    ("asa: {grace_period: 1}\n", "asa: unknown key; valid: bits, rate"),
    ("vae: {variants: [plain], train.lrr: 0.1}\nmethods: {kmeans: {}}\n", "vae.train.lrr: unknown training setting"),
    ("methods: {gq: {betta: 0.5}}\n", "methods.gq.betta: gq has no hyperparameter 'betta'; valid: beta"),
    ("methods: {geodesic: {k: {low: 2.5, high: 9}}}\n", "methods.geodesic.k: 2.5 must be int"),
    ("methods: {geodesic: {quadrature: {choices: [endpoint, trapezium]}}}\n", "quadrature 'trapezium' is unknown"),
    ("methods: {gq: {beta: [0, 1]}}\n", "methods.gq.beta: a list is ambiguous; write {choices: [0, 1]}"),
    ("vae: {variants: [plain], tdc.factor: 1.01}\nmethods: {kmeans: {}}\n",
     "vae.tdc.factor: acts only on the tdc VAE, which vae.variants ['plain'] leaves out"),
    ("vae: {variants: [tdc], tdc.factor: {low: 0.9, high: 1.1}}\nmethods: {kmeans: {}}\n",
     "TDC factor f=0.9 must be > 1"),
    ("vqvae: {tdc.tolerance: 0.5}\n", "vqvae.tdc.tolerance: acts on the Gaussian VAE only"),
    ("methods: {magic: {}}\n", "methods.magic: unknown quantizer 'magic'"),
    ("bits: 100\nmethods: {kmeans: {}}\n", "no (K, d) pair gives tokens × log2 K = 100"),
    # a range no sampler can draw from: refused before the output folder is made (it was an OverflowError)
    ("methods: {gq: {beta: {low: 0.1, high: .inf}}}\n", "methods.gq.beta: inf must be a finite number"),
    ("methods: {gq: {beta: .nan}}\n", "methods.gq.beta: nan must be a finite number"),
])
def test_a_bad_space_file_is_one_line_naming_the_key(tmp_path, edit, message):
    path = space_file(tmp_path, edit)
    result = runner.invoke(app, ["tune", "digits", "--space", str(path), "--bits", "64", "--out", str(tmp_path / "o")]
                           if "bits:" not in edit else ["tune", "digits", "--space", str(path), "--out",
                                                        str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--bits", "100"], "--bits 100: no (K, d) pair gives tokens × log2 K = 100 on the 4×4×8 latent grid "
                        "(d in [8, 4], K in [4, 256]); nearest feasible budgets: 80, 96, 112, 128"),
    # a budget whose 2 ** (bits / tokens) would not fit in memory: refused at once, by logarithms
    (["--bits", "1000000000000"], "--bits 1000000000000: no (K, d) pair gives tokens × log2 K = 1000000000000 on "
                                  "the 4×4×8 latent grid (d in [8, 4], K in [4, 256]); nearest feasible budgets: "
                                  "224, 256"),
    (["--trials", "0"], "--trials 0 must be >= 1"),
    (["--pareto", "--bits", "64"], "--pareto searches K freely and makes bits an objective; drop --bits"),
    (["--methods", "gq,wasserstein"], "has no entry for method 'wasserstein'; its methods: vqvae, gq, kmeans"),
])
def test_bad_tune_options_are_one_line_with_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["tune", "digits", "--space", str(space_file(tmp_path)), "--out", str(tmp_path / "o"),
                                 *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output  # one line, maybe wrapped
    assert not (tmp_path / "o").exists()


def test_conditional_parameters_are_sampled_only_where_they_act():
    space = load_space(SPACES / "digits.yaml", GRIDS["digits"])
    tdc_keys = {"tdc.tolerance", "tdc.initial_lambda", "tdc.factor", "tdc.lambda_max_limit", "tdc.lambda_min_limit"}
    seen_variants = set()
    for method in space.method_names:
        study = space.study(method, 64)
        optuna_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(60):
            trial = optuna_study.ask()
            values = study(trial)
            optuna_study.tell(trial, 0.0)
            own = {k for k in trial.params if k.partition(".")[0] in space.methods}  # quantizer parameters
            assert own == {f"{method}.{p.key}" for p in space.methods.get(method, ())}
            candidate = study.candidate(values)
            assert candidate.bits == 64
            if method in END_TO_END:  # the vqvae: section's train.* on each, its vq.* on the VQ-VAE only
                assert "vae" not in values and not tdc_keys & set(values) and "train.beta" not in values
                assert {"train.lr", "train.epochs"} <= set(trial.params) and candidate.vae is None
                vq = {"vq.commitment", "vq.decay"}
                assert vq <= set(trial.params) if method == "vqvae" else not vq & set(trial.params)
                continue
            seen_variants.add(values["vae"])
            assert not {"vq.commitment", "vq.decay"} & set(values)
            if values["vae"] == "plain":
                assert not tdc_keys & set(trial.params) and "train.beta" in trial.params
            else:
                assert tdc_keys <= set(trial.params) and "train.beta" not in trial.params
            assert set(candidate.vae_overrides) == {k for k in values if k.startswith(("train.", "tdc."))}
    assert seen_variants == {"plain", "tdc"} and set(END_TO_END) <= set(space.method_names)


@pytest.mark.parametrize("database", [False, True], ids=["journal", "sqlite"])
def test_a_killed_searchers_open_trial_is_handed_out_again_and_reports_each_epoch_once(tmp_path, database):
    """The resume protocol without Ray: a searcher asks a trial that reports an epoch, then dies untold (as a
    killed driver does); a new searcher on the same journal hands that trial to the next Tune trial with its
    number and values, replays no epoch into Optuna twice (Optuna would warn), and records the outcome. In the
    search folder's journal, and in a database given by --storage."""
    import warnings

    from geovq.search.driver import Search, make_searcher, open_storage, open_study, study_name, study_rows
    from geovq.search.trial import EPOCH, EPOCH_METRIC, OBJECTIVE

    study = load_space(SPACES / "digits.yaml", GRIDS["digits"]).study("kmeans", 64)
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if database else None
    search = Search("digits", ("kmeans",), 3, 64, 0, 1, storage=url)
    storage, name = open_storage(tmp_path, url), study_name(tmp_path, search, "kmeans")
    open_study(storage, study, search, name)
    first = make_searcher(study, search, storage, name, tmp_path / "ray")
    config = first.suggest("tune-a")
    first.on_trial_result("tune-a", {EPOCH: 1, EPOCH_METRIC: 12.0})
    del first  # killed: never told how trial 0 ended

    second = make_searcher(study, search, open_storage(tmp_path, url), name, tmp_path / "ray")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        assert second.suggest("tune-b") == config  # the open trial again: same values, same number (0)
        second.on_trial_result("tune-b", {EPOCH: 1, EPOCH_METRIC: 12.0})  # its history, replayed
        second.on_trial_result("tune-b", {EPOCH: 2, EPOCH_METRIC: 13.0})
        second.on_trial_complete("tune-b", {EPOCH: 3, EPOCH_METRIC: 14.0, OBJECTIVE: 14.5, "done": True})
        assert second.suggest("tune-c")["number"] == 1  # then new proposals
    stored = optuna.load_study(study_name=name, storage=url or open_storage(tmp_path))
    assert stored.trials[0].intermediate_values == {1: 12.0, 2: 13.0} and stored.trials[0].value == 14.5
    rows = study_rows(study, stored)
    assert [(r["number"], r["trial_id"], r["status"]) for r in rows] == [(0, "tune-b", "finished"),
                                                                       (1, "tune-c", "unfinished")]
    assert rows[0]["metrics"][OBJECTIVE] == 14.5 and rows[0]["values"] == {k: v for k, v in config.items()
                                                                           if k != "number"}


def test_every_post_hoc_study_starts_from_the_same_random_vaes_then_tpe_takes_over():
    from geovq.search.driver import SharedStartupSampler

    space = load_space(SPACES / "digits.yaml", GRIDS["digits"])
    proposals = {}
    for method in ("gq", "kmeans", "geodesic"):  # gq and geodesic draw parameters of their own besides
        study = space.study(method, 64)
        optuna_study = optuna.create_study(direction="maximize", sampler=SharedStartupSampler(7, 5, False))
        proposals[method] = []
        for i in range(10):
            trial = optuna_study.ask()
            proposals[method].append(study.candidate(study(trial)))
            optuna_study.tell(trial, float(i % 4 if method != "gq" else -i % 4))  # gq ranks its trials otherwise
    vaes = {m: [(c.vae, c.n_codes, c.token_dim, c.vae_overrides) for c in cs] for m, cs in proposals.items()}
    assert vaes["gq"][:5] == vaes["kmeans"][:5] == vaes["geodesic"][:5]  # shared start-up: shared VAEs
    assert len({json.dumps(v, sort_keys=True) for v in vaes["gq"][:5]}) == 5  # and 5 different ones
    assert vaes["gq"][5:] != vaes["kmeans"][5:]  # then each study's own TPE proposes


def test_the_grid_enumerates_every_point_of_a_conditional_space():
    raw = yaml.safe_load(SMALL)
    raw["methods"]["gq"] = {"beta": {"choices": [0.0, 0.5, 1.0]}}
    space = parse_space(raw, GRIDS["digits"])
    points = space.study("gq", 64).grid()
    # 2 rates × (plain + tdc: 2 factors) × 3 gq β
    assert len(points) == 2 * (1 + 2) * 3
    assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
    assert all(("tdc.factor" in p) == (p["vae"] == "tdc") for p in points)
    with pytest.raises(GeovqError, match="an exhaustive grid needs choices; train.lr is a range"):
        space.study("vqvae", 64).grid()


# -- the pieces a trial is made of -----------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_epoch_callback_sees_each_trained_epoch_once_after_its_resume_point(tmp_path):
    digits = load_dataset("digits")
    trunk = TrunkConfig(in_channels=1, image_size=(16, 16), hidden=8, latent_channels=4, res_blocks=1)
    cfg, out = TrainConfig(epochs=3, batch_size=64), tmp_path / "vae"
    calls = []

    def on_epoch(epoch, model):
        saved = torch.load(out / "state.pt", weights_only=True)
        assert saved["epoch"] == epoch  # the resume point of this epoch is already written
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, saved["model"][name])
        calls.append(epoch)
        if epoch == 1 and len(calls) == 1:
            raise Interrupt  # as if the scheduler had stopped the trial here

    layout = TokenLayout(4, 4, 4, 4)
    with pytest.raises(Interrupt):
        train_vae(trunk, cfg, digits.train[:128], digits.val[:32], out, no_progress, torch.device("cpu"), layout,
                  on_epoch=on_epoch)
    train_vae(trunk, cfg, digits.train[:128], digits.val[:32], out, no_progress, torch.device("cpu"), layout,
              on_epoch=on_epoch)
    assert calls == [1, 2, 3]  # the resumed training did not call back for the epoch it already had


def test_the_test_split_is_withheld():
    data = WithheldSplits(load_dataset("digits"))
    assert len(data.train) == 1258 and len(data.val) == 180
    for name in ("test", "test_labels"):
        with pytest.raises(WithheldSplitAccess, match="withheld during a search"):
            getattr(data, name)


def test_asha_sees_the_vae_reconstruct_a_fixed_posterior_sample():
    """vae_val_psnr: the mean per-image PSNR of decode(μ + σ·ε), ε ~ N(0, I) from seed 0, recomputed here from
    the model's own encoder and decoder; the same noise on every call (paired comparisons), not μ's PSNR."""
    from geovq.models.vae import GaussianVAE
    from geovq.search.trial import vae_val_psnr

    torch.manual_seed(0)
    vae = GaussianVAE(TrunkConfig(image_size=(16, 16), hidden=8, latent_channels=4, res_blocks=1)).eval()
    images = np.random.default_rng(1).random((40, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        mu, logvar = vae.encode(torch.as_tensor(images))
        eps = torch.as_tensor(np.random.default_rng(0).standard_normal(
            tuple(mu.permute(0, 2, 3, 1).shape), dtype=np.float32)).permute(0, 3, 1, 2)
        def psnr(z):
            mse = ((vae.decoder.mean(z) - torch.as_tensor(images)) ** 2).flatten(1).mean(1)
            return float((10 * torch.log10(1 / mse)).mean())
        sampled, at_mean = psnr(mu + (0.5 * logvar).exp() * eps), psnr(mu)
    got = vae_val_psnr(vae, images, torch.device("cpu"))
    assert got == pytest.approx(sampled, abs=1e-4)
    assert abs(got - at_mean) > 1e-3
    assert vae_val_psnr(vae, images, torch.device("cpu")) == got


# -- searches on local Ray (each Tune experiment starts fresh workers: tens of seconds each) -----------------
def tune_args(space: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "digits", "--space", str(space), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    space, out = space_file(root), root / "out"
    result = runner.invoke(app, tune_args(space, out, "--methods", "gq,vqvae", "--trials", str(TRIALS),
                                          "--max-concurrent", "2"))
    assert result.exit_code == 0, result.output
    return out


def test_search_end_to_end(search):
    rows = read_trials(search)
    assert [(r["method"], r["number"]) for r in rows] == [(m, str(i)) for m in ("gq", "vqvae") for i in range(TRIALS)]
    assert {r["status"] for r in rows} <= {"finished", "stopped"} and "finished" in {r["status"] for r in rows}
    for r in rows:
        assert int(r["bits"]) == 64 and int(r["bits"]) == (4 * 4 * 8 // int(r["token_dim"])) * math.log2(int(r["K"]))
        if r["status"] == "finished":  # trained every epoch, then scored on validation
            assert int(r["epoch"]) == EPOCHS and 5 < float(r["val_psnr"]) < 40
        else:  # stopped by ASHA at its first rung, before its last epoch
            assert int(r["epoch"]) < EPOCHS and r["val_psnr"] == ""
    best = yaml.safe_load((search / "best.yaml").read_text())
    for method in ("gq", "vqvae"):
        entry = best["methods"][method]
        top = max(float(r["val_psnr"]) for r in rows if r["method"] == method and r["val_psnr"])
        assert entry["val_psnr"] == pytest.approx(top)
        assert entry["tuned"]["n_codes"] in (4, 16) and entry["bits_per_image"] == 64
    assert (search / "figures" / "val_psnr.png").stat().st_size > 1000
    importances = json.loads((search / "importances.json").read_text())
    assert set(importances) == {"gq", "vqvae"}
    for method, groups in importances.items():
        scored = sum(r["method"] == method and r["status"] == "finished" for r in rows)
        if scored >= 3:  # fANOVA over the parameters every finished trial has; the importances sum to 1
            assert sum(groups["all"].values()) == pytest.approx(1.0, abs=1e-3)
        else:
            assert "too few" in groups["all"]
    again = runner.invoke(app, tune_args(search.parent / "space.yaml", search, "--methods", "gq,vqvae",
                                         "--trials", str(TRIALS - 1)))
    assert again.exit_code == 2 and f"holds a different search (trials: {TRIALS} -> {TRIALS - 1})" in again.output


def test_conditional_parameters_never_appear_for_a_method_that_does_not_use_them(search):
    for r in read_trials(search):
        given = {k for k, v in r.items() if v != "" and "." in k and k not in ("val_psnr",)}
        if r["method"] == "vqvae":
            assert r["vae"] == "" and given <= {"train.lr", "train.epochs", "vq.commitment"}
            continue
        assert "gq.beta" in given
        assert ("tdc.factor" in given) == (r["vae"] == "tdc") and ("train.beta" in given) == (r["vae"] == "plain")
        assert "vq.commitment" not in given


def test_no_trial_reads_the_test_split(search):
    # Trials see the dataset only through WithheldSplits (reading its test split raises, and no trial failed);
    # nor does any file derived from the test split exist.
    assert all(r["status"] in ("finished", "stopped") and not r["error"] for r in read_trials(search))
    for pattern in ("latents_test.npz", "codes_test.npy", "ceiling.json", "row.json"):
        assert not list(search.rglob(pattern)), pattern
    assert list(search.rglob("latents_val.npz"))


def test_trials_sharing_a_vae_reuse_it_and_no_epoch_is_trained_twice(search):
    rows = [r for r in read_trials(search) if r["method"] != "vqvae"]
    vaes = sorted((search / "vae").iterdir())
    assert len(rows) > len(vaes)  # 6 post-hoc trials on at most 5 distinct VAEs: some VAE served several
    assert len({r["vae_key"] for r in rows}) == len(vaes)
    trained = sum(int(r["epochs_trained"]) for r in rows)
    # every epoch of every VAE was trained by exactly one trial (ASHA-stopped ones resumed, not restarted)
    assert trained == sum(len(json.loads((v / VAE_HISTORY).read_text())) for v in vaes)
    assert trained < EPOCHS * len(rows)


def test_every_event_file_parses_back_and_the_hparams_compare_trials(search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    rows = {(r["method"], int(r["number"])): r for r in read_trials(search)}
    runs = sorted(p.parent for p in (search / "tb").rglob("events.out.tfevents.*"))
    assert len(runs) == len(rows) and len(list((search / "tb").rglob("events.out.tfevents.*"))) == len(rows)
    for run in runs:
        acc = EventAccumulator(str(run)).Reload()
        content = acc.PluginTagToContent("hparams")
        assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {"method", "vae", "gq.beta", "vq.commitment", "train.beta"} <= {h.name for h in experiment.hparam_infos}
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        row = rows[(hparams["method"].string_value, int(run.name))]
        for key in ("gq.beta", "train.beta", "vq.commitment"):
            assert (key in hparams) == (row[key] != "")
            if key in hparams:
                assert hparams[key].number_value == pytest.approx(float(row[key]))
        if row["status"] == "finished":
            (event,) = acc.Scalars("hparam/val_psnr")
            assert event.value == pytest.approx(float(row["val_psnr"]), rel=1e-6)
        assert [e.step for e in acc.Scalars("epoch_val_psnr")] == list(range(1, int(row["epoch"]) + 1))
    for path in search.rglob("events.out.tfevents.*"):  # the trainings' own logs parse back too
        assert EventAccumulator(str(path.parent)).Reload().Tags() is not None


def test_tuned_sweep_scores_each_method_at_its_own_configuration_on_test(search, tmp_path):
    result = runner.invoke(app, ["sweep", "digits", "--tuned", str(search), "--seeds", "1", "--no-prior",
                                 "--max-concurrent", "1", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((search / "best.yaml").read_text())["methods"]
    rows = json.loads((tmp_path / "t" / "results.json").read_text())
    assert sorted(r["method"] for r in rows) == ["gq", "vqvae"]
    for r in rows:
        tuned = best[r["method"]]["tuned"]
        assert (r["K"], r["token_dim"], r["vae"]) == (tuned["n_codes"], tuned["token_dim"], tuned["vae"])
        assert r["params"] == tuned["params"] and r["vae_overrides"] == tuned["vae_overrides"]
        assert r["bits_per_image"] == 64 and r["n_test"] == 359 and math.isfinite(r["psnr"])
    assert "## Settings of each row" in (tmp_path / "t" / "report.md").read_text()
    assert "<h2>Settings of each row</h2>" in (tmp_path / "t" / "report.html").read_text()
    clash = runner.invoke(app, ["sweep", "digits", "--tuned", str(search), "--codebook-sizes", "16"])
    assert clash.exit_code == 2
    assert "--tuned fixes each method's rate, VAE and settings; drop --codebook-sizes" in clash.output


KMEANS = SMALL.replace("  train.lr: 0.003\n", "  train.lr: {low: 1.0e-3, high: 5.0e-3, log: true}\n")


PARETO = ("--methods", "kmeans", "--trials", "4", "--max-concurrent", "1", "--pareto", "--seed", "3")
#: the columns that describe a trial's proposal and its outcome
PROPOSAL = ("number", "status", "bits", "K", "token_dim", "vae", "train.lr", "train.beta", "tdc.factor", "val_psnr",
            "epoch")


class Planted:
    """What a tampered search folder might hold: a pickle whose loading runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def pareto_search(ray_local, tmp_path_factory):
    """The --pareto search of 4 k-means trials, one at a time, seed 3, run through."""
    root = tmp_path_factory.mktemp("pareto")
    result = runner.invoke(app, tune_args(space_file(root, KMEANS), root / "out", *PARETO))
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture(scope="module")
def resumed_search(ray_local, tmp_path_factory):
    """The same search, Ctrl-C'd after 2 trials finished, its pickle-named files replaced by planted pickles, and
    resumed by the same command. Returns what the tests look at."""
    root = tmp_path_factory.mktemp("resumed")
    out = root / "out"
    args = tune_args(space_file(root, KMEANS), out, *PARETO, "--address", ray_local.get_runtime_context().gcs_address)
    console = open(root / "console.txt", "w")  # a file, not a pipe: Ray's worker logs could fill a pipe
    proc = subprocess.Popen([sys.executable, "-m", "geovq.cli", *args], stdout=console, stderr=subprocess.STDOUT,
                            preexec_fn=sigint_at_default)
    log = out / "search.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and log.read_text().count("finished:") >= 2):
        assert proc.poll() is None, (root / "console.txt").read_text()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the running trial stays open in the study
    proc.wait(timeout=120)
    console.close()
    first = log.read_text()
    interrupted_best = yaml.safe_load((out / "best.yaml").read_text())
    marker = root / "PWNED"
    planted = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".pkl", ".pickle"))
    payload = pickle.dumps(Planted(marker))
    for path in planted:
        path.write_bytes(payload)
    result = runner.invoke(app, args)  # the same command
    return SimpleNamespace(out=out, returncode=proc.returncode, console=(root / "console.txt").read_text(),
                           interrupted_best=interrupted_best,
                           first=first, planted=planted, payload=payload, marker=marker, result=result)


def test_same_seed_same_proposals_with_one_trial_at_a_time_even_across_an_interruption(pareto_search,
                                                                                       resumed_search):
    assert resumed_search.result.exit_code == 0, resumed_search.result.output
    a, b = ([{k: r[k] for k in PROPOSAL if k in r} for r in read_trials(out)]
            for out in (pareto_search, resumed_search.out))
    assert a == b  # 4 trials, 2 of them proposed by TPE after its 2 random start-up trials
    assert len({r["train.lr"] for r in a}) == 4  # and they are 4 different proposals


def test_an_interrupted_search_resumes_its_stored_study_without_repeating_a_finished_trial(resumed_search):
    out, first = resumed_search.out, resumed_search.first
    assert resumed_search.returncode == 130, resumed_search.console
    assert "re-run the same command to resume" in resumed_search.console
    done_before = {line.split("(")[1].split(")")[0] for line in first.splitlines() if "finished:" in line}
    assert 2 <= len(done_before) < 4
    assert resumed_search.result.exit_code == 0, resumed_search.result.output
    text = (out / "search.log").read_text()
    assert "resuming the search" in text[len(first):]
    started = [line.split("(")[1].split(")")[0] for line in text.splitlines() if "started:" in line]
    for trial_id in done_before:
        assert started.count(trial_id) == 1  # finished before the interruption: never started again
    rows = read_trials(out)
    assert sorted(int(r["number"]) for r in rows) == list(range(4))
    assert len({r["trial_id"] for r in rows}) == 4 and done_before <= {r["trial_id"] for r in rows}
    # best.yaml says whether the search is whole, for `sweep --tuned`
    assert resumed_search.interrupted_best["complete"] is False
    assert yaml.safe_load((out / "best.yaml").read_text())["complete"] is True
    # one study, continued: Optuna's own API reads it from the journal, with geovq's record of every trial
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="kmeans", storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    assert [t.number for t in study.trials] == list(range(4))
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    by_number = {int(r["number"]): r for r in rows}
    for t in study.trials:
        assert t.values == [pytest.approx(float(by_number[t.number]["val_psnr"])), int(by_number[t.number]["bits"])]
        assert t.user_attrs["trial_id"] == by_number[t.number]["trial_id"]
    # --pareto: K free, ASHA off (every trial trains all its epochs), the front in best.yaml and its figure
    assert {r["status"] for r in rows} == {"finished"}
    points = [(int(r["bits"]), float(r["val_psnr"])) for r in rows]
    front = yaml.safe_load((out / "best.yaml").read_text())["methods"]["kmeans"]["front"]
    on_front = [(e["bits_per_image"], e["val_psnr"]) for e in front]
    assert on_front == sorted(on_front) and [p for _, p in on_front] == sorted(p for _, p in on_front)
    for bits, psnr in points:  # every point is on the front or dominated by a point of it
        assert (bits, psnr) in on_front or any(b <= bits and p >= psnr for b, p in on_front)
    for bits, psnr in on_front:  # and no point dominates a point of the front
        assert not any(b <= bits and p >= psnr and (b, p) != (bits, psnr) for b, p in points)
    assert (out / "figures" / "pareto.png").stat().st_size > 1000


def test_resuming_a_search_unpickles_no_file_of_its_folder(resumed_search):
    # Tune left its pickles (tuner.pkl, trainable.pkl, each trial's params.pkl); each was replaced by a pickle
    # that touches PWNED when loaded, and the resume loaded none of them
    names = {p.name for p in resumed_search.planted}
    assert {"tuner.pkl", "params.pkl"} <= names, names
    assert resumed_search.result.exit_code == 0, resumed_search.result.output
    assert not resumed_search.marker.exists()
    pickle.loads(resumed_search.payload)  # what loading one would have done
    assert resumed_search.marker.exists()


TUNED_GQ = ("dataset: digits\nmethods:\n  gq:\n    val_psnr: 20.0\n    tuned: {n_codes: 16, token_dim: 4, vae: plain, "
            "vae_overrides: {train.epochs: 2}, params: {beta: 0.5}}\n")


def test_sweep_tuned_on_an_interrupted_search_warns_naming_its_counts(tmp_path, capsys):
    from geovq.cli import _tuned_records

    folder = tmp_path / "tuned"
    folder.mkdir()
    text = TUNED_GQ.replace("    val_psnr: 20.0\n", "    val_psnr: 20.0\n    finished: 1\n")
    for complete, warned in (("false", True), ("true", False)):
        (folder / "best.yaml").write_text(text + f"trials_per_method: 4\ncomplete: {complete}\n")
        methods, records = _tuned_records(folder, "digits", None)
        assert methods == ["gq"] and records["gq"]["n_codes"] == 16
        err = capsys.readouterr().err
        assert (f"--tuned {folder} is an interrupted search (gq 1 of 4 trials finished)" in err) == warned, err


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['touch PWNED']\n", "is not a readable best.yaml: could not determine a constructor"),
    ("methods: [\n", "is not a readable best.yaml: while parsing"),
    ("- digits\n- gq\n", "must be a mapping with a `methods:` mapping"),
    ("dataset: digits\nmethods: [gq]\n", "must be a mapping with a `methods:` mapping"),
    ("dataset: digits\nmethods:\n  gq: {val_psnr: 20.0}\n", "methods.gq must be a mapping with a `tuned:` configuration"),
    (TUNED_GQ.replace("train.epochs: 2", "train.epochs: -5"), "--tuned gq: train.epochs -5 must be >= 1"),
    (TUNED_GQ.replace("train.epochs: 2", "train.lr: fast"), "--tuned gq: train.lr 'fast' must be a float"),
    (TUNED_GQ.replace("train.epochs: 2", "tdc.factor: 0.5"), "--tuned gq: tdc.factor"),
    (TUNED_GQ.replace("vae_overrides: {train.epochs: 2}", "vae_overrides: [1]"), "must be mappings of settings"),
])
def test_a_bad_best_yaml_is_one_line_naming_it_before_anything_runs(tmp_path, text, message):
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "best.yaml").write_text(text)
    result = runner.invoke(app, ["sweep", "digits", "--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()
