"""Dataset registry: real digits, fixtures in each dataset's own on-disk format, real MNIST when available."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10, MNIST

from geovq.data import DATASETS, ImageSplits, load_dataset, resolve_data_root
from geovq.errors import GeovqError

torch.set_num_threads(1)

REAL_MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "MNIST" / "raw"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# a pool under a full release's 50,000: 10% of it is held out for validation (the real MNIST test checks the 5,000)
N_TRAIN_FIXTURE, N_TEST_FIXTURE = 1_000, 200


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("GEOVQ_DATA", raising=False)


def check_contract(data: ImageSplits, shape: tuple[int, int, int]) -> None:
    for x, y in ((data.train, data.train_labels), (data.val, data.val_labels), (data.test, data.test_labels)):
        assert x.dtype == np.float32 and x.shape[1:] == shape
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert data.image_shape == shape and data.channels == shape[0]
    assert "\n" not in data.description


def row_keys(x: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in x]


def assert_partition_of(source: np.ndarray, source_labels: np.ndarray, parts) -> None:
    """The (images, labels) parts are disjoint and together are exactly `source` (all rows distinct)."""
    index_of = {key: i for i, key in enumerate(row_keys(source))}
    assert len(index_of) == len(source)
    found = []
    for images, labels in parts:
        keys = row_keys(images)
        assert all(key in index_of for key in keys), "an image that is not in the source"
        indices = [index_of[key] for key in keys]
        np.testing.assert_array_equal(labels, source_labels[indices])
        found += indices
    assert sorted(found) == list(range(len(source)))


# ---------------------------------------------------------------- digits


def bilinear_2x(images: np.ndarray) -> np.ndarray:
    """Half-pixel bilinear 2× upsampling by its closed form: out[2i] = ¼x[i-1] + ¾x[i], out[2i+1] = ¾x[i] + ¼x[i+1],
    with the edge pixel repeated. Applied as A·X·Aᵀ."""
    n = images.shape[-1]
    a = np.zeros((2 * n, n))
    for i in range(n):
        a[2 * i, max(i - 1, 0)] += 0.25
        a[2 * i, i] += 0.75
        a[2 * i + 1, i] += 0.75
        a[2 * i + 1, min(i + 1, n - 1)] += 0.25
    return a @ images @ a.T


def test_digits_are_bilinear_upsampled_sklearn_digits_split_70_10_20():
    data = load_dataset("digits", split_seed=0)
    check_contract(data, (1, 16, 16))
    assert data.native_hw == (8, 8)
    assert (len(data.train), len(data.val), len(data.test)) == (1258, 180, 359)

    raw = load_digits()
    # Values are k/16 times dyadic weights: exact in float32, so exact equality is the right test.
    expected = bilinear_2x(raw.images / 16.0).astype(np.float32)[:, None]
    assert_partition_of(
        expected, raw.target,
        [(data.train, data.train_labels), (data.val, data.val_labels), (data.test, data.test_labels)],
    )
    summary = data.summary()
    assert summary["image_shape"] == [1, 16, 16] and summary["native_hw"] == [8, 8]
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (1258, 180, 359)


def test_digits_split_depends_on_split_seed_only():
    first, again, other = (load_dataset("digits", split_seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(first, split), getattr(again, split))
    assert set(row_keys(first.test)) != set(row_keys(other.test))


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX files)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x0000 0x08 (uint8) ndim, then each dimension as a big-endian uint32, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_idx_fixture(raw: Path, seed: int):
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (N_TRAIN_FIXTURE, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (N_TEST_FIXTURE, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, N_TRAIN_FIXTURE, dtype=np.uint8)
    test_labels = rng.integers(0, 10, N_TEST_FIXTURE, dtype=np.uint8)
    for name, array in zip(IDX_FILES, (train, train_labels, test, test_labels)):
        write_idx(raw / name, array)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion", "FashionMNIST")])
def test_idx_fixture_loads_with_official_test_and_a_tenth_of_its_small_pool_for_val(tmp_path, name, folder):
    train, train_labels, test, test_labels = write_idx_fixture(tmp_path / folder / "raw", seed=1)
    data = load_dataset(name, root=tmp_path, split_seed=0)
    check_contract(data, (1, 28, 28))
    assert data.native_hw == (28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, N_TEST_FIXTURE)

    np.testing.assert_array_equal(data.test, test[:, None].astype(np.float32) / 255)
    np.testing.assert_array_equal(data.test_labels, test_labels)
    written = train[:, None].astype(np.float32) / 255
    assert_partition_of(written, train_labels.astype(np.int64), [(data.train, data.train_labels), (data.val, data.val_labels)])

    other = load_dataset(name, root=tmp_path, split_seed=1)
    assert set(row_keys(other.val)) != set(row_keys(data.val))
    np.testing.assert_array_equal(other.test, data.test)


# ---------------------------------------------------------------- CIFAR-10 (python pickles)


def write_cifar_fixture(root: Path, monkeypatch, seed: int):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (N_TRAIN_FIXTURE, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (N_TEST_FIXTURE, 3, 32, 32), dtype=np.uint8)
    train_labels = rng.integers(0, 10, N_TRAIN_FIXTURE)
    test_labels = rng.integers(0, 10, N_TEST_FIXTURE)

    def dump(name: str, obj: dict) -> list[str]:
        (folder / name).write_bytes(pickle.dumps(obj))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    # A CIFAR row is 3072 bytes: the 1024 red, then green, then blue values, each 32×32 row-major.
    batches = zip(np.array_split(train, 5), np.array_split(train_labels, 5))
    train_list = [
        dump(f"data_batch_{i}", {"data": x.reshape(len(x), -1), "labels": y.tolist()})
        for i, (x, y) in enumerate(batches, start=1)
    ]
    test_list = [dump("test_batch", {"data": test.reshape(len(test), -1), "labels": test_labels.tolist()})]
    _, meta_md5 = dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    # torchvision checks each file's md5: point it at our files so its real parsing code runs.
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return train, train_labels, test, test_labels


def test_cifar10_fixture_loads_channels_first(tmp_path, monkeypatch):
    train, train_labels, test, test_labels = write_cifar_fixture(tmp_path, monkeypatch, seed=2)
    data = load_dataset("cifar10", root=tmp_path, split_seed=0)
    check_contract(data, (3, 32, 32))
    assert data.native_hw == (32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, N_TEST_FIXTURE)
    np.testing.assert_array_equal(data.test, test.astype(np.float32) / 255)
    np.testing.assert_array_equal(data.test_labels, test_labels)
    assert_partition_of(train.astype(np.float32) / 255, train_labels, [(data.train, data.train_labels), (data.val, data.val_labels)])


# ---------------------------------------------------------------- real MNIST


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST (../shared/data/MNIST/raw) not available")
def test_a_pool_too_small_to_train_on_after_the_hold_out_is_refused(tmp_path, monkeypatch):
    import geovq.data.torchvision_sets as sets

    monkeypatch.setattr(sets, "MIN_TRAIN", 950)  # 1,000 images: 100 held out leave 900
    write_idx_fixture(tmp_path / "MNIST" / "raw", seed=1)
    with pytest.raises(GeovqError, match="has only 1000 training images: 100 held out for validation would leave "
                                         "900, fewer than 950"):
        load_dataset("mnist", root=tmp_path, split_seed=0)


def test_real_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        with gzip.open(REAL_MNIST / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    data = load_dataset("mnist", root=tmp_path, split_seed=0)
    check_contract(data, (1, 28, 28))
    assert (len(data.train), len(data.val), len(data.test)) == (55_000, 5_000, 10_000)
    train_val_counts = np.bincount(np.concatenate([data.train_labels, data.val_labels]), minlength=10)
    assert train_val_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert len(set(row_keys(data.train)) & set(row_keys(data.val))) == 0


# ---------------------------------------------------------------- missing datasets and data roots


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_dataset_is_one_line_error_naming_the_folder(tmp_path, name, folder):
    with pytest.raises(GeovqError) as err:
        load_dataset(name, root=tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / folder) in message and "--download" in message


def test_missing_dataset_found_through_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOVQ_DATA", str(tmp_path))
    with pytest.raises(GeovqError, match=str(tmp_path / "MNIST" / "raw")):
        load_dataset("mnist")


def test_gzipped_idx_files_get_a_gunzip_hint(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / f"{name}.gz").write_bytes(gzip.compress(b"\0"))
    with pytest.raises(GeovqError, match="gunzip") as err:
        load_dataset("mnist", root=tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "dataset_class, failure",
    [(MNIST, RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\nHTTP 503\n")),
     (CIFAR10, URLError("[Errno -3] Temporary failure in name resolution"))],
)
def test_failed_download_is_one_line_error(tmp_path, monkeypatch, dataset_class, failure):
    def fail(self):
        raise failure

    monkeypatch.setattr(dataset_class, "download", fail)
    name = "mnist" if dataset_class is MNIST else "cifar10"
    with pytest.raises(GeovqError, match="could not download") as err:
        load_dataset(name, root=tmp_path, download=True)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_resolve_data_root_order(tmp_path, monkeypatch):
    assert resolve_data_root(None) == Path("~/.cache/geovq/data").expanduser()
    monkeypatch.setenv("GEOVQ_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"


def test_root_that_is_not_a_folder_or_file_is_rejected(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(GeovqError, match=str(fifo)):
        resolve_data_root(fifo)
    monkeypatch.setenv("GEOVQ_DATA", str(fifo))
    with pytest.raises(GeovqError, match="GEOVQ_DATA"):
        resolve_data_root(None)


def test_file_root_is_rejected_for_torchvision_sets(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(GeovqError, match="is a file"):
        load_dataset("mnist", root=path)


def test_unknown_name_and_bad_split_seed():
    with pytest.raises(GeovqError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value) and all(name in str(err.value) for name in DATASETS)
    for seed in (-1, 1.5, True):
        with pytest.raises(GeovqError, match="split seed"):
            load_dataset("digits", split_seed=seed)


# ---------------------------------------------------------------- npz


def test_npz_uint8_channels_last_with_official_test(tmp_path):
    rng = np.random.default_rng(3)
    x_train = rng.integers(0, 256, (100, 12, 12, 3), dtype=np.uint8)
    y_train = rng.integers(0, 5, 100)
    x_test = rng.integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x_train=x_train, y_train=y_train, x_test=x_test)

    data = load_dataset("npz", root=tmp_path)  # a folder holding images.npz
    check_contract(data, (3, 12, 12))
    assert data.native_hw == (12, 12)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 7)  # val: 10% carved out of x_train
    np.testing.assert_array_equal(data.test, x_test.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    np.testing.assert_array_equal(data.test_labels, -np.ones(7))
    written = x_train.transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert_partition_of(written, y_train, [(data.train, data.train_labels), (data.val, data.val_labels)])


def test_npz_single_float_array_is_split_70_10_20_by_split_seed(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.random((50, 1, 16, 16)).astype(np.float64)
    labels = rng.integers(0, 3, 50).astype(np.int32)
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=labels)

    data = load_dataset("npz", root=path, split_seed=5)
    check_contract(data, (1, 16, 16))
    assert (len(data.train), len(data.val), len(data.test)) == (35, 5, 10)
    assert_partition_of(
        images.astype(np.float32), labels,
        [(data.train, data.train_labels), (data.val, data.val_labels), (data.test, data.test_labels)],
    )
    np.testing.assert_array_equal(load_dataset("npz", root=path, split_seed=5).test, data.test)
    assert set(row_keys(load_dataset("npz", root=path, split_seed=6).test)) != set(row_keys(data.test))


def test_npz_all_splits_given_are_kept_in_order(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {f"x_{s}": rng.random((n, 14, 14)).astype(np.float32) for s, n in (("train", 9), ("val", 4), ("test", 3))}
    np.savez(tmp_path / "images.npz", **arrays, y_val=np.arange(4))
    data = load_dataset("npz", root=tmp_path / "images.npz")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(data, split), arrays[f"x_{split}"][:, None])
    np.testing.assert_array_equal(data.val_labels, np.arange(4))
    np.testing.assert_array_equal(data.train_labels, -np.ones(9))


GOOD = np.zeros((20, 8, 8), np.uint8)


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"x_tr": GOOD}, r"found keys \['x_tr'\]; valid keys"),
        ({"x_train": GOOD, "y_val": np.zeros(2, int)}, "valid keys"),
        ({"images": GOOD, "x_train": GOOD}, "valid keys"),
        ({"x_train": GOOD.astype(np.int64)}, "int64.*valid: uint8"),
        ({"x_train": GOOD.astype(np.float32) + 2}, r"values in \[2, 2\]"),
        ({"x_train": np.full((20, 8, 8), np.nan)}, "NaN"),
        ({"x_train": np.zeros((20, 8, 8, 5), np.uint8)}, r"\(20, 8, 8, 5\).*C in \{1, 3\}"),
        ({"x_train": np.zeros((20, 3, 8, 3), np.uint8)}, "ambiguous"),
        ({"x_train": np.zeros((20, 64), np.uint8)}, r"\(20, 64\)"),
        ({"x_train": GOOD, "x_test": np.zeros((4, 9, 9), np.uint8)}, "share one"),
        ({"x_train": GOOD, "y_train": np.zeros(19, int)}, r"y_train is int64 \(19,\)"),
        ({"x_train": GOOD, "y_train": np.zeros(20)}, "y_train is float64"),
        ({"x_train": GOOD[:4]}, "too few"),
    ],
)
def test_npz_bad_input_is_named(tmp_path, arrays, expected):
    np.savez(tmp_path / "images.npz", **arrays)
    with pytest.raises(GeovqError, match=expected):
        load_dataset("npz", root=tmp_path)


def test_npz_unreadable_files(tmp_path):
    with pytest.raises(GeovqError, match="no file"):
        load_dataset("npz", root=tmp_path)  # folder without images.npz
    np.save(tmp_path / "one.npy", GOOD)
    with pytest.raises(GeovqError, match="one unnamed array"):
        load_dataset("npz", root=tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(GeovqError, match="cannot read"):
        load_dataset("npz", root=tmp_path / "junk.npz")


def test_npz_sizes_are_read_from_the_headers_before_any_array(tmp_path, monkeypatch):
    import io
    import zipfile

    # a 1 TB array declared in 200 bytes: refused from its header, before numpy would try to allocate it
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**18, 1024, 1024)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x_train.npy", header.getvalue())
    with pytest.raises(GeovqError, match=r"declares 1024\.0 GiB of arrays \(x_train \(262144, 1024, 1024\)\), "
                                         r"above the 4\.0 GiB cap; set GEOVQ_NPZ_MAX_BYTES"):
        load_dataset("npz", root=tmp_path / "huge.npz")
    # the cap is the arrays' declared bytes: 20 images of 8×8 uint8 are 1280 bytes
    np.savez_compressed(tmp_path / "images.npz", x_train=GOOD)
    monkeypatch.setenv("GEOVQ_NPZ_MAX_BYTES", "1279")
    with pytest.raises(GeovqError, match="above the 0.0 GiB cap"):
        load_dataset("npz", root=tmp_path)
    monkeypatch.setenv("GEOVQ_NPZ_MAX_BYTES", "1280")
    assert load_dataset("npz", root=tmp_path).train.shape[1:] == (1, 8, 8)
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(GeovqError, match="x_train is an object array; object arrays are refused, never unpickled"):
        load_dataset("npz", root=tmp_path / "objects.npz")
