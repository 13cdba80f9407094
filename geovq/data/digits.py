"""scikit-learn's handwritten digits: 1,797 real 8×8 images shipped inside the package, so always offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sklearn_load_digits

from geovq.data.splits import ImageSplits, hold_out

NATIVE_SIZE = 8
# Two stride-2 convolutions turn 16×16 into a 4×4 latent grid, and SSIM's 11-pixel window needs ≥ 11 px.
MODEL_SIZE = 16
MAX_VALUE = 16.0  # the raw pixels are counts 0..16 of a 4×4 block of the original 32×32 bitmaps
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2  # there is no official test set


def load_digits(split_seed: int) -> ImageSplits:
    raw = sklearn_load_digits()
    pixels = torch.from_numpy(raw.images.astype(np.float32) / MAX_VALUE).unsqueeze(1)  # (N, 1, 8, 8)
    # Half-pixel bilinear (align_corners=False): every output is a convex mix of inputs, so [0, 1] holds.
    images = F.interpolate(pixels, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False).numpy()
    labels = raw.target.astype(np.int64)

    n = len(images)
    n_val, n_test = round(VAL_FRACTION * n), round(TEST_FRACTION * n)
    train, val, test = hold_out(n, [n_val, n_test], split_seed)
    description = (
        f"scikit-learn digits (8×8, values 0..16 scaled to [0,1], upsampled bilinear to {MODEL_SIZE}×{MODEL_SIZE}); "
        f"{len(train)}/{len(val)}/{len(test)} train/val/test drawn by split seed {split_seed}"
    )
    return ImageSplits(
        name="digits",
        train=images[train], val=images[val], test=images[test],
        train_labels=labels[train], val_labels=labels[val], test_labels=labels[test],
        native_hw=(NATIVE_SIZE, NATIVE_SIZE),
        description=description,
    )
