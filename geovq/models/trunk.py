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

__all__ = ["Decoder", "Encoder", "JVP_RULES", "ResBlock", "TrunkConfig", "layer_jvp"]


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
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
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


JVP_RULES: dict[type[nn.Module], JvpRule] = {
    nn.Sequential: _sequential_jvp,
    ResBlock: _residual_jvp,
    nn.ReLU: _relu_jvp,
    nn.Conv2d: _conv_jvp,
    nn.ConvTranspose2d: _conv_transpose_jvp,
}


def layer_jvp(layer: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(x), J_layer(x)·dx) by the rule for the layer's type in JVP_RULES."""
    rule = JVP_RULES.get(type(layer))
    if rule is None:
        raise TypeError(f"no JVP rule for {type(layer).__name__} in the trunk decoder; add one to JVP_RULES")
    return rule(layer, x, dx)
