"""Autoregressive priors over codes: likelihood against a chain's known entropy, causality, sampling controls,
resumable training, and the prior and sample stages on a real digits unit (samples beat a unigram baseline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geovq.errors import GeovqError
from geovq.models.priors import build_prior
from geovq.models.priors.base import CodeGrid, filter_logits
from geovq.models.priors.settings import PriorConfig, PriorTrainConfig
from geovq.models.priors.unigram import UnigramPrior
from geovq.stages.common import no_progress
from geovq.training.checkpoint import load_model
from geovq.training.prior import LN2, token_nll, train_prior

CPU = torch.device("cpu")
KINDS = ("transformer", "pixelcnn")
#: small models that learn a 4-state chain in a few hundred steps (the PixelCNN at hidden 32 ends 0.023 bits/token
#: from the class-conditional entropy rate, 0.05 allowed; hidden 64 took about 2.5 times as long for under 0.02)
SMALL = {"transformer": {"layers": 2, "heads": 2, "dim": 32, "dropout": 0.0},
         "pixelcnn": {"layers": 3, "hidden": 32, "kernel": 3, "dropout": 0.0}}


def make_prior(kind: str, grid: CodeGrid, n_classes: int = 0, **model):
    torch.manual_seed(0)
    return build_prior({"kind": kind, "grid": grid.as_dict(), "n_classes": n_classes,
                        "model": {**SMALL[kind], **model}}).eval()


# -- a Markov chain along the token order (row, column, group), with its exact entropies -------------------

def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def markov_chain(n_states: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random transition matrix (peaked rows: entropy well below log2 K) and its stationary law."""
    P = np.random.default_rng(seed).dirichlet(np.full(n_states, 0.3), size=n_states)
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return P, pi / pi.sum()


def draw_chain(P: np.ndarray, pi: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(n, length) sequences started from the stationary law pi."""
    out = np.empty((n, length), np.int64)
    out[:, 0] = rng.choice(len(pi), n, p=pi)
    cum = P.cumsum(1)
    for t in range(1, length):
        out[:, t] = np.minimum((rng.random(n)[:, None] > cum[out[:, t - 1]]).sum(1), len(pi) - 1)
    return out


def chain_entropies(P: np.ndarray, pi: np.ndarray, length: int) -> tuple[float, float]:
    """(entropy rate H(c_t | c_{t-1}) in bits, exact entropy of a whole sequence per token): the least NLL
    per token any model can reach, with the first (stationary) token's H(pi) counted."""
    rate = sum(pi[i] * entropy_bits(P[i]) for i in range(len(pi)))
    return rate, (entropy_bits(pi) + (length - 1) * rate) / length


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_prior_reaches_the_entropy_rate_of_a_markov_chain_along_its_order(kind, conditional, tmp_path):
    """Sequences of a fixed 4-state chain along the token order of a 3×3 grid with 2 tokens per cell: the
    chain crosses groups within a cell, cells within a row, and from a row's end to the next row's start, so
    the prior must model every one of its own conditionals. Class-conditional: each class has its own chain."""
    grid = CodeGrid(3, 3, 2, 4)
    chains = [markov_chain(4, seed) for seed in ((0, 1) if conditional else (0,))]
    rng = np.random.default_rng(7)
    splits = {}
    for split, n in (("train", 3000), ("val", 1000), ("test", 2000)):
        labels = rng.integers(len(chains), size=n)
        codes = np.empty((n, grid.tokens), np.int64)
        for c, (P, pi) in enumerate(chains):
            codes[labels == c] = draw_chain(P, pi, int((labels == c).sum()), grid.tokens, rng)
        splits[split] = (codes, labels if conditional else None)
    test_labels = splits["test"][1] if conditional else np.zeros(2000, np.int64)
    rate = np.mean([chain_entropies(*chains[c], grid.tokens)[0] for c in test_labels])
    per_token = np.mean([chain_entropies(*chains[c], grid.tokens)[1] for c in test_labels])

    config = PriorConfig(kind, SMALL[kind], PriorTrainConfig(batch_size=128, lr=5e-3, max_steps=150, warmup_steps=20,
                                                             eval_every=50), conditional=conditional)
    model, record = train_prior(config, grid, len(chains) if conditional else 0, *splits["train"], *splits["val"],
                                tmp_path, no_progress, CPU)
    nll = token_nll(model, *splits["test"], CPU) / LN2  # (N, T) bits
    unigram = token_nll(UnigramPrior(grid, splits["train"][0]), splits["test"][0], None, CPU) / LN2
    assert unigram.mean() > per_token + 0.3  # the chain's dependence is worth bits: the test can fail
    assert abs(nll.mean() - per_token) < 0.05, (nll.mean(), per_token, record["val_curve"])
    assert abs(nll[:, 1:].mean() - rate) < 0.05, (nll[:, 1:].mean(), rate)  # the conditionals alone
    assert record["best_val_bits_per_token"] == min(c["val_bits_per_token"] for c in record["val_curve"])


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_depend_on_earlier_codes_only_and_sampling_sees_the_same_logits(kind, groups):
    grid = CodeGrid(3, 4, groups, 5)
    model = make_prior(kind, grid, n_classes=3, **({"hidden": 24} if kind == "pixelcnn" else {}))
    with torch.no_grad():
        for p in model.parameters():  # untrained position/class biases start at 0: make every path count
            p.add_(0.1 * torch.randn_like(p))
        codes, labels = torch.randint(0, 5, (6, grid.tokens)), torch.randint(0, 3, (6,))
        logits = model.logits(codes, labels)
        for t in range(grid.tokens):
            later = codes.clone()
            later[:, t:] = torch.randint(0, 5, later[:, t:].shape)
            torch.testing.assert_close(model.logits(later, labels)[:, t], logits[:, t], rtol=0, atol=0)
            if t:  # and it does use the code just before it
                previous = codes.clone()
                previous[:, t - 1] = (previous[:, t - 1] + 1) % 5
                assert not torch.allclose(model.logits(previous, labels)[:, t], logits[:, t])
        other_class = model.logits(codes, (labels + 1) % 3)
        assert not torch.allclose(other_class[:, 0], logits[:, 0])  # the first code depends on the class
        # The sampling path (key/value cache; row-wise PixelCNN) yields the teacher-forced logits.
        filled = codes.clone()
        for t, step in enumerate(model.next_logits(filled, labels)):
            torch.testing.assert_close(step, logits[:, t], rtol=1e-5, atol=1e-5)


def greedy(model, n: int, labels=None) -> torch.Tensor:
    """Greedy decoding by hand: argmax of the teacher-forced logits, one position at a time."""
    codes = torch.zeros(n, model.grid.tokens, dtype=torch.long)
    with torch.no_grad():
        for t in range(model.grid.tokens):
            codes[:, t] = model.logits(codes, labels)[:, t].argmax(-1)
    return codes


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_one_and_vanishing_temperature_are_greedy_and_seeds_reproduce(kind):
    grid = CodeGrid(2, 3, 1, 7)
    model = make_prior(kind, grid)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = greedy(model, 1).expand(5, -1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.sample(5, top_k=1, generator=gen), expected)
    assert torch.equal(model.sample(5, temperature=1e-6, generator=gen), expected)
    assert torch.equal(model.sample(5, top_p=1e-9, generator=gen), expected)
    a = model.sample(64, generator=torch.Generator().manual_seed(3), batch_size=16)
    b = model.sample(64, generator=torch.Generator().manual_seed(3), batch_size=16)
    c = model.sample(64, generator=torch.Generator().manual_seed(4), batch_size=16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not model.training  # sampling leaves eval mode as it found it


def test_top_p_keeps_the_smallest_nucleus_and_samples_from_it_renormalised():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = probs.log()[None]
    # sorted: 0.4 (code 1), 0.25 (3), 0.2 (4), 0.1 (2), 0.05 (0); cumulative 0.4, 0.65, 0.85, 0.95, 1
    for top_p, nucleus in ((0.39, {1}), (0.41, {1, 3}), (0.64, {1, 3}), (0.66, {1, 3, 4}), (0.86, {1, 3, 4, 2}),
                           (1.0, {0, 1, 2, 3, 4})):
        kept = set(torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero().flatten().tolist())
        assert kept == nucleus, (top_p, kept)
    kept = set(torch.isfinite(filter_logits(logits, top_k=2))[0].nonzero().flatten().tolist())
    assert kept == {1, 3}
    # Drawn frequencies match the renormalised nucleus {1, 3, 4}: 0.4/0.85, 0.25/0.85, 0.2/0.85.
    draws = torch.multinomial(filter_logits(logits.expand(200_000, -1), top_p=0.7).softmax(-1), 1,
                              generator=torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0, 0.4, 0, 0.25, 0.2], dtype=torch.double) / 0.85,
                               atol=4e-3, rtol=0)
    # Temperature 2 flattens: p ∝ probs^(1/2).
    flat = filter_logits(logits, temperature=2.0).softmax(-1)[0]
    torch.testing.assert_close(flat, probs.sqrt() / probs.sqrt().sum())


@pytest.mark.parametrize("bad, message", [
    (dict(n=0), "number of samples n=0 must be a positive integer"),
    (dict(n=-3), "number of samples n=-3"),
    (dict(n=4, temperature=0.0), "temperature 0.0 must be > 0"),
    (dict(n=4, temperature=-1.0), "temperature -1.0 must be > 0"),
    (dict(n=4, top_p=0.0), r"top-p 0.0 must lie in \(0, 1\]"),
    (dict(n=4, top_p=1.5), r"top-p 1.5 must lie in \(0, 1\]"),
    (dict(n=4, top_k=0), "top-k 0 must be a positive integer"),
])
def test_bad_sampling_requests_are_one_line_errors(bad, message):
    model = make_prior("transformer", CodeGrid(2, 2, 1, 4))
    with pytest.raises(GeovqError, match=message) as err:
        model.sample(**bad)
    assert "\n" not in str(err.value)


def test_class_labels_are_required_exactly_when_conditioned():
    grid = CodeGrid(2, 2, 1, 4)
    with pytest.raises(GeovqError, match="class-conditional .* give labels"):
        make_prior("pixelcnn", grid, n_classes=3).sample(2)
    with pytest.raises(GeovqError, match="unconditional: give no labels"):
        make_prior("transformer", grid).sample(2, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(GeovqError, match=r"labels must be \(2,\) in \[0, 3\)"):
        make_prior("transformer", grid, n_classes=3).sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(GeovqError, match=r"codes must be \(N, 4\)"):
        make_prior("transformer", grid).log_prob(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(GeovqError, match=r"codes must lie in \[0, 4\), got \[0, 4\]"):
        make_prior("pixelcnn", grid).log_prob(torch.tensor([[0, 1, 2, 4]]))
    with pytest.raises(GeovqError, match="prior 'gpt' is unknown; valid: transformer, pixelcnn"):
        build_prior({"kind": "gpt", "grid": grid.as_dict(), "n_classes": 0, "model": {}})


def test_unigram_prior_is_the_product_of_position_marginals():
    grid = CodeGrid(1, 3, 1, 4)
    codes = np.array([[0, 1, 3], [0, 2, 3], [1, 1, 3], [0, 1, 2]])
    prior = UnigramPrior(grid, codes, alpha=1.0)
    counts = np.array([[3, 1, 0, 0], [0, 3, 1, 0], [0, 0, 1, 3]]) + 1.0
    expected = np.log(counts / counts.sum(1, keepdims=True))
    query = torch.tensor([[0, 1, 3], [3, 0, 0]])
    want = [expected[0, 0] + expected[1, 1] + expected[2, 3], expected[0, 3] + expected[1, 0] + expected[2, 0]]
    np.testing.assert_allclose(prior.log_prob(query).numpy(), want, rtol=1e-6)
    draws = prior.sample(40_000, generator=torch.Generator().manual_seed(0)).numpy()
    freq = np.stack([np.bincount(draws[:, t], minlength=4) / len(draws) for t in range(3)])
    np.testing.assert_allclose(freq, np.exp(expected), atol=0.01)


def test_prior_settings_import_no_torch_and_have_per_dataset_defaults():
    import subprocess
    import sys

    code = ("import sys, geovq.models.priors.settings as s; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(s.prior_config('mnist', 'transformer', seed=3).train.seed)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr
    from geovq.models.priors.settings import prior_config

    assert prior_config("digits", "transformer").model["layers"] < prior_config("mnist", "transformer").model["layers"]
    with pytest.raises(GeovqError, match="prior 'gpt' is unknown"):
        prior_config("mnist", "gpt")


class Interrupt(Exception):
    pass


def crashing_progress(after: int):
    """A progress bar that raises after `after` steps: a training killed mid-way."""
    class Bar:
        def __init__(self, total, desc):
            self.done = 0

        def update(self, n):
            self.done += n
            if self.done > after:
                raise Interrupt

        def set_description(self, text):
            pass

        def close(self):
            pass

    return Bar


def test_an_interrupted_prior_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """Dropout on, so the resumed run must also restore torch's RNG; batches depend on (seed, epoch) only."""
    grid = CodeGrid(2, 2, 2, 5)
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 5, (300, 8)), rng.integers(0, 5, (50, 8))
    config = PriorConfig("transformer", {**SMALL["transformer"], "dropout": 0.2},
                         PriorTrainConfig(batch_size=32, max_steps=40, warmup_steps=5, eval_every=10, patience=100))
    whole, record = train_prior(config, grid, 0, train, None, val, None, tmp_path / "whole", no_progress, CPU)
    with pytest.raises(Interrupt):
        train_prior(config, grid, 0, train, None, val, None, tmp_path / "cut", crashing_progress(25), CPU)
    assert (tmp_path / "cut" / "state.pt").exists() and not (tmp_path / "cut" / "prior.pt").exists()
    resumed, resumed_record = train_prior(config, grid, 0, train, None, val, None, tmp_path / "cut", no_progress, CPU)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [c["step"] for c in resumed_record["val_curve"]] == [10, 20, 30, 40]
    assert resumed_record["val_curve"] == record["val_curve"]
    assert not (tmp_path / "cut" / "state.pt").exists()
    loaded = load_model(tmp_path / "cut" / "prior.pt", "prior", CPU)  # device-independent checkpoint
    codes = torch.as_tensor(val)
    torch.testing.assert_close(loaded.log_prob(codes), resumed.log_prob(codes))


# -- the stages on real digits units -----------------------------------------------------------------------

def build_unit(root, method: str, finetune: bool = False):
    """A digits unit (K = 16) of the tests' tiny configuration built by the stage functions: its VAE if post-hoc,
    then fit/train, encode, score (no prior: the tests train their own)."""
    from conftest import tiny_config
    from geovq.stages.common import load_splits
    from geovq.stages.rundir import RunDir
    from geovq.stages.run import run_unit, run_vae
    from geovq.stages.units import plan_units

    cfg = tiny_config([method], finetune_decoder=finetune, finetune_epochs=1)
    run = RunDir(root)
    data = load_splits(cfg)
    (unit,) = plan_units(cfg)
    if unit.vae is not None:
        run_vae(run, cfg, unit.vae, CPU, no_progress, data)
    run_unit(run, cfg, unit, CPU, no_progress, data)
    return run, cfg, data, unit


@pytest.fixture(scope="module")
def vqvae_unit(quick_run, tmp_path_factory):
    """The main job's VQ-VAE at K = 16 (digits trunk, 20 epochs, its Transformer prior and the domain classifier
    trained by the sweep), in a copy of that run: its samples come close to the test images (domain FID)."""
    import shutil

    from geovq.config import SweepConfig
    from geovq.stages.common import load_splits
    from geovq.stages.rundir import RunDir
    from geovq.stages.units import plan_units

    root = tmp_path_factory.mktemp("vqvae") / "run"
    shutil.copytree(quick_run, root)  # the tests add samples and a unigram prior: not to the shared run
    cfg = SweepConfig.load(root / "config.yaml")
    (unit,) = [u for u in plan_units(cfg) if u.method == "vqvae" and u.n_codes == 16]
    return RunDir(root), cfg, load_splits(cfg), unit


def test_prior_samples_beat_the_unigram_baseline_on_domain_fid(vqvae_unit):
    """The trained prior's samples, decoded through the unit's codebook and decoder, are closer to the test
    images in the domain classifier's feature space than samples of independent position marginals, by more
    than the spread over 3 sampling seeds."""
    from geovq.stages.prior import prior_stage, sample_stage, unit_grid

    run, cfg, data, unit = vqvae_unit
    result = prior_stage(run, cfg, unit, CPU, no_progress, "transformer", data=data)
    assert json.loads((run.prior(unit, "transformer") / "prior.json").read_text()) == result
    assert result["prior_bits_per_image"] < result["unigram_bits_per_image"] < result["fixed_bits_per_image"] == 64
    assert result["prior_bits_per_image"] == pytest.approx(16 * result["prior_bits_per_token"])
    unigram = UnigramPrior(unit_grid(cfg, unit), np.load(run.codes(unit, "train")))
    n = 2000  # the stage's default is 10k; 2000 keep the test fast and the seed spread well below the margin
    prior_fid, unigram_fid = [], []
    for seed in range(3):
        s = sample_stage(run, cfg, unit, CPU, no_progress, n=n, seed=seed, data=data)
        prior_fid.append(s["domain_fid"])
        unigram_fid.append(sample_stage(run, cfg, unit, CPU, no_progress, n=n, seed=seed, data=data,
                                        prior=unigram)["domain_fid"])
    assert s["classifier_test_accuracy"] >= 0.9 and s["decoder"] == "end_to_end" and s["n_samples"] == n
    assert s["fid"] is None and "not computed" in s["fid_reason"]  # no Inception weights on this machine
    assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1 and s["pr_points"] == len(data.test)
    spread = max(max(prior_fid) - min(prior_fid), max(unigram_fid) - min(unigram_fid))
    assert min(unigram_fid) - max(prior_fid) > spread, (prior_fid, unigram_fid)
    out = run.prior(unit, "transformer") / "samples-n2000-t1-k0-p1-seed2"
    assert {p.name for p in out.iterdir()} == {"samples.png", "samples.npz", "samples.json"}
    assert (run.prior(unit, "unigram") / "samples-n2000-t1-k0-p1-seed2" / "samples.json").exists()
    with np.load(out / "samples.npz") as f:
        assert f["codes"].shape == (n, 16) and f["images"].shape == (n, 1, 16, 16) and f["images"].dtype == np.uint8


def test_class_conditional_samples_decode_through_the_fine_tuned_decoder(tmp_path):
    """A post-hoc unit with a fine-tuned decoder: its samples go through the quantizer's codebook and the
    fine-tuned decoder (not the VAE's), and conditional samples carry labels drawn from the training classes."""
    from geovq.stages.common import decode_grids
    from geovq.stages.prior import prior_stage, sample_stage

    run, cfg, data, unit = build_unit(tmp_path, "kmeans", finetune=True)
    config = PriorConfig("transformer", SMALL["transformer"], PriorTrainConfig(max_steps=20, eval_every=10),
                         conditional=True)
    result = prior_stage(run, cfg, unit, CPU, no_progress, "transformer", conditional=True, data=data, config=config)
    assert result["prior_conditional"] and result["prior_steps"] == 20
    out = tmp_path / "samples"
    s = sample_stage(run, cfg, unit, CPU, no_progress, n=50, conditional=True, top_k=4, seed=1, out=out, data=data,
                     metrics=False)
    assert s["decoder"] == "finetuned" and s["prior_conditional"] and "domain_fid" not in s
    with np.load(out / "samples.npz") as f:
        codes, labels, images = f["codes"], f["labels"], f["images"]
    assert set(labels) <= set(data.train_labels) and len(set(labels)) > 1
    from geovq.quantize.base import Quantizer

    quantizer = Quantizer.load(run.unit(unit) / "quantizer.npz")
    tuned = load_model(run.unit(unit) / "decoder_finetuned.pt", "decoder", CPU)
    expected = decode_grids(tuned, quantizer.layout_.tokens_to_grid(quantizer.decode(codes)), CPU)
    np.testing.assert_array_equal(images, (expected * 255).round().to(torch.uint8).numpy())
    vae = load_model(run.vae(unit.vae) / "model.pt", "vae", CPU)
    untuned = decode_grids(vae.decoder, quantizer.layout_.tokens_to_grid(quantizer.decode(codes)), CPU)
    assert not torch.allclose(untuned, expected)  # the fine-tuned decoder really is another one


def test_prior_and_sample_stages_refuse_a_unit_without_codes_or_prior(vqvae_unit):
    from dataclasses import replace

    from geovq.stages.prior import prior_stage, sample_stage

    run, cfg, data, unit = vqvae_unit
    other = replace(unit, seed=5)
    with pytest.raises(GeovqError, match="has no saved train, val, test codes"):
        prior_stage(run, cfg, other, CPU, no_progress, data=data)
    with pytest.raises(GeovqError, match="has no trained pixelcnn prior"):
        sample_stage(run, cfg, unit, CPU, no_progress, n=10, kind="pixelcnn", data=data)
    with pytest.raises(GeovqError, match="prior 'gpt' is unknown"):
        prior_stage(run, cfg, unit, CPU, no_progress, "gpt", data=data)
