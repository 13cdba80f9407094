"""Training loops: exact resume (TDC state included), TDC steering, decoder fine-tuning."""

import numpy as np
import pytest
import torch

from geovq.data import load_dataset
from geovq.latents import TokenLayout
from geovq.config import TrainConfig, TrunkConfig
from geovq.training.checkpoint import load_checkpoint, load_model
from geovq.training.finetune import finetune_decoder
from geovq.stages.common import decode_grids, no_progress
from geovq.stages.extract import extract_latents
from geovq.training.loop import train_vae

TRUNK = TrunkConfig(in_channels=1, image_size=(16, 16), hidden=16, latent_channels=4, res_blocks=1)
LAYOUT = TokenLayout(4, 4, 4, 2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class Interrupt(Exception):
    pass


def interrupting_after_first_epoch(**kwargs):
    bar = no_progress(**kwargs)

    def stop(*a, **k):  # set_description runs once per epoch, after the resume point is written
        raise Interrupt

    bar.set_description = stop
    return bar


def test_interrupted_tdc_training_resumes_exactly(tmp_path, digits):
    cfg = TrainConfig(epochs=2, batch_size=64)
    x_train, x_val = digits.train[:256], digits.val[:64]
    straight = train_vae(TRUNK, cfg, x_train, x_val, tmp_path / "a", no_progress, CPU, LAYOUT, tdc_target_bits=3.0)
    with pytest.raises(Interrupt):
        train_vae(TRUNK, cfg, x_train, x_val, tmp_path / "b", interrupting_after_first_epoch, CPU, LAYOUT, 3.0)
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = train_vae(TRUNK, cfg, x_train, x_val, tmp_path / "b", no_progress, CPU, LAYOUT, tdc_target_bits=3.0)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    tdc_a = load_checkpoint(tmp_path / "a" / "model.pt")["extra"]["tdc"]
    tdc_b = load_checkpoint(tmp_path / "b" / "model.pt")["extra"]["tdc"]
    assert tdc_a == tdc_b
    assert tdc_a["lam"] != 1.0 and tdc_a["target_bits"] == 3.0  # the multipliers moved and were persisted
    assert not load_model(tmp_path / "b" / "model.pt").training


def test_tdc_raises_token_kl_towards_the_target(tmp_path, digits):
    """A β=1 VAE carries far below 4 bits per 2-channel token; TDC with T=4 must lift the mean KL."""
    cfg = TrainConfig(epochs=4, batch_size=32)
    x_train, x_val = digits.train[:512], digits.val[:64]
    plain = train_vae(TRUNK, cfg, x_train, x_val, tmp_path / "plain", no_progress, CPU, LAYOUT)
    tdc = train_vae(TRUNK, cfg, x_train, x_val, tmp_path / "tdc", no_progress, CPU, LAYOUT, tdc_target_bits=4.0)
    kl_plain = extract_latents(plain, digits.test, LAYOUT, CPU).token_kl_bits().mean()
    kl_tdc = extract_latents(tdc, digits.test, LAYOUT, CPU).token_kl_bits().mean()
    assert abs(kl_tdc - 4.0) < abs(kl_plain - 4.0)


def test_decoder_finetune_improves_validation_and_keeps_the_original(tmp_path, digits):
    from geovq.quantize import make_quantizer

    x_train, x_val = digits.train[:400], digits.val
    vae = train_vae(TRUNK, TrainConfig(epochs=3, batch_size=32), x_train, x_val, tmp_path / "v", no_progress, CPU,
                    LAYOUT)
    train_lat = extract_latents(vae, x_train, LAYOUT, CPU)
    val_lat = extract_latents(vae, x_val, LAYOUT, CPU)
    q = make_quantizer("kmeans", 8, seed=0).fit(train_lat)
    grid = lambda ls: ls.layout.tokens_to_grid(q.decode(q.encode(ls)))  # noqa: E731
    before = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    tuned, info = finetune_decoder(vae.decoder, grid(train_lat), x_train, grid(val_lat), x_val, "bce", 4, no_progress,
                                   CPU, batch_size=32)
    assert info["val_nll_after"] <= info["val_nll_before"]
    assert 0 <= info["best_epoch"] <= info["epochs_run"] <= 4
    assert all(torch.equal(before[k], v) for k, v in vae.decoder.state_dict().items())
    assert not tuned.training
    # the reported value is the returned decoder's own validation NLL
    recon = decode_grids(tuned, grid(val_lat), CPU).numpy()
    eps = 1e-7
    nll = -(x_val * np.log(recon + eps) + (1 - x_val) * np.log(1 - recon + eps)).reshape(len(x_val), -1).sum(1).mean()
    assert nll == pytest.approx(info["val_nll_after"], rel=1e-3)
