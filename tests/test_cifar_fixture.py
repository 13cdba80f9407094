"""CIFAR-10's path on natural images without a download: the photograph fixture (fixtures_cifar.py) in the
official on-disk format, read by torchvision through geovq, and a sweep of it beside digits."""

from __future__ import annotations

import json
import math
import pickle
import re

import numpy as np
import pytest
import skimage.data
import torch
import yaml
from typer.testing import CliRunner

from fixtures_cifar import FOLDER, PHOTOS, SIZE, TEST_FRACTION, write_cifar10
from geovq.data import load_dataset
from geovq.data.torchvision_sets import LOCAL_COPY
from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.metrics.image import psnr
from geovq.quantize.base import Quantizer
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import load_model

N_TRAIN, N_TEST = 8000, 1000
BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, N_TRAIN, N_TEST)
    return root


def unpickle(path, encoding):
    with open(path, "rb") as f:
        return pickle.load(f, encoding=encoding)


def test_files_have_the_official_layout_and_hold_the_named_patches(cifar_root):
    folder = cifar_root / FOLDER
    photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    counts = {}
    for name in BATCHES + ["test_batch"]:
        raw = unpickle(folder / name, "bytes")  # how the CIFAR-10 page reads the files: byte-string keys
        assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
        data, labels = raw[b"data"], raw[b"labels"]
        assert data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072 and len(labels) == len(data)
        assert all(type(label) is int for label in labels)
        assert unpickle(folder / name, "latin1")["labels"] == labels  # torchvision's reading: str keys
        counts[name] = len(data)
        for row, label, filename in list(zip(data, labels, raw[b"filenames"]))[:25]:
            photo, y, x = re.fullmatch(r"(\w+)_y(\d+)_x(\d+)\.png", filename.decode()).groups()
            y, x = int(y), int(x)
            # a row is the red plane, then green, then blue, each 32×32 row-major
            np.testing.assert_array_equal(row.reshape(3, SIZE, SIZE).transpose(1, 2, 0),
                                          photos[photo][y:y + SIZE, x:x + SIZE])
            assert label == PHOTOS.index(photo)
            split_x = int(photos[photo].shape[1] * (1 - TEST_FRACTION))
            assert (x >= split_x) if name == "test_batch" else (x + SIZE <= split_x)  # no shared pixel
    assert sum(counts[b] for b in BATCHES) == N_TRAIN and counts["test_batch"] == N_TEST
    assert max(counts[b] for b in BATCHES) - min(counts[b] for b in BATCHES) <= 1
    meta = unpickle(folder / "batches.meta", "bytes")
    assert meta[b"label_names"] == [name.encode() for name in PHOTOS] and meta[b"num_vis"] == 3072


def test_geovq_reads_it_through_torchvision(cifar_root):
    data = load_dataset("cifar10", cifar_root)
    # 8,000 training images, under a full release's 50,000: 10% held out for validation (5,000 of a full one)
    assert (data.train.shape, data.val.shape, data.test.shape) == ((7200, 3, 32, 32), (800, 3, 32, 32),
                                                                   (1000, 3, 32, 32))
    assert data.native_hw == (32, 32) and "not the official release" in data.description
    test = unpickle(cifar_root / FOLDER / "test_batch", "bytes")
    np.testing.assert_array_equal(data.test, test[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(data.test_labels, test[b"labels"])
    pool = np.concatenate([unpickle(cifar_root / FOLDER / b, "bytes")[b"data"] for b in BATCHES])
    rows = {r.tobytes() for r in pool}
    loaded = np.concatenate([data.train, data.val]).reshape(N_TRAIN, 3072)
    assert {np.round(r * 255).astype(np.uint8).tobytes() for r in loaded} == rows  # train + val = the batches
    assert 0.05 < data.train.std() and set(np.unique(data.train_labels)) == set(range(len(PHOTOS)))


def test_a_corrupted_local_copy_is_refused(tmp_path):
    folder = write_cifar10(tmp_path, 5200, 50)
    batch = folder / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[len(raw) // 2] ^= 1  # one bit of one pixel (the middle of a batch is image data)
    batch.write_bytes(bytes(raw))
    with pytest.raises(GeovqError, match=f"declared a local copy by {LOCAL_COPY}") as err:
        load_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value)

    (folder / LOCAL_COPY).unlink()  # without the declaration torchvision checks the official sums: refused too
    with pytest.raises(GeovqError, match="not found or incomplete"):
        load_dataset("cifar10", tmp_path)


def test_a_malformed_declaration_is_a_one_line_error(tmp_path):
    folder = write_cifar10(tmp_path, 5200, 50)
    declared = json.loads((folder / LOCAL_COPY).read_text())
    del declared["md5"]["test_batch"]
    (folder / LOCAL_COPY).write_text(json.dumps(declared))
    with pytest.raises(GeovqError, match="not a valid local-copy declaration.*test_batch"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.slow  # the 5,000 validation images dominate; --tiny's small trunk keeps it to seconds
def test_one_sweep_runs_cifar10_through_its_trunk_beside_digits_each_with_its_own_run_directory(ray_local, tmp_path):
    """`geovq sweep digits,cifar10`: one Tune experiment for both datasets (their trials share the cluster), a
    run directory each inside --out, and CIFAR-10's rows through its own layout."""
    from geovq.cli import app

    write_cifar10(tmp_path / "data", 5200, 200)  # the fewest training images geovq takes: 5,000 go to validation
    parent = tmp_path / "runs"
    result = CliRunner().invoke(app, ["sweep", "digits,cifar10", "--data-root", str(tmp_path / "data"), "--tiny",
                                      "--vae", "plain", "--methods", "kmeans,vqvae", "--codebook-sizes", "16",
                                      "--epochs", "1", "--no-prior", "--max-concurrent", "1", "--out", str(parent)])
    assert result.exit_code == 0, result.output
    for name in ("digits", "cifar10"):
        run = parent / f"{name}-tiny"  # each dataset's default run directory's name, inside --out
        rows = json.loads((run / "results.json").read_text())
        assert sorted((r["dataset"], r["method"]) for r in rows) == [(name, "kmeans"), (name, "vqvae")]
        assert f"{name} report: {run / 'report.html'} (and report.md)" in result.output
    experiments = [p.name.split("-")[0] for p in (parent / "ray").iterdir()]
    assert experiments == ["sweep"]
    trials = [p for p in (parent / "ray").glob("sweep-*/*") if p.is_dir()]
    assert len(trials) == 6  # each dataset's VAE, and its k-means and VQ-VAE units
    # --max-concurrent 1: the trials ran one after another, so Tune's reused worker ran them all in one process
    results = [json.loads((trial / "result.json").read_text().splitlines()[-1]) for trial in trials]
    assert len({r["pid"] for r in results}) == 1

    out = parent / "cifar10-tiny"
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    for r in rows.values():  # the CIFAR layout: an 8×8 grid, one token per cell, 4 bits each, over 32×32 pixels
        assert (r["tokens_per_image"], r["bits_per_image"], r["bpp"]) == (64, 256, 0.25)
        assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
    assert "not the official release" in (out / "sweep.log").read_text()

    # The k-means row's PSNR again, from the files alone: test codes -> codewords -> 8×8×C grids -> the VAE's
    # decoder -> 3×32×32 images, against the test photographs read afresh.
    unit_dir = out / rows["kmeans"]["codes_path"].rsplit("/", 1)[0]
    vae_dir = RunDir(out).vae(Unit.from_dict(json.loads((unit_dir / "unit.json").read_text())).vae)
    layout = LatentSet.load(vae_dir / "latents_test.npz").layout
    codes = np.load(unit_dir / "codes_test.npy")
    grids = layout.tokens_to_grid(Quantizer.load(unit_dir / "quantizer.npz").decode(codes))
    channels = yaml.safe_load((out / "config.yaml").read_text())["trunk"]["latent_channels"]
    assert grids.shape == (200, 8, 8, channels)
    with torch.no_grad():
        recons = load_model(vae_dir / "model.pt", "vae").decoder.mean(torch.as_tensor(grids).permute(0, 3, 1, 2))
    test = load_dataset("cifar10", tmp_path / "data").test
    assert float(psnr(test, recons).mean()) == pytest.approx(rows["kmeans"]["psnr"], abs=1e-3)
