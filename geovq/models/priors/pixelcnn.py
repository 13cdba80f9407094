"""A gated PixelCNN prior over a code grid (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"; DESIGN.md §3.8).

Two stacks per layer, as in the gated PixelCNN (no blind spot):
- the vertical stack sees the rows above and the current row (k//2+1 × k kernel, padded on top); it reaches
  the horizontal stack only shifted down by one row, so it carries rows strictly above;
- the horizontal stack sees the current row up to the current cell (1 × k//2+1 kernel, padded on the left).
When a cell holds G = C/d tokens, each feature map of the horizontal stack is cut into G channel blocks, one
per group (as PixelCNN's R, G, B sub-pixels), and the current-cell tap of every horizontal or 1×1
convolution is masked so that block g sees blocks < g of the cell's input ("A", first layer) and ≤ g of its
features ("B", later layers). The order is then exactly geovq's token order: row, column, group.
Each layer adds a learned bias per position (the grid is small and its border matters) and, when
conditioned, a per-class bias to both stacks.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from geovq.errors import GeovqError
from geovq.models.priors.base import CodeGrid, Prior


def channel_groups(channels: int, groups: int) -> torch.Tensor:
    """(channels,) the group of each channel when `channels` are cut into `groups` consecutive blocks."""
    return torch.arange(channels) // (channels // groups)


class MaskedConv2d(nn.Conv2d):
    """A convolution whose current-cell tap (kernel row `center[0]`, column `center[1]`) connects output
    group g only to input groups < g (`strict`) or ≤ g; the other taps see earlier cells and stay whole."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], in_groups: torch.Tensor,
                 out_groups: torch.Tensor, strict: bool, center: tuple[int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel)
        allowed = out_groups[:, None] > in_groups[None] if strict else out_groups[:, None] >= in_groups[None]
        mask = torch.ones_like(self.weight)
        mask[:, :, center[0], center[1]] = allowed.to(mask.dtype)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)  # each keeps the group-blocked channel order
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    def __init__(self, channels: int, groups: int, kernel: int, first: bool, grid: CodeGrid, n_classes: int,
                 dropout: float) -> None:
        super().__init__()
        self.pad, self.first = kernel // 2, first
        hidden_groups = channel_groups(channels, groups)
        gate_groups = hidden_groups.repeat(2)  # pre-activations: [tanh half | sigmoid half]
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.pad + 1, kernel))
        self.h_conv = MaskedConv2d(channels, 2 * channels, (1, self.pad + 1), hidden_groups, gate_groups,
                                   strict=first, center=(0, self.pad))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)  # rows above only: no mask
        self.h_out = MaskedConv2d(channels, channels, (1, 1), hidden_groups, hidden_groups, strict=False,
                                  center=(0, 0))
        self.position = nn.Parameter(torch.zeros(2, 2 * channels, grid.height, grid.width))  # v, h
        self.class_bias = nn.Embedding(n_classes, 4 * channels) if n_classes else None
        self.drop = nn.Dropout(dropout)

    def _class_bias(self, labels: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(B, 2·channels, 1, 1) class biases of the vertical and horizontal stacks (0 when unconditional)."""
        if self.class_bias is None:
            return 0.0, 0.0
        return self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)

    def vertical(self, v: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """v (B, channels, height, width) -> (the next layer's v, `above`: the pre-activations shifted down one
        row, which carry rows strictly above each cell to the horizontal stack)."""
        p = self.pad
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0))) + self.position[0] + self._class_bias(labels)[0]  # rows ≤ i
        return _gate(v_pre), F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]

    def horizontal(self, h: torch.Tensor, above: torch.Tensor, labels: torch.Tensor | None, rows: slice
                   ) -> torch.Tensor:
        """h (B, channels, r, width) of grid rows `rows`, with their `above` (B, 2·channels, r, width) -> the
        next layer's h. Rows are independent here, so sampling runs one row at a time."""
        h_pre = (self.h_conv(F.pad(h, (self.pad, 0, 0, 0))) + self.v_to_h(above) + self.position[1][:, rows]
                 + self._class_bias(labels)[1])
        h_new = self.drop(self.h_out(_gate(h_pre)))
        # The first layer's input holds the current code itself: no residual around it.
        return h_new if self.first else h + h_new


class PixelCNNPrior(Prior):
    """Gated PixelCNN of `layers` layers and `hidden` channels (cut into the grid's groups), kernel `kernel`."""

    def __init__(self, grid: CodeGrid, n_classes: int = 0, layers: int = 6, hidden: int = 64, kernel: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__(grid, n_classes)
        if hidden % grid.groups:
            raise GeovqError(f"pixelcnn hidden={hidden} must be divisible by the {grid.groups} tokens per cell")
        if kernel < 3 or kernel % 2 == 0:
            raise GeovqError(f"pixelcnn kernel {kernel} must be odd and >= 3")
        self.code_emb = nn.Embedding(grid.n_codes, hidden // grid.groups)  # one codebook shared by all groups
        self.layers = nn.ModuleList(GatedLayer(hidden, grid.groups, kernel, i == 0, grid, n_classes, dropout)
                                    for i in range(layers))
        groups = channel_groups(hidden, grid.groups)
        out_groups = torch.arange(grid.groups * grid.n_codes) // grid.n_codes
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(hidden, hidden, (1, 1), groups, groups, strict=False, center=(0, 0)),
            nn.ReLU(), MaskedConv2d(hidden, grid.groups * grid.n_codes, (1, 1), groups, out_groups,
                                    strict=False, center=(0, 0)))

    def _embed(self, codes: torch.Tensor, rows: slice) -> torch.Tensor:
        """(N, T) codes -> (N, G·e, r, width) input maps of grid rows `rows`, channels blocked by group."""
        g, n = self.grid, len(codes)
        grid_codes = codes.view(n, g.height, g.width, g.groups)[:, rows]
        return self.code_emb(grid_codes).flatten(3).permute(0, 3, 1, 2)

    def _logits_of_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Last horizontal features (N, channels, r, width) -> (N, r·width·G, K) logits in token order."""
        g, n, r = self.grid, len(h), h.shape[2]
        out = self.head(h).view(n, g.groups, g.n_codes, r, g.width)
        return out.permute(0, 3, 4, 1, 2).reshape(n, r * g.width * g.groups, g.n_codes)

    def logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        everything = slice(None)
        v = h = self._embed(codes, everything)
        for layer in self.layers:
            v, above = layer.vertical(v, labels)
            h = layer.horizontal(h, above, labels, everything)
        return self._logits_of_rows(h)

    def next_logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> Iterator[torch.Tensor]:
        # Once per row i: the vertical stack on the grid (rows ≥ i are not drawn yet, and `above` at row i
        # never sees them). Then per token of row i: the horizontal stack and head on that row alone.
        g = self.grid
        per_row = g.width * g.groups
        for i in range(g.height):
            v, aboves, row = self._embed(codes, slice(None)), [], slice(i, i + 1)
            for layer in self.layers:
                v, above = layer.vertical(v, labels)
                aboves.append(above[:, :, row])
            for t in range(per_row):
                h = self._embed(codes, row)
                for layer, above in zip(self.layers, aboves):
                    h = layer.horizontal(h, above, labels, row)
                yield self._logits_of_rows(h)[:, t]
