"""Dataset registry: `load_dataset(name, root)` returns train/val/test images in memory as float32 in [0, 1].

Splits are fixed per dataset by a split seed that never depends on the run seed; official test sets are used
where they exist. torch, torchvision and scikit-learn are imported only when a dataset is loaded, so that
importing geovq.data stays cheap for the CLI.
"""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

from geovq.data.splits import ImageSplits
from geovq.errors import GeovqError

__all__ = ["DATASETS", "READS_DATA_ROOT", "ImageSplits", "load_dataset", "resolve_data_root"]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion", "cifar10", "npz")
#: the datasets read from a data root (digits is embedded)
READS_DATA_ROOT: tuple[str, ...] = ("mnist", "fashion", "cifar10", "npz")
DATA_ROOT_ENV = "GEOVQ_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/geovq/data")


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """`root` if given, else $GEOVQ_DATA, else ~/.cache/geovq/data.

    A root the user gave that exists must be a readable folder, or a readable file (an npz dataset). A root
    that does not exist yet is fine: a download creates it, and a missing dataset is reported by its loader.
    """
    given = root or os.environ.get(DATA_ROOT_ENV)
    if not given:
        return DEFAULT_DATA_ROOT.expanduser()
    path = Path(given).expanduser()
    origin = "" if root else f" (from ${DATA_ROOT_ENV})"
    if path.exists():
        readable = (path.is_dir() and os.access(path, os.R_OK | os.X_OK)) or (
            path.is_file() and os.access(path, os.R_OK)
        )
        if not readable:
            raise GeovqError(
                f"data root {path}{origin} exists but is not a readable folder (or, for npz, a readable file)"
            )
    return path


def load_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = False, split_seed: int = 0
) -> ImageSplits:
    """Load dataset `name` (one of DATASETS) from `root` (see resolve_data_root).

    `download` lets torchvision fetch mnist/fashion/cifar10; digits is embedded and npz is the user's own file.
    """
    if name not in DATASETS:
        raise GeovqError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, Integral) or split_seed < 0:
        raise GeovqError(f"split seed must be a non-negative integer, got {split_seed!r}")
    split_seed = int(split_seed)

    if name == "digits":
        from geovq.data.digits import load_digits

        return load_digits(split_seed)
    data_root = resolve_data_root(root)
    if name == "npz":
        from geovq.data.npz import load_npz

        return load_npz(data_root, split_seed)
    from geovq.data.torchvision_sets import load_torchvision

    return load_torchvision(name, data_root, download, split_seed)
