"""The in-memory dataset every loader returns, and the seeded split rule they all share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSplits:
    """Train/val/test images as float32 (N, C, H, W) in `value_range`, with int64 labels (-1 = unknown).

    `native_hw` is the pixel size of the ORIGINAL images: bits per pixel divide by it, not by the
    (possibly upsampled) size the model sees.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    native_hw: tuple[int, int]
    description: str
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        # A loader bug here would silently skew every metric downstream, so the contract is checked once.
        splits = {"train": self.train, "val": self.val, "test": self.test}
        shapes = {split: x.shape[1:] for split, x in splits.items()}
        for split, x in splits.items():
            if x.dtype != np.float32 or x.ndim != 4:
                raise ValueError(f"{self.name} {split}: expected float32 (N, C, H, W), got {x.dtype} {x.shape}")
            labels = getattr(self, f"{split}_labels")
            if labels.dtype != np.int64 or labels.shape != (len(x),):
                raise ValueError(f"{self.name} {split}_labels: expected int64 ({len(x)},), got {labels.dtype} {labels.shape}")
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{self.name}: splits disagree on image shape: {shapes}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def summary(self) -> dict:
        """JSON-ready description of the dataset (lists, not tuples, so it round-trips unchanged)."""
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "channels": self.channels,
            "value_range": list(self.value_range),
            "native_hw": list(self.native_hw),
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "description": self.description,
        }


def hold_out(n: int, sizes: list[int], split_seed: int) -> list[np.ndarray]:
    """Split range(n) into [rest, part_1, ..., part_k] with len(part_i) == sizes[i].

    One permutation from Generator(split_seed) is cut into pieces, so the parts are disjoint and depend on
    the split seed only (never on a run seed). Each part is sorted to keep the source's original order.
    """
    order = np.random.default_rng(split_seed).permutation(n)
    *held, rest = np.split(order, np.cumsum(sizes, dtype=int))
    return [np.sort(part) for part in [rest, *held]]
