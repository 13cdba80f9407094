import numpy as np
import pytest
import torch

from geovq.errors import GeovqError
from geovq.latents import LatentSet, TokenLayout


@pytest.mark.parametrize("grouping", ["contiguous", "interleaved"])
def test_token_layout_round_trip_and_channel_groups(grouping):
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(3, 2, 3, 8)).astype(np.float32)
    lay = TokenLayout(2, 3, 8, 2, grouping)
    tokens = lay.grid_to_tokens(grid)
    assert tokens.shape == (3, 2 * 3 * 4, 2)
    np.testing.assert_array_equal(lay.tokens_to_grid(tokens), grid)
    # token (image 1, row 1, col 2, group 3) holds exactly the expected channels
    t = (1 * 3 + 2) * 4 + 3
    channels = [6, 7] if grouping == "contiguous" else [3, 7]
    np.testing.assert_array_equal(tokens[1, t], grid[1, 1, 2, channels])


@pytest.mark.parametrize("grouping", ["contiguous", "interleaved"])
def test_torch_token_order_matches_numpy_layout(grouping):
    lay = TokenLayout(2, 2, 6, 3, grouping)
    z = torch.randn(4, 6, 2, 2, requires_grad=True)  # channels-first, as the conv encoder emits
    t = lay.grid_to_tokens(z.permute(0, 2, 3, 1))
    np.testing.assert_allclose(t.detach().numpy(), lay.grid_to_tokens(z.detach().permute(0, 2, 3, 1).numpy()))
    torch.testing.assert_close(lay.tokens_to_grid(t).permute(0, 3, 1, 2), z)
    # a permutation: each output value has exactly one source, so the gradient of a sum is all ones
    lay.tokens_to_grid(t).sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    # flat positions address the same channels in a grid flattened to h·w·C
    flat = z.detach().permute(0, 2, 3, 1).reshape(4, -1).numpy()
    positions = lay.flat_positions(np.arange(lay.tokens_per_image))
    np.testing.assert_array_equal(flat[:, positions], t.detach().numpy())


def test_latent_set_token_metadata_and_kl():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(2, 2, 2, 4))
    logvar = rng.normal(size=(2, 2, 2, 4)) * 0.3
    ls = LatentSet.from_grids(mu, logvar, token_dim=2)
    assert ls.n_tokens == 2 * 4 * 2
    # token 13 = image 1, cell index 2 -> (row 1, col 0), group 1
    assert ls.image_index[13] == 1 and tuple(ls.cell[13]) == (1, 0) and ls.group[13] == 1
    np.testing.assert_allclose(ls.token_mu[13], mu[1, 1, 0, 2:4], rtol=1e-6)
    # KL of N(mu, sigma^2) to N(0,1) in bits, via torch.distributions as an independent reference
    q = torch.distributions.Normal(torch.tensor(mu[1, 1, 0, 2:4]), torch.exp(0.5 * torch.tensor(logvar[1, 1, 0, 2:4])))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / np.log(2)
    assert ls.token_kl_bits()[13] == pytest.approx(float(ref), rel=1e-5)
    # the grid view puts that token at (image 1, row 1, col 0, group 1), for both groupings
    assert ls.token_kl_bits_grid()[1, 1, 0, 1] == pytest.approx(float(ref), rel=1e-5)
    interleaved = LatentSet.from_grids(mu, logvar, token_dim=2, grouping="interleaved")
    q = torch.distributions.Normal(torch.tensor(mu[0, 0, 1, 1::2]), torch.exp(0.5 * torch.tensor(logvar[0, 0, 1, 1::2])))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / np.log(2)
    assert interleaved.token_kl_bits_grid()[0, 0, 1, 1] == pytest.approx(float(ref), rel=1e-5)


def test_latent_set_rejects_nan_and_bad_layout(tmp_path):
    mu = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(GeovqError, match="NaN"):
        LatentSet.from_grids(mu + np.nan, mu)
    with pytest.raises(GeovqError, match="must divide"):
        LatentSet.from_grids(mu, mu, token_dim=3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(GeovqError, match="not a geovq latent file"):
        LatentSet.load(tmp_path / "junk.npz")


def test_latent_set_save_load(tmp_path):
    ls = LatentSet.from_grids(np.ones((2, 1, 1, 4)), np.zeros((2, 1, 1, 4)), 2, "interleaved")
    ls.save(tmp_path / "l.npz")
    back = LatentSet.load(tmp_path / "l.npz")
    assert back.layout == ls.layout
    np.testing.assert_array_equal(back.mu, ls.mu)
