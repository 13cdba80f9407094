"""The conv encoder/decoder trunk shared by the Gaussian VAE and the VQ-VAE.

Both models use exactly these two classes with the same configuration, so a comparison between a post-hoc
codebook and an end-to-end VQ-VAE differs only in how the latent is made discrete. There is no BatchNorm
anywhere: Jacobians, codes and samples then never depend on batch statistics or on train/eval mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrunkConfig:
    in_channels: int = 1  # image channels
    image_size: tuple[int, int] = (28, 28)  # (H, W) the nets see
    hidden: int = 64  # conv width
    latent_channels: int = 16  # C of the h×w×C latent grid
    downsamples: int = 2  # stride-2 stages: grid = image_size / 2**downsamples
    res_blocks: int = 2

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        f = 2**self.downsamples
        return self.image_size[0] // f, self.image_size[1] // f

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


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
        when the decoder it is given has a `jvp` (see `geovq.pipeline.GridDecoder`). All m tangents share
        the one primal pass.
        """
        x, dx = _layer_jvp(self.net, z, tangents.flatten(0, 1))
        y = torch.sigmoid(x)
        return y, dx.unflatten(0, (tangents.shape[0], -1)) * (y * (1 - y))


def _layer_jvp(layer: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(x), J_layer(x)·dx) for the trunk's layer types; dx holds m tangents per row of x, (m·B, ...)."""
    if isinstance(layer, nn.Sequential):
        for sub in layer:
            x, dx = _layer_jvp(sub, x, dx)
        return x, dx
    if isinstance(layer, ResBlock):
        y, dy = _layer_jvp(layer.body, x, dx)
        return x + y, dx + dy
    if isinstance(layer, nn.ReLU):
        active = x > 0  # broadcast over the m tangents of each row
        return x.clamp_min(0), (dx.unflatten(0, (-1, x.shape[0])) * active).flatten(0, 1)
    if isinstance(layer, nn.Conv2d):  # linear in the input: the tangent is the convolution without bias
        return layer(x), layer._conv_forward(dx, layer.weight, None)
    if isinstance(layer, nn.ConvTranspose2d):
        return layer(x), F.conv_transpose2d(dx, layer.weight, None, layer.stride, layer.padding,
                                            layer.output_padding, layer.groups, layer.dilation)
    raise TypeError(f"no JVP rule for {type(layer).__name__} in the trunk decoder")
