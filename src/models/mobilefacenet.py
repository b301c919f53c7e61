"""MobileFaceNet ("mbf") backbone for 112x112 face crops.

Layer layout follows the insightface ``arcface_torch`` ``get_mbf`` configuration
(blocks=(1, 4, 6, 2), scale=2): a strided 3x3 stem, inverted-bottleneck depthwise blocks with
residual stages, a 1x1 expansion to 512 channels and a global depthwise (GDC) head producing an
unnormalised embedding.  With ``num_features=512`` it has 2,059,520 trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
from mindspore import nn

from .iresnet import apply_fp16, batch_norm_1d, batch_norm_2d, conv2d, conv_init, prelu


class ConvBlock(nn.Cell):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, group: int = 1) -> None:
        super().__init__()
        self.layers = nn.SequentialCell(
            conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                   group=group),
            batch_norm_2d(out_channels),
            prelu(out_channels),
        )

    def construct(self, x):
        return self.layers(x)


class LinearBlock(nn.Cell):
    """conv (no bias) -> BN, no activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, group: int = 1) -> None:
        super().__init__()
        self.layers = nn.SequentialCell(
            conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                   group=group),
            batch_norm_2d(out_channels),
        )

    def construct(self, x):
        return self.layers(x)


class DepthWise(nn.Cell):
    """1x1 expand to ``hidden`` -> depthwise 3x3 (stride) -> 1x1 linear projection [+ input]."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int = 2,
                 residual: bool = False) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual DepthWise block needs stride 1 and equal channels")
        self.residual = residual
        self.layers = nn.SequentialCell(
            ConvBlock(in_channels, hidden, 1),
            ConvBlock(hidden, hidden, 3, stride=stride, padding=1, group=hidden),
            LinearBlock(hidden, out_channels, 1),
        )

    def construct(self, x):
        out = self.layers(x)
        if self.residual:
            out = out + x
        return out


class Residual(nn.Cell):
    """``num_blocks`` stride-1 residual DepthWise blocks at constant width."""

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.SequentialCell(
            [DepthWise(channels, channels, hidden, stride=1, residual=True)
             for _ in range(num_blocks)])

    def construct(self, x):
        return self.layers(x)


class GDC(nn.Cell):
    """Global depthwise 7x7 conv -> flatten -> Linear (no bias) -> BatchNorm1d."""

    def __init__(self, num_features: int, channels: int = 512) -> None:
        super().__init__()
        self.conv = LinearBlock(channels, channels, 7, group=channels)
        self.flatten = nn.Flatten()
        self.linear = nn.Dense(channels, num_features, weight_init=conv_init(), has_bias=False)
        self.bn = batch_norm_1d(num_features)

    def construct(self, x):
        x = self.conv(x)
        x = self.flatten(x)
        x = self.linear(x)
        return self.bn(x)


class MobileFaceNet(nn.Cell):
    """MobileFaceNet embedding network for 3x112x112 inputs (NCHW, float32)."""

    def __init__(self, num_features: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, fp16: bool = False) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {tuple(blocks)}")
        self.fp16_body = bool(fp16)
        self.num_features = num_features
        c1, c2 = 64 * scale, 128 * scale

        body = [ConvBlock(3, c1, 3, stride=2, padding=1)]
        if blocks[0] == 1:
            body.append(ConvBlock(c1, c1, 3, stride=1, padding=1, group=64))
        else:
            body.append(Residual(c1, blocks[0], hidden=128))
        body += [
            DepthWise(c1, c1, hidden=128, stride=2),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, hidden=256, stride=2),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, hidden=512, stride=2),
            Residual(c2, blocks[3], hidden=256),
        ]
        self.layers = nn.SequentialCell(body)
        self.conv_sep = ConvBlock(c2, 512, 1)
        self.features = GDC(num_features)

        if fp16:
            apply_fp16(self.layers)

    def construct(self, x):
        x = self.layers(x)
        if self.fp16_body:
            x = x.astype(ms.float32)
        x = self.conv_sep(x)
        return self.features(x)


def mobilefacenet(num_features: int = 512, fp16: bool = False) -> MobileFaceNet:
    """The insightface ``mbf`` configuration: blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(num_features=num_features, blocks=(1, 4, 6, 2), scale=2, fp16=fp16)
