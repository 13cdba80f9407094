"""MNIST, Fashion-MNIST and CIFAR-10 read by torchvision from their official files.

The official test set is the test split; validation is held out of the train set by the split seed: VAL_SIZE
(5,000) images of a full release (MNIST's 60,000, CIFAR-10's 50,000), and VAL_FRACTION (10%) of a smaller pool,
such as a declared subset, which would otherwise be left with next to nothing to train on (`val_size`). torchvision's "not found" RuntimeError (and download failures) become one-line GeovqErrors
that say where we looked and how to fix it.

torchvision checks CIFAR-10's files against the official release's md5 sums. A folder in CIFAR-10's format that
is not that release (a subset, a test fixture made from other photographs) declares itself with LOCAL_COPY, a
JSON file {"description": "...", "md5": {file: md5}} beside the files: they are then checked against the sums
it lists, and its description goes into the dataset's, hence into every run's record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision

from geovq.data.splits import ImageSplits, hold_out
from geovq.errors import GeovqError

VAL_SIZE = 5000
#: below FULL_POOL training images (a subset), the validation hold-out is this fraction of the pool
VAL_FRACTION, FULL_POOL = 0.1, 50_000
#: the fewest training images left after the hold-out: fewer is refused, never trained on silently
MIN_TRAIN = 100
LOCAL_COPY = "geovq-local-copy.json"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class TorchvisionSource:
    class_name: str  # the torchvision.datasets class
    folder: str  # where torchvision expects the files, relative to the data root
    files: tuple[str, ...]
    native_hw: tuple[int, int]


SOURCES = {
    "mnist": TorchvisionSource("MNIST", "MNIST/raw", _IDX_FILES, (28, 28)),
    "fashion": TorchvisionSource("FashionMNIST", "FashionMNIST/raw", _IDX_FILES, (28, 28)),
    "cifar10": TorchvisionSource(
        "CIFAR10", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        (32, 32),
    ),
}


def load_torchvision(name: str, root: Path, download: bool, split_seed: int) -> ImageSplits:
    source = SOURCES[name]
    if root.exists() and not root.is_dir():
        raise GeovqError(f"{name}: data root {root} is a file; --data-root/GEOVQ_DATA must be a folder for {name}")
    dataset_class, local_copy = _dataset_class(source, root / source.folder)
    try:
        train_set = dataset_class(str(root), train=True, download=download)
        test_set = dataset_class(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # OSError covers URLError (no network) and unreadable files
        raise GeovqError(_not_found_message(name, source, root, download, err, local_copy is not None)) from err

    train_images, train_labels = _to_numpy(train_set)
    test, test_labels = _to_numpy(test_set)
    n_val = val_size(len(train_images))
    if len(train_images) - n_val < MIN_TRAIN:
        raise GeovqError(
            f"{name} in {root / source.folder} has only {len(train_images)} training images: {n_val} held out for "
            f"validation would leave {len(train_images) - n_val}, fewer than {MIN_TRAIN} (is the copy truncated?)"
        )
    train, val = hold_out(len(train_images), [n_val], split_seed)
    h, w = source.native_hw
    share = f"{VAL_SIZE}" if n_val == VAL_SIZE else f"{VAL_FRACTION:.0%}"
    pool = "" if n_val == VAL_SIZE else f": a pool under {FULL_POOL:,}"
    description = (
        f"{source.class_name} via torchvision from {root / source.folder}: {len(train)} train / {len(val)} val "
        f"({share} of the {len(train_images)} training images held out by split seed {split_seed}{pool}) / "
        f"{len(test)} test; "
        f"{h}×{w} uint8 scaled to [0,1]" + (f"; not the official release: {local_copy}" if local_copy else "")
    )
    return ImageSplits(
        name=name,
        train=train_images[train], val=train_images[val], test=test,
        train_labels=train_labels[train], val_labels=train_labels[val], test_labels=test_labels,
        native_hw=source.native_hw,
        description=description,
    )


def val_size(pool: int) -> int:
    """Validation images held out of a training pool: 5,000 of a full release, 10% of a pool under 50,000."""
    return VAL_SIZE if pool >= FULL_POOL else max(1, round(VAL_FRACTION * pool))


def _dataset_class(source: TorchvisionSource, folder: Path) -> tuple[type, str | None]:
    """torchvision's class and None; for a folder declared a local copy (LOCAL_COPY, CIFAR-10 only: MNIST's
    loader checks no sums), a subclass that checks the sums the folder declares, and its description."""
    dataset_class = getattr(torchvision.datasets, source.class_name)
    path = folder / LOCAL_COPY
    if not path.is_file() or not hasattr(dataset_class, "train_list"):
        return dataset_class, None
    try:
        declared = json.loads(path.read_text())
        md5, description = declared["md5"], str(declared["description"])
        sums = {key: [[f, md5[f]] for f, _ in getattr(dataset_class, key)] for key in ("train_list", "test_list")}
        meta = {**dataset_class.meta, "md5": md5[dataset_class.meta["filename"]]}
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise GeovqError(f"{path} is not a valid local-copy declaration ({type(err).__name__}: {err}); valid: "
                         f'{{"description": "...", "md5": {{file: md5}} for {", ".join(source.files)}}}') from None
    return type(f"Local{dataset_class.__name__}", (dataset_class,), {**sums, "meta": meta}), description


def _to_numpy(dataset) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's raw uint8 arrays -> float32 (N, C, H, W) in [0, 1] and int64 labels."""
    pixels = np.asarray(dataset.data)  # MNIST: (N, H, W) tensor; CIFAR: (N, H, W, 3) array
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    images = pixels.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(images), np.asarray(dataset.targets, dtype=np.int64)


def _not_found_message(name: str, source: TorchvisionSource, root: Path, download: bool, err: Exception,
                       local_copy: bool = False) -> str:
    folder = root / source.folder
    if download:
        reason = " ".join(str(err).split()) or type(err).__name__  # torchvision's message spans lines
        return (
            f"could not download {name} into {folder} ({reason}); check the network, or copy the files "
            f"({', '.join(source.files)}) there yourself and run without --download"
        )
    gzipped = [f for f in source.files if (folder / f"{f}.gz").is_file() and not (folder / f).is_file()]
    gz_names = ", ".join(f"{f}.gz" for f in gzipped)
    hint = f" (found {gz_names}: torchvision reads them uncompressed, gunzip them in place)" if gzipped else ""
    if local_copy:
        hint += f" (declared a local copy by {LOCAL_COPY}: every file must exist and match the md5 listed there)"
    return (
        f"{name} not found or incomplete in {folder}{hint}: pass --download, or point "
        f"--data-root/GEOVQ_DATA at a folder that holds {source.folder}/ with {', '.join(source.files)}"
    )
