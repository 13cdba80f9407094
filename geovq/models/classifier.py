"""The domain classifier whose features give the domain FID and precision/recall of samples (DESIGN.md §4).

A small conv net trained on the dataset's own training split: three 3×3 convolutions (two of stride 2), a
`features`-wide ReLU layer on the flattened maps (the feature space: it keeps where strokes are, which
pooling would lose), and a linear class head. No BatchNorm, so features never depend on the batch or on
train/eval mode.
"""

from __future__ import annotations

import torch
from torch import nn


class DomainClassifier(nn.Module):
    def __init__(self, in_channels: int, image_size: tuple[int, int], n_classes: int, width: int = 32,
                 features: int = 64) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.n_classes = in_channels, tuple(image_size), n_classes
        self.width, self.n_features = width, features
        cells = -(-self.image_size[0] // 4) * -(-self.image_size[1] // 4)  # after two stride-2 convolutions
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * cells, features), nn.ReLU())
        self.head = nn.Linear(features, n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, ch, H, W) images in [0, 1] -> (B, features)."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        return self.head(self.trunk(images))

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "image_size": list(self.image_size), "n_classes": self.n_classes,
                "width": self.width, "features": self.n_features}
