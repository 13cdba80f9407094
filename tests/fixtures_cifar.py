"""A folder in CIFAR-10's own on-disk format cut from real photographs, for tests and benches (no download).

    python tests/fixtures_cifar.py DATA_ROOT [--train 8000] [--test 1000]   # writes DATA_ROOT/cifar-10-batches-py

scikit-image ships seven distinct RGB photographs (PHOTOS; its `cat` is the same photograph as `chelsea`). Each
is cut into 32×32 patches at a stride of 16 pixels. Test patches come from the right-hand fifth of every
photograph and training patches from the rest, so no test pixel is in a training image. The label of a patch
is its photograph's index in PHOTOS (0..6). Patches are drawn without replacement by a seeded generator.

The files are the official ones' layout: data_batch_1..5 (the training images in five near-equal batches),
test_batch and batches.meta, pickled dicts whose keys are Python 2 strings like the official files' (str under
torchvision's encoding="latin1", bytes under encoding="bytes"). "data" is uint8 (N, 3072): per image the 1024
red, then green, then blue values, each plane row-major; "labels" a list of ints. The folder is declared a local
copy (geovq.data.torchvision_sets.LOCAL_COPY: its description and md5 sums), since torchvision otherwise
accepts only the official release's md5 sums. geovq needs more than 5,000 training images: it holds 5,000 out
for validation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np

from geovq.data.torchvision_sets import LOCAL_COPY

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZE, STRIDE = 32, 16
TEST_FRACTION = 0.2  # of each photograph's width, on its right
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = 5


class Py2Str(str):
    """A str pickled as Python 2's str, as in the official files."""


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can take types of ours
    """Writes Py2Str, and bytes (an array's raw data), as Python 2 strings: the official files' opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = dispatch[bytes] = save_py2_string


def photo_patches() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per split, every candidate patch (N, 32, 32, 3) uint8, its label and a filename naming where it was cut."""
    import skimage.data

    out: dict[str, list] = {"train": [[], [], []], "test": [[], [], []]}
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()  # (H, W, 3) uint8
        h, w, _ = photo.shape
        split_x = int(w * (1 - TEST_FRACTION))
        for split, (x0, x1) in (("train", (0, split_x)), ("test", (split_x, w))):
            for y in range(0, h - SIZE + 1, STRIDE):
                for x in range(x0, x1 - SIZE + 1, STRIDE):
                    out[split][0].append(photo[y:y + SIZE, x:x + SIZE])
                    out[split][1].append(label)
                    out[split][2].append(f"{name}_y{y:04d}_x{x:04d}.png")
    return {split: (np.stack(p), np.array(l, np.int64), f) for split, (p, l, f) in out.items()}


def dump(path: Path, obj: dict) -> str:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)
    return hashlib.md5(path.read_bytes()).hexdigest()


def batch(images: np.ndarray, labels: np.ndarray, filenames: list[str], title: str) -> dict:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, 3072): R plane, G plane, B plane
    return {Py2Str("batch_label"): Py2Str(title), Py2Str("labels"): labels.tolist(),
            Py2Str("data"): np.ascontiguousarray(rows), Py2Str("filenames"): [Py2Str(f) for f in filenames]}


def write_cifar10(root: str | Path, n_train: int = 8000, n_test: int = 1000, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py with `n_train` training and `n_test` test patches; returns the folder."""
    rng = np.random.default_rng(seed)
    patches = photo_patches()
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels, names = patches[split]
        if n > len(images):
            raise ValueError(f"{split}: {n} patches asked, the photographs give {len(images)}")
        pick = rng.choice(len(images), n, replace=False)
        images, labels, names = images[pick], labels[pick], [names[i] for i in pick]
        if split == "train":
            for i, part in enumerate(np.array_split(np.arange(n), TRAIN_BATCHES), start=1):
                md5[f"data_batch_{i}"] = dump(folder / f"data_batch_{i}", batch(
                    images[part], labels[part], [names[j] for j in part], f"training batch {i} of {TRAIN_BATCHES}"))
        else:
            md5["test_batch"] = dump(folder / "test_batch", batch(images, labels, names, "testing batch 1 of 1"))
    md5["batches.meta"] = dump(folder / "batches.meta", {
        Py2Str("num_cases_per_batch"): -(-n_train // TRAIN_BATCHES),
        Py2Str("label_names"): [Py2Str(name) for name in PHOTOS], Py2Str("num_vis"): SIZE * SIZE * 3})
    description = (f"{n_train} train / {n_test} test 32×32 patches of scikit-image's photographs "
                   f"{', '.join(PHOTOS)} (label = photograph), seed {seed}")
    (folder / LOCAL_COPY).write_text(json.dumps({"description": description, "md5": md5}, indent=1))
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="data root: the folder cifar-10-batches-py/ is written in")
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_cifar10(args.root, args.train, args.test, args.seed))
