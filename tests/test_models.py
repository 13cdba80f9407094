import pickle

import numpy as np
import pytest
import torch

from geovq.errors import GeovqError
from geovq.config import TrunkConfig, VQConfig
from geovq.latents import TokenLayout
from geovq.models.vae import GaussianVAE
from geovq.models.vqvae import VQVAE, EMACodebook
from geovq.training.checkpoint import load_model, save_checkpoint

TRUNK = TrunkConfig(in_channels=1, image_size=(16, 16), hidden=16, latent_channels=4, res_blocks=1)


def test_trunk_shapes_and_grid():
    vae = GaussianVAE(TRUNK)
    x = torch.rand(3, 1, 16, 16)
    mu, logvar = vae.encode(x)
    assert mu.shape == (3, 4, 4, 4) == logvar.shape and TRUNK.grid == (4, 4)
    assert vae.decoder.mean(mu).shape == x.shape


def test_vae_loss_is_nll_plus_beta_kl_per_image():
    torch.manual_seed(0)
    vae = GaussianVAE(TRUNK).eval()  # eval: z = mu, so the loss is deterministic
    x = torch.rand(5, 1, 16, 16)
    out = vae.loss(x, "bce", beta=0.5)
    mu, logvar = vae.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    nll = torch.nn.functional.binary_cross_entropy(vae.decoder.mean(mu), x, reduction="sum") / 5
    torch.testing.assert_close(out["kl"], kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["nll"], nll, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["loss"], nll + 0.5 * kl, rtol=1e-4, atol=1e-3)


def test_ema_update_matches_hand_computation_and_restarts_dead_codes():
    cb = EMACodebook(3, 2, decay=0.5, dead_threshold=0.3)
    cb.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    cb.embed_sum.copy_(cb.embedding)
    cb.cluster_size.fill_(1.0)
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    codes = cb.nearest(flat)
    assert codes.tolist() == [0, 0, 1]
    restarted = cb.ema_update(flat, codes)
    # cluster sizes: 0.5*1 + 0.5*[2, 1, 0] = [1.5, 1.0, 0.5]; none below 0.3
    torch.testing.assert_close(cb.cluster_size, torch.tensor([1.5, 1.0, 0.5]))
    assert restarted == 0
    expected_sum0 = 0.5 * torch.tensor([0.0, 0.0]) + 0.5 * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(cb.embed_sum[0], expected_sum0)
    n, eps = 3.0, cb.eps
    smoothed0 = (1.5 + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(cb.embedding[0], expected_sum0 / smoothed0)
    # code 2 gets no hits again: 0.25 < 0.3 -> restarted from a batch vector
    restarted = cb.ema_update(flat, cb.nearest(flat))
    assert restarted == 1
    assert any(torch.equal(cb.embedding[2], v) for v in flat)


def test_vqvae_loss_scales_are_per_element_means():
    torch.manual_seed(0)
    model = VQVAE(TRUNK, TokenLayout(4, 4, 4, 4), 8, VQConfig()).eval()
    x = torch.rand(2, 1, 16, 16)
    out = model.loss(x, "mse")
    recon = model.decode_codes(model.encode_codes(x))
    torch.testing.assert_close(out["nll"], ((recon - x) ** 2).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["nll"] + 0.25 * out["commit"])


def test_checkpoint_round_trip_and_rejection(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(TRUNK, TokenLayout(4, 4, 4, 2), 8, VQConfig()).eval()
    save_checkpoint(tmp_path / "m.pt", "vqvae", model, {"trunk": TRUNK.as_dict(), "layout": model.layout.as_dict(),
                                                         "n_codes": 8, "vq": vars(model.vq)})
    back = load_model(tmp_path / "m.pt")
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(back.decode_codes(back.encode_codes(x)), model.decode_codes(model.encode_codes(x)))
    assert not back.training
    with pytest.raises(GeovqError, match="expected 'vae'"):
        load_model(tmp_path / "m.pt", "vae")
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:100])
    with pytest.raises(GeovqError, match="not a readable geovq checkpoint"):
        load_model(tmp_path / "corrupt.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(GeovqError, match="not a geovq checkpoint"):
        load_model(tmp_path / "foreign.pt")
    # a pickle that would run code is refused by weights_only loading
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(np.random.default_rng))
    with pytest.raises(GeovqError, match="not a readable geovq checkpoint") as refused:
        load_model(tmp_path / "evil.pt")
    assert "weights_only" not in str(refused.value)  # never advise loading an untrusted file unsafely


@pytest.mark.parametrize("channels", [(32, 1), (16, 3)])
def test_subpixel_last_layer_is_the_transposed_convolution_it_replaces(channels):
    """Same state dict, same outputs and gradients (input, weight, bias) as torch's ConvTranspose2d(4, 2, 1), in
    float64; a checkpoint of either loads into the other."""
    from torch import nn

    from geovq.models.trunk import SubPixelConvTranspose2d

    torch.manual_seed(0)
    fast = SubPixelConvTranspose2d(*channels).double()
    plain = nn.ConvTranspose2d(*channels, 4, stride=2, padding=1).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, channels[0], 7, 5, dtype=torch.float64, requires_grad=True)
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.shape == (3, channels[1], 14, 10)
    torch.testing.assert_close(y_fast, y_plain, rtol=0, atol=1e-12)
    upstream = torch.randn_like(y_plain)
    for a, b in zip(torch.autograd.grad(y_fast, (x, fast.weight, fast.bias), upstream),
                    torch.autograd.grad(y_plain, (x, plain.weight, plain.bias), upstream)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
