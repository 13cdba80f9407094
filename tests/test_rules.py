"""Four rules of the method that no other test guards directly (issue 25, item 2). Each test is aimed at its
rule, so that breaking the rule fails it with a message that names the rule, not a pinned number downstream:

1. every post-hoc quantizer is fitted on the training latents only;
2. a prior is early-stopped on the validation codes and never sees a test code before its final scoring;
3. the in-context medoid update of the geodesic quantizer measures each candidate in the member's OWN image;
4. a row's rate is tokens × log2 K bits per image with tokens = grid cells × C/d, also for d < C.

Rules 1 and 4 run the real stages on the tiny digits trunk of test_stages (one plain VAE, trained once for
the module); rule 2 runs the real prior stage on synthetic codes; rule 3 calls the medoid update on a toy
decoder whose in-context distances have a closed form.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geovq.data import ImageSplits
from geovq.latents import LatentSet
from geovq.stages.common import no_progress
from geovq.stages.rundir import RunDir
from geovq.stages.units import VaeSpec, plan_units
from conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plain_vae(tmp_path_factory) -> tuple[RunDir, ImageSplits, VaeSpec]:
    """A run directory with one finished tiny plain VAE (trained, its three splits' latents extracted)."""
    from geovq.stages.common import load_splits
    from geovq.stages.run import run_vae

    cfg = tiny_config(["kmeans"])
    run = RunDir(tmp_path_factory.mktemp("rules"))
    data = load_splits(cfg)
    spec = VaeSpec("plain", 0)
    run_vae(run, cfg, spec, CPU, no_progress, data)
    return run, data, spec


# -- 1. post-hoc quantizers are fitted on the training latents only ------------------------------------------

def posthoc_methods() -> list[str]:
    """Every post-hoc method geovq registers (the test plugins' toy methods aside)."""
    from geovq.quantize import QUANTIZERS

    return sorted(name for name, cls in QUANTIZERS.items() if cls.__module__.startswith("geovq.quantize."))


class FitReached(Exception):
    """Raised by the spy once it has recorded what `_fit` received: the fit itself is other tests' business."""


@pytest.mark.parametrize("method", posthoc_methods())
def test_every_posthoc_quantizer_is_fitted_on_the_training_latents_only(plain_vae, method, monkeypatch):
    """run_unit (what a sweep's trial runs; a search's trial calls the same fit_stage) down to the method's own
    `_fit`: the latents it receives are exactly the VAE's latents_train.npz cut into the unit's tokens, and
    neither split the unit is scored or selected on."""
    from geovq.quantize import get_quantizer_class
    from geovq.stages.run import run_unit

    run, data, spec = plain_vae
    cfg = tiny_config([method])
    (unit,) = plan_units(cfg)
    assert unit.vae == spec  # the module's VAE: no training here
    qcls = get_quantizer_class(method)
    received: list[LatentSet] = []

    def spy(self, latents: LatentSet, **options) -> None:
        received.append(latents)
        raise FitReached

    monkeypatch.setattr(qcls, "_fit", spy)  # the method's own fit, below the base class's `fit`
    with pytest.raises(FitReached):
        run_unit(run, cfg, unit, CPU, no_progress, data)
    assert len(received) == 1, f"{method}: _fit called {len(received)} times"
    (seen,) = received
    splits = {s: LatentSet.load(run.latents(spec, s)).with_tokens(unit.token_dim, unit.grouping)
              for s in ("train", "val", "test")}
    assert (seen.n_images, splits["train"].n_images) == (len(data.train), len(data.train)), (
        f"{method} was fitted on {seen.n_images} images; the training split has {len(data.train)} "
        f"(val {len(data.val)}, test {len(data.test)})")
    assert seen.layout == splits["train"].layout
    np.testing.assert_array_equal(seen.token_mu, splits["train"].token_mu,
                                  err_msg=f"{method} was not fitted on the training latents")
    np.testing.assert_array_equal(seen.token_logvar, splits["train"].token_logvar)
    for other in ("val", "test"):  # the check has teeth: the other splits' latents are different arrays
        assert splits[other].n_images != seen.n_images or not np.array_equal(splits[other].mu, seen.mu)


# -- 2. priors: early stopping on validation codes, test codes only in the final scoring ---------------------

def split_codes(rng: np.random.Generator, n: int, p_zero: float, k: int = 16) -> np.ndarray:
    """(n, 16) codes: tokens 0-7 uniform on [0, k) (they make every row of every split unique, so a batch says
    which split it came from), tokens 8-15 code 0 with probability p_zero, else uniform on [1, k)."""
    head = rng.integers(0, k, (n, 8))
    tail = np.where(rng.random((n, 8)) < p_zero, 0, rng.integers(1, k, (n, 8)))
    return np.concatenate([head, tail], axis=1)


def test_a_prior_stops_on_validation_codes_and_sees_test_codes_only_when_scored(tmp_path, monkeypatch):
    """The real prior stage on synthetic codes whose best-validation step differs from their best-test step.

    Training and test codes share a marginal (code 0 with probability 0.9 on tokens 8-15); validation codes
    have 0.4. From its near-uniform start the prior's p(0) climbs towards 0.9: the validation NLL turns up on
    the way (past p(0) = 0.4), while the test NLL keeps falling. A spy on `Prior.token_nll` records every batch any
    prior is shown, and at each validation pass measures the same weights on the test codes aside (not
    through the spy), to know which step a test-selected checkpoint would have been."""
    import geovq.stages.prior as prior_module
    from geovq.models.priors.base import Prior
    from geovq.models.priors.settings import PriorConfig, PriorTrainConfig
    from geovq.stages.common import load_splits
    from geovq.stages.prior import prior_stage
    from geovq.training.checkpoint import load_model
    from geovq.training.prior import LN2

    cfg = tiny_config(["kmeans"])
    data = load_splits(cfg)
    (unit,) = plan_units(cfg)
    assert cfg.layout.tokens_per_image == 16 and unit.n_codes == 16
    run = RunDir(tmp_path)
    rng = np.random.default_rng(0)
    codes = {"train": split_codes(rng, len(data.train), 0.9), "val": split_codes(rng, len(data.val), 0.4),
             "test": split_codes(rng, len(data.test), 0.9)}
    owner: dict[bytes, str] = {}
    for split, rows in codes.items():
        run.codes(unit, split).parent.mkdir(parents=True, exist_ok=True)
        np.save(run.codes(unit, split), rows.astype(np.int32))
        owner.update((row.tobytes(), split) for row in rows.astype(np.int64))
    assert len(owner) == sum(len(rows) for rows in codes.values())  # every row names its split

    phase = {"now": "before training"}
    seen: list[tuple[str, str, bool, list[str]]] = []  # (phase, prior class, train mode, split of each row)
    test_curve: list[float] = []  # test bits/token of the weights at each validation pass
    test_codes = torch.as_tensor(codes["test"])
    original = Prior.token_nll

    def spy(self: Prior, batch: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        splits = [owner.get(row.tobytes(), "unknown") for row in batch.cpu().numpy().astype(np.int64)]
        seen.append((phase["now"], type(self).__name__, self.training, splits))
        if phase["now"] == "training" and not self.training and set(splits) == {"val"}:
            with torch.no_grad():
                test_curve.append(float(original(self, test_codes).mean()) / LN2)
        return original(self, batch, labels)

    def train_prior(*args, **kwargs):  # marks where training and selection end and the scoring begins
        phase["now"] = "training"
        out = real_train_prior(*args, **kwargs)
        phase["now"] = "scoring"
        return out

    real_train_prior = prior_module.train_prior
    monkeypatch.setattr(Prior, "token_nll", spy)
    monkeypatch.setattr(prior_module, "train_prior", train_prior)
    config = PriorConfig("transformer", {"layers": 1, "heads": 2, "dim": 32, "dropout": 0.0},
                         PriorTrainConfig(batch_size=64, lr=5e-3, max_steps=200, warmup_steps=5, eval_every=2,
                                          patience=4))
    result = prior_stage(run, cfg, unit, CPU, no_progress, "transformer", data=data, config=config)

    # what the prior saw: training batches of training codes, validation passes of validation codes, and the
    # test codes only after train_prior returned (the scoring; the unigram baseline is scored there too)
    assert {s for entry in seen for s in entry[3]} <= {"train", "val", "test"}
    training = [entry for entry in seen if entry[0] == "training"]
    assert all(entry[1] == "TransformerPrior" for entry in training)
    leaked = sum(1 for phase_, _, _, splits in seen if phase_ != "scoring" and "test" in splits)
    assert leaked == 0, f"the prior saw test codes before its final scoring ({leaked} batches)"
    assert all(set(splits) == {"train"} for _, _, train_mode, splits in training if train_mode)
    passes = [splits for _, _, train_mode, splits in training if not train_mode]
    assert passes, "no validation pass during training"
    off = [sorted(set(splits)) for splits in passes if sorted(splits) != ["val"] * len(data.val)]
    assert not off, f"early stopping is not measured on the validation codes: {len(off)} passes over {off[0]}"
    scored = [splits for phase_, kind, _, splits in seen if phase_ == "scoring" and kind == "TransformerPrior"]
    assert scored == [["test"] * len(data.test)]  # scored once, on every test code

    # which weights were kept: the best on validation (not the last, not the best on test)
    curve = result["prior_val_curve"]
    steps = np.array([point["step"] for point in curve])
    val_bits = np.array([point["val_bits_per_token"] for point in curve])
    assert len(test_curve) == len(curve) == len(passes)
    best_val, best_test = int(np.argmin(val_bits)), int(np.argmin(test_curve))
    assert best_test > best_val and steps[best_val] < result["prior_steps"]  # the construction works
    assert result["prior_best_step"] == steps[best_val]
    assert result["prior_val_bits_per_token"] == pytest.approx(val_bits[best_val], rel=1e-12)
    assert result["prior_bits_per_token"] == pytest.approx(test_curve[best_val], rel=1e-6), (
        "the scored prior is not the best-validation checkpoint")
    assert result["prior_bits_per_token"] > test_curve[best_test] * (1 + 1e-4)  # test selection would differ
    kept = load_model(run.prior(unit, "transformer") / "prior.pt", "prior", CPU)
    with torch.no_grad():
        kept_val = float(original(kept.eval(), torch.as_tensor(codes["val"])).mean()) / LN2
    assert kept_val == pytest.approx(val_bits[best_val], rel=1e-6)
    # stopped early: `patience` validation passes without improvement after the best
    assert result["prior_early_stopped"]
    assert result["prior_steps"] == steps[best_val] + config.train.patience * config.train.eval_every


# -- 3. the in-context medoid update measures candidates in the member's own image ---------------------------

class ScaledToken:
    """μ-grids (B, 1, 2, 2) -> (B, 4): cell 0 is the signal token, scaled by exp(x) where x is channel 0 of
    cell 1 (the image's context), then cell 1 itself. Moving the signal token with its image's context fixed
    is linear with Jacobian s·I, s = exp(x): the curve from z to c in image n is straight, of length
    s_n ‖c − z‖ exactly."""

    dtype = torch.float64

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        signal, context = grids[:, 0, 0, :], grids[:, 0, 1, :]
        return torch.cat([torch.exp(context[:, :1]) * signal, context], dim=1)


def test_the_in_context_medoid_update_measures_each_candidate_in_the_members_own_image():
    """Cell 0 has three members on a line: A at 0 in an image of scale 10, B at 1 and C at 2 in images of scale
    1; its medoid is C. Measured in each member's own image, Σ_i s_i ‖c − z_i‖ is 3 for A, 11 for B, 21 for C:
    the medoid moves to A. Measured in the candidate's image, s_c Σ_i ‖c − z_i‖ is 30, 2, 3: it would move to
    B. Cell 1 (scale 1 throughout, medoid at an end) moves to its middle member under either rule."""
    from geovq.geometry.decoders import GridTokenDecoder
    from geovq.quantize import make_quantizer

    scales = np.array([10.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    signal = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0],  # cell 0: A, B, C
                       [0.0, 5.0], [0.5, 5.0], [3.0, 5.0]])  # cell 1
    grids = np.zeros((6, 1, 2, 2))
    grids[:, 0, 0] = signal
    grids[:, 0, 1, 0] = np.log(scales)  # each image's context sets its scale
    # one landmark per image: its signal token (channels 0, 1 of the flattened grid); the context is no node
    landmarks = GridTokenDecoder(ScaledToken(), grids, np.arange(6), np.tile([0, 1], (6, 1)))
    q = make_quantizer("geodesic", 2, decoder=ScaledToken(), update_sample=16, update_candidates=16)
    q.landmarks_, q.landmark_metrics_ = landmarks, None  # metrics measured on first use, in own images
    np.testing.assert_allclose(q._landmark_metrics(), scales[:, None, None] ** 2 * np.eye(2), rtol=1e-9)
    medoids, label = np.array([2, 5]), np.array([0, 0, 0, 1, 1, 1])

    own = np.array([[scales[m] * abs(signal[c, 0] - signal[m, 0]) for m in range(3)] for c in range(3)]).sum(1)
    theirs = np.array([scales[c] * sum(abs(signal[c, 0] - signal[m, 0]) for m in range(3)) for c in range(3)])
    np.testing.assert_allclose(own, [3, 11, 21])  # the closed forms the docstring states
    np.testing.assert_allclose(theirs, [30, 2, 3])

    moved, curves = q._update_medoids(medoids, label, np.random.default_rng(0))
    assert curves == 2 * 3 * 3  # every sampled member to every candidate, in each cell
    assert moved[0] == own.argmin() == 0, (
        f"cell 0's medoid moved to landmark {moved[0]} (1 = B: lengths measured in the candidate's image); "
        "measured in each member's own image it is A (0)")
    assert moved[1] == 4


# -- 4. the rate of a row with d < C -------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2])
def test_a_row_with_tokens_smaller_than_a_cell_is_rated_by_its_tokens(plain_vae, d):
    """A kmeans unit at token dim d < C (the sweep's --token-dim d), fitted, encoded and scored by run_unit:
    an image is h·w·C/d tokens of log2 K bits each, the grid read from the latents the VAE wrote, and bpp
    divides by the ORIGINAL image's pixels (digits: 8×8, upsampled to 16×16 for the trunk)."""
    from geovq.quantize import Quantizer
    from geovq.stages.run import run_unit

    run, data, spec = plain_vae
    cfg = tiny_config(["kmeans"], token_dim=d)
    (unit,) = plan_units(cfg)
    assert unit.vae == spec and unit.token_dim == d
    row = run_unit(run, cfg, unit, CPU, no_progress, data)

    n_test, h, w, channels = np.load(run.latents(spec, "test"))["mu"].shape
    assert channels == 4 and d < channels and data.native_hw == (8, 8)
    tokens = h * w * channels // d
    assert row.token_dim == d and row.K == unit.n_codes == 16
    assert row.tokens_per_image == tokens, f"{row.tokens_per_image} tokens per image, not h·w·C/d = {tokens}"
    assert row.bits_per_image == tokens * math.log2(16)
    assert row.bpp == pytest.approx(tokens * 4 / 64, rel=1e-12)
    assert json.loads((run.unit(unit) / "row.json").read_text()) == row.as_dict()  # the row the tables read
    codes = np.load(run.codes(unit, "test"))
    assert codes.shape == (n_test, tokens) == (len(data.test), tokens)
    assert codes.min() >= 0 and codes.max() < 16
    assert Quantizer.load(run.unit(unit) / "quantizer.npz").codebook_.shape == (16, d)
