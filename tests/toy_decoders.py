"""Small decoders for geometry tests: cheap, deterministic, with cells that see their neighbours."""

from __future__ import annotations

import torch
from torch import nn


class ConvDecoder(nn.Module):
    """μ-grids (B, h, w, C) -> images (B, 1, 2h, 2w), a 3×3 conv mixing neighbouring cells."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Conv2d(channels, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(torch.tanh(self.mix(grids.permute(0, 3, 1, 2)))))
