"""TDC: multiplier updates against hand-computed sequences, token weights, the loss, state, per-token KL."""

import math

import numpy as np
import pytest
import torch

from geovq.errors import GeovqError
from geovq.latents import LatentSet, TokenLayout
from geovq.training.tdc import TDCController, token_kl_bits

torch.set_num_threads(1)
F = 1.01  # the default factor


def batch(*kl: float) -> torch.Tensor:
    """One image whose tokens have the given KLs (bits)."""
    return torch.tensor([kl], dtype=torch.float64)


def lambdas(tdc: TDCController) -> tuple[float, float, float]:
    return tdc.lam, tdc.lam_min, tdc.lam_max


def assert_lambdas(tdc: TDCController, lam: float, lam_min: float, lam_max: float) -> None:
    assert lambdas(tdc) == pytest.approx((lam, lam_min, lam_max), rel=1e-12)


def test_hand_computed_sequence():
    # T = 8, band [7.5, 8.5]; every λ starts at 1.
    tdc = TDCController(target_bits=8.0)
    assert lambdas(tdc) == (1.0, 1.0, 1.0)
    tdc.update(batch(9.0, 10.0))  # mean > T, max > T+τ, min inside the band: λ_min would rise, clipped at 1
    assert_lambdas(tdc, F, 1.0, F)
    tdc.update(batch(9.0, 8.0))  # mean 8.5 > T, max 9 > T+τ
    assert_lambdas(tdc, F**2, 1.0, F**2)
    tdc.update(batch(7.0, 8.2))  # mean 7.6 < T; max inside -> λ_max DEcreases; min < T−τ -> λ_min falls
    assert_lambdas(tdc, F, 1 / F, F)
    tdc.update(batch(8.0, 8.0))  # mean == T is not "> T": λ falls; max/min inside the band
    assert_lambdas(tdc, 1.0, 1.0, 1.0)
    tdc.update(batch(5.0, 12.0))  # both tails at once, mean 8.5 > T
    assert_lambdas(tdc, F, 1 / F, F)
    tdc.update(batch(6.0, 6.0))  # mean < T, max inside: λ_max falls to its floor
    assert_lambdas(tdc, 1.0, 1 / F**2, 1.0)
    tdc.update(batch(6.0, 6.0))  # λ_max stays clipped at 1, λ is not clipped
    assert_lambdas(tdc, 1 / F, 1 / F**3, 1.0)


def test_lambda_max_decreases_when_no_token_is_above_the_band():
    # The reference code once had a no-op here: λ_max must come down, not stay put.
    tdc = TDCController(target_bits=8.0, lam_max=2.0)
    tdc.update(batch(8.5, 8.5))  # max == T+τ is not "> T+τ"
    assert tdc.lam_max == pytest.approx(2.0 / F, rel=1e-12)
    tdc.update(batch(3.0))
    assert tdc.lam_max == pytest.approx(2.0 / F**2, rel=1e-12)


def test_band_edges_are_strict():
    tdc = TDCController(target_bits=8.0, lam_min=0.5)
    tdc.update(batch(7.5, 8.5))  # mean == T: λ falls; min == T−τ: λ_min rises; max == T+τ: λ_max falls (to 1)
    assert_lambdas(tdc, 1 / F, 0.5 * F, 1.0)


def test_clipping_bounds():
    tdc = TDCController(target_bits=4.0, factor=1.5, lam_min=0.0012, lam_max=800.0)
    tdc.update(batch(0.0, 20.0))  # max far above, min far below: both tails hit their bounds
    assert (tdc.lam_min, tdc.lam_max) == (1e-3, 1e3)  # 0.0012/1.5 = 0.0008 -> 1e-3, 800·1.5 = 1200 -> 1e3
    assert tdc.lam == 1.5  # mean 10 > T
    tdc.update(batch(0.0, 20.0))
    assert (tdc.lam_min, tdc.lam_max, tdc.lam) == (1e-3, 1e3, 2.25)  # pinned at the bounds; λ keeps going
    tdc.update(batch(4.0))  # both tails now inside: λ_min rises from its floor, λ_max falls from its ceiling
    assert_lambdas(tdc, 1.5, 1.5e-3, 1e3 / 1.5)


def test_lambda_is_unclipped():
    tdc = TDCController(target_bits=2.0)
    for _ in range(1000):
        tdc.update(batch(5.0))
    assert tdc.lam == pytest.approx(F**1000, rel=1e-9) and tdc.lam > 2e4
    assert tdc.lam_max == 1e3


def test_update_uses_all_tokens_of_the_batch():
    # mean over 2 images × 2 tokens is 7.75 < T although image 0 alone has mean 9; max lives in image 0.
    tdc = TDCController(target_bits=8.0)
    tdc.update(torch.tensor([[9.0, 9.0], [6.5, 6.5]]))
    assert_lambdas(tdc, 1 / F, 1 / F, F)


def test_token_weights():
    tdc = TDCController(target_bits=8.0, lam_min=0.5, lam_max=3.0)
    kl = torch.tensor([[7.4, 7.5, 8.0, 8.5, 8.6]], requires_grad=True)
    w = tdc.token_weights(kl)
    assert not w.requires_grad
    assert w.tolist() == [[0.5, 1.0, 1.0, 1.0, 3.0]]


def test_loss_value_and_gradient_by_hand():
    tdc = TDCController(target_bits=8.0, lam=2.0, lam_min=0.5, lam_max=3.0)
    kl = torch.tensor([[9.0, 8.0], [7.0, 8.2]], dtype=torch.float64, requires_grad=True)
    loss = tdc.loss(kl)
    # weights [[3, 1], [0.5, 1]]: image sums 27 + 8 = 35 and 3.5 + 8.2 = 11.7, mean 23.35; × 0.1 × λ = 4.67
    assert loss.item() == pytest.approx(4.67, rel=1e-12)
    loss.backward()
    # the weights are constants, so d loss / d KL = 0.1 · λ · w / images
    np.testing.assert_allclose(kl.grad.numpy(), [[0.3, 0.1], [0.05, 0.1]], rtol=1e-12)


def test_loss_rejects_flat_input():
    with pytest.raises(GeovqError, match="images, tokens"):
        TDCController(target_bits=8.0).loss(torch.ones(4))


def test_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    tdc = TDCController(target_bits=6.0, tolerance=0.25, factor=1.02)
    for kl in (batch(9.0, 3.0), batch(7.0), batch(6.1, 6.2)):
        tdc.update(kl)
    torch.save({"tdc": tdc.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tdc"]
    resumed = TDCController(target_bits=6.0, tolerance=0.25, factor=1.02)
    resumed.load_state_dict(state)
    assert resumed == tdc and lambdas(resumed) != (1.0, 1.0, 1.0)
    with pytest.raises(GeovqError, match="target_bits"):
        TDCController(target_bits=8.0, tolerance=0.25, factor=1.02).load_state_dict(state)


@pytest.mark.parametrize("kwargs, bad", [({"target_bits": 0.0}, "T=0.0"), ({"target_bits": 8, "factor": 1.0}, "f=1.0"),
                                         ({"target_bits": 8, "tolerance": -0.5}, "τ=-0.5")])
def test_bad_settings_are_rejected(kwargs, bad):
    with pytest.raises(GeovqError, match=bad):
        TDCController(**kwargs)


@pytest.mark.parametrize("token_dim", [1, 2, 3, 6])
@pytest.mark.parametrize("grouping", ["contiguous", "interleaved"])
def test_token_kl_bits_agrees_with_latent_set(token_dim, grouping):
    rng = np.random.default_rng(token_dim)
    mu = torch.tensor(rng.normal(size=(3, 6, 2, 4)), requires_grad=True)  # (B, C, h, w) as the encoder emits
    logvar = torch.tensor(rng.uniform(-3, 1, size=(3, 6, 2, 4)))
    layout = TokenLayout(height=2, width=4, channels=6, token_dim=token_dim, grouping=grouping)
    kl = token_kl_bits(mu, logvar, layout)
    latents = LatentSet(mu.detach().permute(0, 2, 3, 1).numpy(), logvar.permute(0, 2, 3, 1).numpy(), layout)
    assert kl.shape == (3, layout.tokens_per_image)
    np.testing.assert_allclose(kl.detach().numpy(), latents.token_kl_bits().reshape(3, -1), rtol=1e-12)
    kl.sum().backward()  # differentiable: ∂KL/∂μ = μ / ln 2 for every channel
    np.testing.assert_allclose(mu.grad.numpy(), mu.detach().numpy() / math.log(2), rtol=1e-12)


def test_token_kl_bits_rejects_a_grid_that_does_not_match_the_layout():
    layout = TokenLayout(height=2, width=2, channels=4, token_dim=2)
    with pytest.raises(GeovqError, match=r"\(B, 4, 2, 2\)"):
        token_kl_bits(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), layout)  # channels-last by mistake
