"""The conv encoder/decoder trunk shared by the Gaussian VAE and the VQ-VAE.

Both models use exactly these two classes with the same configuration, so a comparison between a post-hoc
codebook and an end-to-end VQ-VAE differs only in how the latent is made discrete. There is no BatchNorm
anywhere: Jacobians, codes and samples then never depend on batch statistics or on train/eval mode.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from geovq.config import TrunkConfig

__all__ = ["Decoder", "Encoder", "JVP_RULES", "ResBlock", "SubPixelConvTranspose2d", "TrunkConfig", "layer_jvp"]


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the VQ-VAE paper's residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels // 2, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SubPixelConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) computed as one 3×3 convolution into 4× the channels and
    a pixel shuffle: the same parameters (state dicts are interchangeable), the same map up to float rounding.

    Why: on CPU, torch's transposed convolution to a few channels (the decoder's last layer, to the image)
    runs about 3× slower than this form (bench: 32 -> 1 channels, 14×14 -> 28×28, 111 images: 7.1 ms against
    2.4 ms; 8×8 -> 16×16, 300 images: 6.6 against 2.3), and that layer is most of a small decoder's time in
    the geometry engine's curve minimisation. For many output channels the transposed convolution is faster
    (64 -> 32: 5.9 against 14.4 ms), so only the last layer uses this.

    Output pixel (2m + a, 2n + b) of a stride-2, kernel-4 transposed convolution sums input pixels m − 1 + a and
    m + a (rows; columns alike) times kernel rows 3 − 2t (a = 0) or 2 − 2t (a = 1): each of the four output
    phases (a, b) is a 3×3 convolution whose kernel holds those 2×2 taps, and the four phases interleave by
    `pixel_shuffle`.
    """

    # for output phase a (rows; columns alike) and 3×3 tap t: the transposed kernel's row, and whether the tap
    # is used (a = 0: taps 0, 1 <- rows 3, 1; a = 1: taps 1, 2 <- rows 2, 0)
    TAP_ROW = ((3, 1, 0), (0, 2, 0))
    TAP_USED = ((1.0, 1.0, 0.0), (0.0, 1.0, 1.0))

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 4, stride=2, padding=1)

    def phase_weight(self) -> torch.Tensor:
        """(4·out, in, 3, 3): the four phases' 3×3 kernels, in pixel_shuffle's channel order (o, a, b)."""
        row = torch.tensor(self.TAP_ROW, device=self.weight.device)  # (2, 3)
        used = torch.tensor(self.TAP_USED, dtype=self.weight.dtype, device=self.weight.device)
        taps = self.weight[:, :, row[:, None, :, None], row[None, :, None, :]]  # (in, out, a, b, ty, tx)
        taps = taps * (used[:, None, :, None] * used[None, :, None, :])
        return taps.permute(1, 2, 3, 0, 4, 5).reshape(4 * self.out_channels, self.in_channels, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffled(x, self.phase_weight(), self.bias)

    @staticmethod
    def shuffled(x: torch.Tensor, phase_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer on x (B, in, h, w) -> (B, out, 2h, 2w) given its `phase_weight()`; bias None: its linear
        part (the Jacobian applied to a tangent)."""
        bias = None if bias is None else bias.repeat_interleave(4)
        return F.pixel_shuffle(F.conv2d(x, phase_weight, bias, padding=1), 2)


class Encoder(nn.Module):
    """(B, in, H, W) images -> (B, out_channels, h, w) grid."""

    def __init__(self, cfg: TrunkConfig, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = cfg.in_channels
        for i in range(cfg.downsamples):
            width = cfg.hidden if i == cfg.downsamples - 1 else cfg.hidden // 2
            layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.ReLU()]
            ch = width
        layers += [nn.Conv2d(ch, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, C, h, w) latent grid -> (B, in, H, W) logits; `mean` gives the predicted image in [0, 1]."""

    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        ch = cfg.hidden
        for i in range(cfg.downsamples):
            last = i == cfg.downsamples - 1
            out = cfg.in_channels if last else cfg.hidden // 2
            up = SubPixelConvTranspose2d(ch, out) if last else nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)
            layers += [nn.ReLU(), up]
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """The predicted image mean in [0, 1]; Jacobians and metrics are always of this."""
        return torch.sigmoid(self.net(z))

    @torch.no_grad()
    def mean_jvp(self, z: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`mean` at z (B, C, h, w) and its Jacobian applied to m tangents (m, B, C, h, w) -> (m, B, ...).

        The same numbers as `torch.func.jvp` (the tests compare them), at about 2 forward passes per tangent
        instead of 3: torch's forward-mode rule for a convolution also convolves the primal input with the
        weight's tangent, a zero tensor here that is still convolved densely. The geometry engine uses this
        when the decoder it is given has a `jvp` (see `geovq.stages.common.GridDecoder`). All m tangents share
        the one primal pass.
        """
        x, dx = layer_jvp(self.net, z, tangents.flatten(0, 1))
        y = torch.sigmoid(x)
        return y, dx.unflatten(0, (tangents.shape[0], -1)) * (y * (1 - y))


# -- forward-mode rules ---------------------------------------------------------------------------------
# Each rule maps (layer, x, dx) -> (layer(x), J_layer(x)·dx), where x is a batch (B, ...) and dx holds m
# tangents per row of x, flattened to (m·B, ...). Linear layers apply their linear part to dx (no bias);
# ReLU masks each tangent by its row's active units; containers chain their children. A layer type not in
# the table (or a subclass: rules are looked up by exact type) fails loudly rather than guess.
JvpRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _sequential_jvp(layer: nn.Sequential, x: torch.Tensor, dx: torch.Tensor):
    for sub in layer:
        x, dx = layer_jvp(sub, x, dx)
    return x, dx


def _residual_jvp(layer: ResBlock, x: torch.Tensor, dx: torch.Tensor):
    y, dy = layer_jvp(layer.body, x, dx)
    return x + y, dx + dy


def _relu_jvp(layer: nn.ReLU, x: torch.Tensor, dx: torch.Tensor):
    active = x > 0  # broadcast over the m tangents of each row
    return x.clamp_min(0), (dx.unflatten(0, (-1, x.shape[0])) * active).flatten(0, 1)


def _conv_jvp(layer: nn.Conv2d, x: torch.Tensor, dx: torch.Tensor):
    if layer.padding_mode != "zeros":  # F.conv2d pads with zeros only
        raise TypeError(f"no JVP rule for Conv2d with padding_mode={layer.padding_mode!r}")
    return layer(x), F.conv2d(dx, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _conv_transpose_jvp(layer: nn.ConvTranspose2d, x: torch.Tensor, dx: torch.Tensor):
    return layer(x), F.conv_transpose2d(dx, layer.weight, None, layer.stride, layer.padding, layer.output_padding,
                                        layer.groups, layer.dilation)


def _subpixel_jvp(layer: SubPixelConvTranspose2d, x: torch.Tensor, dx: torch.Tensor):
    weight = layer.phase_weight()  # once for the primal and the tangents
    return layer.shuffled(x, weight, layer.bias), layer.shuffled(dx, weight, None)


JVP_RULES: dict[type[nn.Module], JvpRule] = {
    nn.Sequential: _sequential_jvp,
    ResBlock: _residual_jvp,
    nn.ReLU: _relu_jvp,
    nn.Conv2d: _conv_jvp,
    nn.ConvTranspose2d: _conv_transpose_jvp,
    SubPixelConvTranspose2d: _subpixel_jvp,
}


def layer_jvp(layer: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(x), J_layer(x)·dx) by the rule for the layer's type in JVP_RULES."""
    rule = JVP_RULES.get(type(layer))
    if rule is None:
        raise TypeError(f"no JVP rule for {type(layer).__name__} in the trunk decoder; add one to JVP_RULES")
    return rule(layer, x, dx)
