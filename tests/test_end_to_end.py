"""The end-to-end baselines FSQ, LFQ and residual VQ (geovq.end_to_end, geovq.models.bottlenecks): one code of
log2 K bits per token, their rules, their options and search-space entries, and a sweep's rows with priors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from geovq.codec import HEADER_BYTES
from geovq.config import TrunkConfig, validate_tuned
from geovq.end_to_end import END_TO_END_METHODS, FSQMethod, end_to_end_method, split_params
from geovq.errors import GeovqError
from geovq.latents import TokenLayout
from geovq.models.vqvae import QuantizedAE
from geovq.search.space import parse_space
from geovq.training.checkpoint import END_TO_END_KINDS, load_model, save_checkpoint

TRUNK = TrunkConfig(in_channels=1, image_size=(16, 16), hidden=8, latent_channels=8, res_blocks=1)
BASELINES = ("fsq", "lfq", "rvq")


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("k, d", [(16, 8), (64, 4), (256, 8)])
def test_every_code_is_one_of_k_distinct_vectors_and_decodes_to_what_the_decoder_received(method, k, d):
    """K distinct code vectors (so a code carries exactly log2 K bits), the codes of a batch in [0, K), and
    code_vectors(codes) equal to the bottleneck's output: encode -> decode loses nothing beyond quantization."""
    torch.manual_seed(0)
    model = QuantizedAE(TRUNK, TokenLayout(4, 4, 8, d), end_to_end_method(method, k, 0))
    tokens = model.tokens(torch.rand(6, 1, 16, 16))  # (6, T, d)
    model.bottleneck.init_from(tokens.reshape(-1, d))
    model.train()
    model.bottleneck(tokens)  # residual VQ: k-means initialisation of its stages on a first training batch
    model.eval()
    with torch.no_grad():
        quantized, codes, _ = model.bottleneck(tokens)
        assert codes.shape == tokens.shape[:2] and codes.dtype == torch.int64
        assert 0 <= int(codes.min()) and int(codes.max()) < k
        torch.testing.assert_close(model.code_vectors(codes), quantized, rtol=1e-5, atol=1e-5)
        every = model.code_vectors(torch.arange(k).reshape(1, k))[0]  # (K, d)
        assert len(torch.unique(every.round(decimals=4), dim=0)) == k
        np.testing.assert_array_equal(model.encode_codes(torch.rand(2, 1, 16, 16)).shape, (2, 16 * 8 // d))


def test_fsq_levels_multiply_to_k_spread_evenly_and_a_wrong_product_is_refused():
    assert FSQMethod(256).level_list() == [8, 8, 4] and FSQMethod(16).level_list() == [4, 4]
    assert FSQMethod(128).level_list() == [8, 4, 4] and FSQMethod(1024).level_list() == [8, 8, 4, 4]
    for bits in range(1, 17):
        levels = FSQMethod(2**bits).level_list()
        assert math.prod(levels) == 2**bits and max(levels) <= 8 and max(levels) <= 2 * min(levels)
    assert FSQMethod(240, levels="8,6,5").validate().level_list() == [8, 6, 5]  # the paper's set, at its own K
    with pytest.raises(GeovqError, match="fsq levels='8,8,3' multiply to 192, not K=256"):
        FSQMethod(256, levels="8,8,3").validate()
    with pytest.raises(GeovqError, match="fsq at K=100: K must be a power of two"):
        FSQMethod(100).validate()
    with pytest.raises(GeovqError, match="integers >= 2"):
        FSQMethod(16, levels="4,x").validate()


def test_lfq_and_rvq_rates_are_exact_or_refused():
    rvq = end_to_end_method("rvq", 256, 0, {"stages": 4}.items())
    assert rvq.stage_codes() == 4 and rvq.bottleneck(8).n_codes == 256
    with pytest.raises(GeovqError, match="rvq stages=3 at K=256: .* valid stages: 1, 2, 4, 8"):
        end_to_end_method("rvq", 256, 0, {"stages": 3}.items())
    with pytest.raises(GeovqError, match="lfq at K=100: K must be a power of two"):
        end_to_end_method("lfq", 100, 0)
    assert end_to_end_method("lfq", 256, 0).bottleneck(8).n_codes == 256


def test_a_projection_is_counted_in_the_baseline_and_the_checkpoint_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    model = QuantizedAE(TRUNK, TokenLayout(4, 4, 8, 8), end_to_end_method("fsq", 256, 0)).eval()
    # FSQ at d = 8 with levels [8, 8, 4]: Linear(8 -> 3) in and Linear(3 -> 8) out
    assert sum(p.numel() for p in model.bottleneck.parameters()) == (8 * 3 + 3) + (3 * 8 + 8)
    save_checkpoint(tmp_path / "m.pt", "quantized_ae", model,
                    {"trunk": TRUNK.as_dict(), "layout": model.layout.as_dict(), "n_codes": 256,
                     "method": "fsq", "params": model.method.get_params()})
    back = load_model(tmp_path / "m.pt", END_TO_END_KINDS)
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(back.decode_codes(back.encode_codes(x)), model.decode_codes(model.encode_codes(x)))
    with pytest.raises(GeovqError, match="expected 'vae'"):
        load_model(tmp_path / "m.pt", "vae")
    save_checkpoint(tmp_path / "odd.pt", "quantized_ae", model,  # settings this geovq's FSQ does not take
                    {"trunk": TRUNK.as_dict(), "layout": model.layout.as_dict(), "n_codes": 256,
                     "method": "fsq", "params": {**model.method.get_params(), "temperature": 2.0}})
    with pytest.raises(GeovqError, match="odd.pt: its fsq settings do not match this geovq's"):
        load_model(tmp_path / "odd.pt")


def test_options_and_the_rules_of_a_sweep_derive_from_the_constructors():
    from geovq import cli

    cli._derived_parameters()
    derived = {v for v in cli._DERIVED.values() if v[0] in BASELINES}
    assert derived == {(m, name) for m in BASELINES for name in END_TO_END_METHODS[m].hyperparameters()}
    assert ("fsq", "levels") in derived and ("rvq", "stages") in derived
    cfg = tiny_config(["fsq"], [16], method_params={"fsq": {"levels": "2,8"}})
    assert cfg.method_params["fsq"] == {"levels": "2,8"}
    with pytest.raises(GeovqError, match="fsq levels='8,8' multiply to 64, not K=16"):
        tiny_config(["fsq"], [16], method_params={"fsq": {"levels": "8,8"}})
    with pytest.raises(GeovqError, match="rvq has no hyperparameter 'levels'"):
        tiny_config(["rvq"], [16], method_params={"rvq": {"levels": "4,4"}})
    with pytest.raises(GeovqError, match="lfq at K=20"):
        tiny_config(["lfq"], [20])


SPACE = {"bits": 64, "rate": {"token_dims": [8, 4, 2], "min_codes": 4, "max_codes": 256},
         "vqvae": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "vq.decay": 0.95},
         "methods": {"fsq": {}, "lfq": {"entropy_weight": {"low": 0.01, "high": 0.3}},
                     "rvq": {"stages": 2, "commitment": {"choices": [0.1, 0.5]}}}}


def test_a_space_tunes_their_hyperparameters_beside_the_end_to_end_training_and_keeps_to_their_rates():
    import optuna

    space = parse_space(SPACE, (4, 4, 8))
    assert space.method_names == ["vqvae", "fsq", "lfq", "rvq"]
    # 64 bits: d=8 with K=16, d=4 with K=4, d=2 with K=2**(64/64)=2 (below min_codes); rvq with 2 stages: K a square
    assert space.study("rvq", 64).rates == ((16, 8), (4, 4))
    assert space.study("rvq", 96).rates == ((64, 8),)  # d=4 would need K=8, which is no square
    with pytest.raises(GeovqError, match="rvq admits none of the rates of --bits 48 .*K=8 d=8.*valid stages: 1, 3"):
        space.study("rvq", 48)
    study = space.study("lfq", 64)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    candidate = study.candidate(study.sample(trial))
    # the vqvae: section's train.* act on LFQ, its vq.* only on the VQ-VAE; LFQ's own hyperparameter beside them
    assert set(candidate.params) == {"train.lr", "entropy_weight"} and candidate.vae is None
    settings, hyper = split_params(candidate.params.items())
    assert dict(settings) == {"train.lr": candidate.params["train.lr"]} and set(hyper) == {"entropy_weight"}
    cfg = tiny_config(["lfq"], [candidate.n_codes], token_dim=candidate.token_dim)
    validate_tuned(cfg, "lfq", candidate.record())
    with pytest.raises(GeovqError, match="lfq has no hyperparameter 'stages'"):
        validate_tuned(cfg, "lfq", {**candidate.record(), "params": {"stages": 2}})
    # --pareto: residual VQ's log2 K are the even ones, every K for FSQ
    pareto = space.study("rvq", None)
    assert pareto.distributions()["log2_codes"] == optuna.distributions.CategoricalDistribution([2, 4, 6, 8])
    assert isinstance(space.study("fsq", None).distributions()["log2_codes"], optuna.distributions.IntDistribution)
    with pytest.raises(GeovqError, match="the VQ-VAE's settings are training settings"):
        parse_space({**SPACE, "methods": {"vqvae": {}}}, (4, 4, 8))
    with pytest.raises(GeovqError, match="methods.rvq.stages: rvq stages=0"):
        parse_space({**SPACE, "methods": {"rvq": {"stages": 0}}}, (4, 4, 8))


def test_their_units_run_through_the_sweep_stages_with_priors_and_every_column(tmp_path):
    """fsq, lfq and rvq in one tiny in-process run: tokens × log2 K bits per image, every column (usage, dead
    codes, prior bits, coded bits, samples), parameters counted, and codes that the saved model reproduces."""
    from geovq.stages.common import load_splits, no_progress
    from geovq.stages.encode import unit_encoder
    from geovq.stages.rundir import RunDir
    from geovq.stages.run import run_unit
    from geovq.stages.units import plan_units

    cfg = tiny_config(list(BASELINES), [16], prior="transformer",
                      method_params={"rvq": {"stages": 4}, "fsq": {"levels": "2,8"}})
    run, data, cpu = RunDir(tmp_path), load_splits(cfg), torch.device("cpu")
    rows = {}
    for unit in plan_units(cfg):
        rows[unit.method] = run_unit(run, cfg, unit, cpu, no_progress, data).as_dict()
        codes = np.load(run.codes(unit, "test"))
        assert codes.min() >= 0 and codes.max() < 16
        np.testing.assert_array_equal(unit_encoder(run, cfg, unit, cpu)(data.test), codes)
    assert {r["bits_per_image"] for r in rows.values()} == {cfg.tokens_per_image * 4} == {16 * 4}
    for method in BASELINES:
        r = rows[method]
        assert r["vae"] is None and r["params"] == cfg.method_params.get(method, {})
        assert 1 <= r["usage_perplexity"] <= 16 and 0 <= r["dead_codes"] < 16
        assert math.isfinite(r["prior_bits_per_image"]) and (r["prior_bits_per_image"] > 0) == (r["dead_codes"] < 15)
        assert r["sample_decoder"] == "end_to_end" and r["coded_bits_per_image"] >= 8 * HEADER_BYTES
        assert r["parameters"] > r["quantizer_parameters"] >= 0
    assert rows["fsq"]["quantizer_parameters"] == (4 * 2 + 2) + (2 * 4 + 4)  # d = C = 4 at --tiny, 2 levels
    assert rows["rvq"]["quantizer_parameters"] == 0  # EMA codebooks: running averages, not trained parameters
