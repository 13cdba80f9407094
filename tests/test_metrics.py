"""Metrics against independent implementations (scikit-image), closed forms and hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from geovq.errors import GeovqError
from geovq.metrics import image
from geovq.metrics.codebook import code_histogram, dead_codes, usage_perplexity, usage_perplexity_corrected
from geovq.metrics.image import image_metrics, lpips_scores, lpips_status, mse, psnr, ssim
from geovq.metrics.latent import quantization_error
from geovq.metrics.rate import bits_per_image, bits_per_pixel

torch.set_num_threads(1)


def random_pair(n, channels, size, seed=0):
    rng = np.random.default_rng(seed)
    orig = rng.random((n, channels, size, size))
    recon = np.clip(orig + 0.1 * rng.standard_normal(orig.shape), 0.0, 1.0)
    return orig, recon


def structured_pair(n, channels, size, seed=0):
    """Smooth gradients and a checkerboard (real-image-like structure), reconstructed with blur-like error."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    bases = [x, y, 0.5 + 0.5 * np.sin(6 * x) * np.cos(4 * y), ((np.arange(size)[:, None] // 4 + np.arange(size) // 4) % 2)]
    orig = np.stack([np.stack([bases[(i + c) % 4] for c in range(channels)]) for i in range(n)]).astype(np.float64)
    recon = np.clip(0.8 * orig + 0.1 + 0.02 * rng.standard_normal(orig.shape), 0.0, 1.0)
    return orig, recon


PAIRS = [(make, c, s) for make in (random_pair, structured_pair) for c in (1, 3) for s in (16, 28)]


@pytest.mark.parametrize("make,channels,size", PAIRS)
def test_psnr_and_ssim_match_scikit_image(make, channels, size):
    orig, recon = make(4, channels, size)
    ref_psnr = [peak_signal_noise_ratio(o, r, data_range=1) for o, r in zip(orig, recon)]
    ref_ssim = [
        structural_similarity(o, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)
        for o, r in zip(orig, recon)
    ]
    np.testing.assert_allclose(psnr(orig, recon), ref_psnr, rtol=1e-12)
    # SSIM is computed in float32 (speed); scikit-image's float64 value is matched to 1e-5. torchmetrics'
    # own mean over the reflect-padded border would be off by ~1e-3 here.
    np.testing.assert_allclose(ssim(orig, recon), ref_ssim, rtol=0, atol=1e-5)
    torch_in = torch.tensor(orig, dtype=torch.float32), torch.tensor(recon, dtype=torch.float32)
    np.testing.assert_allclose(psnr(*torch_in), ref_psnr, rtol=1e-6)
    np.testing.assert_allclose(ssim(*torch_in), ref_ssim, rtol=0, atol=1e-5)


def test_psnr_mse_closed_form_constant_offset():
    orig = np.random.default_rng(1).uniform(0.0, 0.9, size=(3, 1, 28, 28))
    recon = orig + 0.1  # MSE = 0.01 exactly (up to rounding), PSNR = 10·log10(1/0.01) = 20 dB
    np.testing.assert_allclose(mse(orig, recon), 0.01, rtol=1e-12)
    np.testing.assert_allclose(psnr(orig, recon), 20.0, rtol=1e-12)
    assert psnr(orig, orig)[0] == math.inf
    np.testing.assert_allclose(ssim(orig, orig), 1.0, rtol=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    orig, recon = random_pair(7, 3, 16)
    whole = np.concatenate([psnr(orig, recon), ssim(orig, recon), mse(orig, recon)])
    monkeypatch.setattr(image, "CHUNK_ELEMENTS", 2 * 3 * 16 * 16)  # 2 images per chunk, last chunk of 1
    chunked = np.concatenate([psnr(orig, recon), ssim(orig, recon), mse(orig, recon)])
    np.testing.assert_array_equal(whole, chunked)


def test_image_inputs_are_validated():
    orig, recon = random_pair(2, 1, 16)
    with pytest.raises(GeovqError, match="same shape"):
        psnr(orig, recon[:1])
    with pytest.raises(GeovqError, match=r"\(N, C, H, W\)"):
        psnr(orig[0], recon[0])
    with pytest.raises(GeovqError, match=r"\[0, 1\]"):
        mse(orig * 255, recon * 255)
    with pytest.raises(GeovqError, match="NaN"):
        mse(np.full_like(orig, np.nan), recon)
    with pytest.raises(GeovqError, match="at least 11"):
        ssim(orig[..., :10], recon[..., :10])
    with pytest.raises(GeovqError, match="1 \\(gray\\) or 3"):
        lpips_scores(np.zeros((1, 2, 16, 16)), np.zeros((1, 2, 16, 16)))


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache; any download attempt fails the test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    yield tmp_path
    torch.hub.set_dir(previous)
    image._lpips_model.cache_clear()


def test_lpips_unavailable_without_cached_weights(hub_dir):
    available, reason = lpips_status()
    assert not available
    assert "alexnet-owt-7be5be79.pth" in reason and str(hub_dir) not in reason  # reasons go into shared results
    assert str(hub_dir / "checkpoints") in image.lpips_weights_hint()  # where to put them: on the console
    orig, recon = random_pair(3, 1, 28)
    assert lpips_scores(orig, recon) is None
    metrics = image_metrics(orig, recon)
    assert metrics["lpips"] is None and metrics["lpips_reason"] == reason
    assert metrics["psnr"] == pytest.approx(psnr(orig, recon).mean())
    assert metrics["ssim"] == pytest.approx(ssim(orig, recon).mean())
    assert metrics["mse"] == pytest.approx(mse(orig, recon).mean())
    assert not (hub_dir / "checkpoints").exists()


def test_lpips_looks_for_the_file_torchvision_names():
    from torchvision.models import AlexNet_Weights

    from geovq.metrics.image import ALEXNET_WEIGHTS_FILE

    assert AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1] == ALEXNET_WEIGHTS_FILE


def test_lpips_plumbing_with_fake_alexnet_weights(hub_dir):
    # Random AlexNet weights under the real file name: this checks plumbing only, never a real LPIPS value.
    torch.manual_seed(0)
    fake = torchvision.models.alexnet().state_dict()
    (hub_dir / "checkpoints").mkdir()
    torch.save(fake, hub_dir / "checkpoints" / "alexnet-owt-7be5be79.pth")
    available, reason = lpips_status()
    assert available and "alexnet-owt-7be5be79.pth" in reason

    for channels, size in [(1, 28), (3, 16), (3, 40)]:
        orig, recon = random_pair(5, channels, size)
        scores = lpips_scores(orig, recon, batch_size=2)
        assert scores.shape == (5,) and np.isfinite(scores).all() and (scores > 0).all()
        np.testing.assert_allclose(lpips_scores(orig, orig), 0.0, atol=1e-6)
        metrics = image_metrics(orig, recon)
        assert metrics["lpips"] == pytest.approx(scores.mean(), rel=1e-5)

    # the trunk really was loaded from the cached file (not random, not downloaded)
    model = image._lpips_model(str(hub_dir / "checkpoints" / "alexnet-owt-7be5be79.pth"), "cpu")
    assert torch.equal(model.net.slice1[0].weight, fake["features.0.weight"])


def test_lpips_input_is_rgb_and_at_least_32_px():
    gray = torch.rand(2, 1, 28, 28)
    out = image._lpips_input(gray)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 2])
    assert image._lpips_input(torch.rand(1, 3, 20, 40)).shape == (1, 3, 32, 64)
    assert image._lpips_input(torch.rand(1, 3, 48, 48)).shape == (1, 3, 48, 48)


def test_usage_perplexity_uniform_and_single_code():
    codes = np.tile(np.arange(10), 7).reshape(7, 10)  # uniform over m = 10 of K = 16 codes
    assert usage_perplexity(codes, 16) == pytest.approx(10.0, rel=1e-12)
    assert dead_codes(codes, 16) == 6
    assert usage_perplexity(np.full((5, 3), 4), 16) == pytest.approx(1.0, rel=1e-12)
    assert usage_perplexity_corrected(np.full((5, 3), 4), 16) == pytest.approx(1.0, rel=1e-12)  # m = 1: no correction
    assert dead_codes(torch.full((5, 3), 4), 16) == 15


def test_histogram_and_corrected_perplexity_by_hand():
    codes = torch.tensor([[0, 0], [0, 1]])  # counts 3, 1, 0, 0: N = 4, m = 2
    np.testing.assert_array_equal(code_histogram(codes, 4), [3, 1, 0, 0])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage_perplexity(codes, 4) == pytest.approx(math.exp(entropy), rel=1e-12)
    assert usage_perplexity_corrected(codes, 4) == pytest.approx(math.exp(entropy + (2 - 1) / (2 * 4)), rel=1e-12)
    assert dead_codes(codes, 4) == 2


def test_corrected_perplexity_reduces_small_sample_bias():
    codes = np.random.default_rng(0).integers(0, 256, size=1000)  # truly uniform usage of K = 256 codes
    plug_in, corrected = usage_perplexity(codes, 256), usage_perplexity_corrected(codes, 256)
    assert plug_in < corrected
    assert abs(corrected - 256) < abs(plug_in - 256)


def test_codes_are_validated():
    for bad in (np.array([0, 4]), np.array([-1, 0]), np.array([0.0, 1.0]), np.array([], dtype=np.int64)):
        with pytest.raises(GeovqError):
            code_histogram(bad, 4)
    with pytest.raises(GeovqError, match=r"\[0, 4\)"):
        usage_perplexity(np.array([0, 4]), 4)
    with pytest.raises(GeovqError, match="n_codes"):
        dead_codes(np.array([0]), 0)


def test_rate():
    assert bits_per_image(49, 256) == 392.0
    assert bits_per_pixel(392.0, (28, 28)) == 0.5
    assert bits_per_image(64, 512) == 576.0
    for bad in ((0, 256), (49, 0), (True, 256), (4.0, 256)):
        with pytest.raises(GeovqError):
            bits_per_image(*bad)
    for bad in ((-1.0, (28, 28)), (math.nan, (28, 28)), (392.0, (28,)), (392.0, (28, 0))):
        with pytest.raises(GeovqError):
            bits_per_pixel(*bad)


def test_quantization_error_by_hand():
    mu = np.array([[0.0, 0.0], [1.0, 1.0]])
    mu_hat = np.array([[3.0, 4.0], [2.0, 1.0]])
    sigma = np.array([[1.0, 2.0], [1.0, 1.0]])
    # |Δ| = [[3, 4], [1, 0]]: norms 5 and 1; |Δ|/σ = 3, 2, 1, 0; |Δ| ≥ σ for 3 of 4 scalars (1 ≥ 1 counts)
    result = quantization_error(mu_hat, mu, torch.tensor(sigma))
    assert result == pytest.approx({"latent_error": 3.0, "latent_error_sigma": 1.5, "frac_beyond_sigma": 0.75})


def test_quantization_error_is_validated():
    mu = np.zeros((3, 2))
    with pytest.raises(GeovqError, match="same shape"):
        quantization_error(mu[:2], mu, np.ones((3, 2)))
    with pytest.raises(GeovqError, match="sigma"):
        quantization_error(mu, mu, np.zeros((3, 2)))
    with pytest.raises(GeovqError, match=r"\(Ntok, d\)"):
        quantization_error(mu[0], mu[0], np.ones(2))
