"""A user's own images from a .npz archive.

Keys: `x_train` (+ `y_train`), optional `x_val`/`y_val` and `x_test`/`y_test`; or a single `images` (+ `labels`).
Images are uint8 in 0..255 or float in [0, 1], laid out (N, H, W), (N, H, W, C) or (N, C, H, W) with C in
{1, 3}. Splits that are not given are carved out of the training pool (`x_train` or `images`) by the split
seed: val 10% and test 20% of that pool.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from geovq.data.splits import ImageSplits, hold_out
from geovq.errors import GeovqError

NPZ_FILENAME = "images.npz"
SPLITS = ("train", "val", "test")
CARVED_FRACTION = {"val": 0.1, "test": 0.2}
VALID_CHANNELS = (1, 3)
_KEY_HELP = "valid keys: x_train (+ y_train), optional x_val/y_val and x_test/y_test; or images (+ labels)"
#: the most bytes of arrays an archive may declare (its .npy headers, read before any array): a 500 KB compressed
#: file can expand to gigabytes; GEOVQ_NPZ_MAX_BYTES raises it on a machine with the memory
NPZ_MAX_BYTES = 4 << 30
_LAYOUT_HELP = "valid: uint8 (0..255) or float in [0, 1], shaped (N,H,W), (N,H,W,C) or (N,C,H,W) with C in {1, 3}"


def npz_path(root: Path) -> Path:
    """`root` itself when it is a file, else `root/images.npz`."""
    path = root / NPZ_FILENAME if root.is_dir() else root
    if not path.is_file():
        raise GeovqError(
            f"npz: no file at {path}; point --data-root/GEOVQ_DATA at a .npz file or at a folder holding {NPZ_FILENAME}"
        )
    return path


def load_npz(root: Path, split_seed: int) -> ImageSplits:
    path = npz_path(root)
    images, labels = _arrays_by_split(read_archive(path), path)

    shapes = {split: x.shape[1:] for split, x in images.items()}
    if len(set(shapes.values())) != 1:
        found = ", ".join(f"{split} {shape}" for split, shape in shapes.items())
        raise GeovqError(f"{path}: splits must share one (C, H, W) image shape, found {found}")

    missing = [split for split in ("val", "test") if split not in images]
    pool, pool_labels = images["train"], labels["train"]
    sizes = [round(CARVED_FRACTION[split] * len(pool)) for split in missing]
    if missing and (min(sizes) == 0 or sum(sizes) >= len(pool)):
        raise GeovqError(
            f"{path}: {len(pool)} training images are too few to carve {' and '.join(missing)} out of them "
            f"(val 10%, test 20%); give more images or the x_val/x_test arrays"
        )
    rest, *carved = hold_out(len(pool), sizes, split_seed)
    images["train"], labels["train"] = pool[rest], pool_labels[rest]
    for split, index in zip(missing, carved):
        images[split], labels[split] = pool[index], pool_labels[index]

    c, h, w = shapes["train"]
    carved_note = f"; {'/'.join(missing)} carved out of the training pool by split seed {split_seed}" if missing else ""
    description = (
        f"user arrays from {path}: {len(images['train'])}/{len(images['val'])}/{len(images['test'])} "
        f"train/val/test, {c}×{h}×{w} in [0,1]{carved_note}"
    )
    return ImageSplits(
        name="npz",
        train=images["train"], val=images["val"], test=images["test"],
        train_labels=labels["train"], val_labels=labels["val"], test_labels=labels["test"],
        native_hw=(h, w),
        description=description,
    )


def declared_sizes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's (shape, dtype) from its .npy header in the archive, reading no array data."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)  # (1, 0), else a 4-byte header length (2.0 and 3.0)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member, max_header_size=10_000)
            out[name.removesuffix(".npy")] = (shape, dtype)
    return out


def check_declared_size(path: Path) -> None:
    """Refuse an archive whose arrays would take more than the memory cap (or are object arrays) before loading."""
    cap = int(os.environ.get("GEOVQ_NPZ_MAX_BYTES", NPZ_MAX_BYTES))
    try:
        sizes = declared_sizes(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError):
        return  # not an archive of .npy members: np.load below says so in its own terms
    total = 0
    for key, (shape, dtype) in sizes.items():
        if dtype.hasobject:
            raise GeovqError(f"{path}: {key} is an object array; object arrays are refused, never unpickled")
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    if total > cap:
        raise GeovqError(f"{path} declares {total / 2**30:.1f} GiB of arrays ({', '.join(f'{k} {s}' for k, (s, _) in sizes.items())}), "
                         f"above the {cap / 2**30:.1f} GiB cap; set GEOVQ_NPZ_MAX_BYTES to load it on a machine with "
                         "the memory")


def read_archive(path: Path) -> dict[str, np.ndarray]:
    check_declared_size(path)
    try:
        archive = np.load(path, allow_pickle=False)  # never unpickle a user's file
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        # numpy's own message may advise allow_pickle=True: never pass that on for a user's file
        raise GeovqError(f"cannot read {path} as a .npz archive of plain arrays ({type(err).__name__}); save it "
                         "with np.savez(path, x_train=..., ...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise GeovqError(f"{path} holds one unnamed array, not a .npz archive; save it with np.savez(path, x_train=...)")
    try:
        with archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise GeovqError(f"cannot read the arrays in {path} ({type(err).__name__}): they must be plain numeric "
                         "arrays (object arrays are refused, never unpickled)") from None


def _arrays_by_split(arrays: dict[str, np.ndarray], path: Path) -> tuple[dict, dict]:
    """Validated float32 NCHW images and int64 labels (-1 where not given), keyed by split name."""
    keys = set(arrays)
    split_keys = {f"{prefix}_{split}" for prefix in "xy" for split in SPLITS}
    labels_without_images = [key for key in keys if key.startswith("y_") and f"x_{key[2:]}" not in keys]
    if "images" in keys and keys <= {"images", "labels"}:
        named = {"train": ("images", "labels")}
    elif "x_train" in keys and keys <= split_keys and not labels_without_images:
        named = {split: (f"x_{split}", f"y_{split}") for split in SPLITS if f"x_{split}" in keys}
    else:
        raise GeovqError(f"{path}: found keys {sorted(keys)}; {_KEY_HELP}")

    images, labels = {}, {}
    for split, (x_key, y_key) in named.items():
        images[split] = to_unit_nchw(arrays[x_key], x_key, path)
        n = len(images[split])
        labels[split] = _to_labels(arrays[y_key], y_key, n, path) if y_key in arrays else np.full(n, -1, np.int64)
    return images, labels


def to_unit_nchw(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    found = f"{path}: {key} is {x.dtype} {x.shape}"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        channels_first, channels_last = x.shape[1] in VALID_CHANNELS, x.shape[3] in VALID_CHANNELS
        if channels_first == channels_last:  # neither layout fits, or both do (e.g. (N, 3, 5, 3))
            raise GeovqError(f"{found}{' (ambiguous layout)' if channels_first else ''}; {_LAYOUT_HELP}")
        if channels_last:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise GeovqError(f"{found}; {_LAYOUT_HELP}")
    if len(x) == 0:
        raise GeovqError(f"{found}: no images; {_LAYOUT_HELP}")

    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise GeovqError(f"{found} with NaN or infinite values; {_LAYOUT_HELP}")
        if x.min() < 0 or x.max() > 1:
            raise GeovqError(f"{found} with values in [{x.min():g}, {x.max():g}]; {_LAYOUT_HELP}")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise GeovqError(f"{found}; {_LAYOUT_HELP}")


def _to_labels(y: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,) or y.min() < -1:
        raise GeovqError(
            f"{path}: {key} is {y.dtype} {y.shape}; valid: integers >= -1 (-1 = unknown) shaped ({n},) like its images"
        )
    return y.astype(np.int64)
