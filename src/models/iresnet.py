"""Improved ResNet (IResNet) backbones for 112x112 face crops.

The topology follows the insightface ``arcface_torch`` IResNet family so parameter counts and
layer order line up with the published models:

* stem: conv3x3(3->64, stride 1) -> BN -> PReLU
* four stages of ``IBasicBlock`` with widths 64/128/256/512; the first block of every stage has
  stride 2, so a 112x112 input ends as a 512x7x7 feature map
* head: BN2d -> flatten -> dropout -> Dense(25088->num_features) -> BatchNorm1d whose scale is
  fixed at 1 (not trainable)

The output is the raw (unnormalised) embedding in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, Normal, Zero
from mindspore.ops.operations import _grad_ops

from src.models import cpu_ops
from src.models.cpu_ops import BatchNorm2d, Conv2d

BN_EPS = 1e-5
# MindSpore's momentum weights the running statistic (PyTorch momentum 0.1 <=> 0.9 here).
BN_MOMENTUM = 0.9
PRELU_INIT = 0.25

# Number of IBasicBlocks in each of the four stages.
IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

WIDTH = 64  # channels of the stem and first stage; the stages use 1x, 2x, 4x, 8x
_FEATURE_MAP_SIZE = 7  # 112 / 2**4


def conv_init() -> HeNormal:
    """Kaiming-normal initialiser (fan_out, ReLU gain) used for every convolution."""
    return HeNormal(mode="fan_out", nonlinearity="relu")


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: int = 0, group: int = 1) -> nn.Conv2d:
    """Bias-free convolution with explicit symmetric zero padding (matches PyTorch striding); in
    float32 training on the CPU it runs oneDNN's blocked-layout kernels (src/models/cpu_ops.py)."""
    if padding:
        pad_kwargs = {"pad_mode": "pad", "padding": padding}
    else:
        pad_kwargs = {"pad_mode": "valid"}
    return Conv2d(in_channels, out_channels, kernel_size, stride=stride, group=group,
                  has_bias=False, weight_init=conv_init(), **pad_kwargs)


def batch_norm_2d(num_features: int) -> nn.BatchNorm2d:
    return BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, gamma_init="ones", beta_init="zeros")


def batch_norm_1d(num_features: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM,
                          gamma_init="ones", beta_init="zeros")


class _ChannelSlopes(nn.Cell):
    """(x (N, C, H, W), w (C,)) -> PReLU(x, w) from kernels that are fast on CPU, with its own backward
    so that only x is kept for it (as PReLU keeps), not the intermediate tensors.

    forward   relu(x) + w * (x - relu(x)), the per-channel product as a depthwise 1x1 convolution;
    backward  split dy by the sign of x: p = dy where x > 0 (ReluGrad), n = dy - p; then
              dx = p + w n (exactly PReLUGrad's: dy where x > 0, w dy where x <= 0, also at x = 0)
              and dw = the sum of n * x over batch and space (the depthwise convolution's filter
              gradient). Four temporaries of x's size, the fewest of the forms measured."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.depthwise = ops.Conv2D(channels, 1, group=channels)
        self.filter_gradient = _grad_ops.Conv2DBackpropFilter(channels, 1, group=channels)
        self.relu = ops.ReLU()
        self.relu_gradient = _grad_ops.ReluGrad()

    def construct(self, x, w):
        positive = self.relu(x)
        return positive + self.depthwise(x - positive, w.reshape(self.channels, 1, 1, 1))

    def split(self, x, dout):
        """(p, n, dw) of the backward above."""
        positive = self.relu_gradient(dout, x)
        negative = dout - positive
        dw = self.filter_gradient(negative, x, (self.channels, 1, 1, 1))
        return positive, negative, dw.reshape(self.channels)

    def bprop(self, x, w, out, dout):
        positive, negative, dw = self.split(x, dout)
        return positive + self.depthwise(negative, w.reshape(self.channels, 1, 1, 1)), dw


class _OneDNNSlopes(_ChannelSlopes):
    """_ChannelSlopes (float32) on the operators of src/models/cpu_ops.py: the forward pass and dx are
    oneDNN's PReLU, dw a reduction of our own, one pass over the tensors each. (oneDNN's PReLU gradient
    computes dw only with dx, which as an operator of its own made MindSpore keep 0.7 GB more at the r50
    step's peak; ours returns dw alone.)"""

    def __init__(self, channels: int, library: str) -> None:
        super().__init__(channels)
        self.prelu_forward, self.prelu_input_gradient, self.prelu_weight_gradient = cpu_ops.prelu_operators(library)

    def construct(self, x, w):
        return self.prelu_forward(x, w)

    def bprop(self, x, w, out, dout):
        return self.prelu_input_gradient(x, w, dout), self.prelu_weight_gradient(x, dout)


class PReLU(nn.PReLU):
    """nn.PReLU (the same parameter `w`, so checkpoints and imported models load unchanged) whose
    training graph is built from faster CPU kernels.

    MindSpore's CPU PReLU and PReLUGrad kernels compute a channel index with an integer division per
    element and branch on its sign (a data-dependent speed); broadcasting the slope over NCHW is slow
    too. In training on CPU this cell computes the same function with relu, element-wise arithmetic
    and a depthwise 1x1 convolution (`_ChannelSlopes`): forward + backward take about half the time
    of PReLU + PReLUGrad, and the r50 step's peak memory is the PReLU operator's (bench/README.md).
    In float32, with the operators of src/models/cpu_ops.py, the forward pass and dx are oneDNN's
    PReLU and dw a reduction of ours, one pass over the tensors each (`_OneDNNSlopes`).
    Inference (and so every export) keeps the PReLU operator, and so do other devices (the device
    chosen when the cell is built), whose kernels are not these.
    """

    def __init__(self, channel: int = 1, w: float = PRELU_INIT) -> None:
        super().__init__(channel=channel, w=w)
        self.channels = channel
        self.rewrite = ms.get_context("device_target") == "CPU"
        self.slopes = _ChannelSlopes(channel)
        library = cpu_ops.library() if self.rewrite else None
        self.onednn = _OneDNNSlopes(channel, library) if library else None
        self.use_onednn = self.onednn is not None

    def construct(self, x):
        w = ops.cast(self.w, x.dtype)
        if self.rewrite and self.training and x.ndim == 4 and x.shape[1] == self.channels:
            if self.use_onednn and x.dtype == ms.float32:
                return self.onednn(x, w)
            return self.slopes(x, w)
        return self.prelu(x, w)


def prelu(channels: int) -> PReLU:
    return PReLU(channel=channels, w=PRELU_INIT)


def apply_fp16(body: nn.Cell) -> None:
    """Run ``body`` in float16 while every BatchNorm inside it keeps computing in float32.

    Only cast flags are set: parameters stay float32, so checkpoints are identical with or
    without mixed precision.
    """
    body.to_float(ms.float16)
    for _, cell in body.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)):
            cell.to_float(ms.float32)


class IBasicBlock(nn.Cell):
    """Pre-activation style residual block: BN-conv-BN-PReLU-conv-BN plus shortcut, no final act."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = batch_norm_2d(in_channels)
        self.conv1 = conv2d(in_channels, channels, 3, stride=1, padding=1)
        self.bn2 = batch_norm_2d(channels)
        self.prelu = prelu(channels)
        self.conv2 = conv2d(channels, channels, 3, stride=stride, padding=1)
        self.bn3 = batch_norm_2d(channels)
        self.has_downsample = stride != 1 or in_channels != channels
        if self.has_downsample:
            self.downsample = nn.SequentialCell(
                conv2d(in_channels, channels, 1, stride=stride),
                batch_norm_2d(channels),
            )
        else:
            self.downsample = nn.Identity()

    def construct(self, x):
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + self.downsample(x)


class IResNet(nn.Cell):
    """IResNet embedding network for 3x112x112 inputs (NCHW, float32)."""

    def __init__(self, layers: Sequence[int], num_features: int = 512, dropout: float = 0.0,
                 fp16: bool = False, width: int = WIDTH) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {tuple(layers)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.fp16_body = bool(fp16)
        self.num_features = num_features

        self.conv1 = conv2d(3, width, 3, stride=1, padding=1)
        self.bn1 = batch_norm_2d(width)
        self.prelu = prelu(width)
        in_channels = width
        stages = []
        for multiple, depth in zip((1, 2, 4, 8), layers):
            stages.append(self._make_stage(in_channels, width * multiple, depth))
            in_channels = width * multiple
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.bn2 = batch_norm_2d(in_channels)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Dense(in_channels * _FEATURE_MAP_SIZE * _FEATURE_MAP_SIZE, num_features,
                           weight_init=Normal(sigma=0.01), bias_init=Zero(), has_bias=True)
        self.features = batch_norm_1d(num_features)
        # The embedding BN only centres/shifts: its scale stays at 1.
        self.features.gamma.requires_grad = False

        if fp16:
            for cell in (self.conv1, self.bn1, self.prelu,
                         self.layer1, self.layer2, self.layer3, self.layer4):
                apply_fp16(cell)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, depth: int) -> nn.SequentialCell:
        blocks = [IBasicBlock(in_channels, channels, stride=2)]
        blocks += [IBasicBlock(channels, channels, stride=1) for _ in range(1, depth)]
        return nn.SequentialCell(blocks)

    def construct(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        if self.fp16_body:
            x = x.astype(ms.float32)
        x = self.bn2(x)
        x = self.flatten(x)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def iresnet(name: str, num_features: int = 512, dropout: float = 0.0,
            fp16: bool = False, width: int = WIDTH) -> IResNet:
    """Build the IResNet variant ``name`` (one of ``IRESNET_LAYERS``). ``width`` 64 is the
    published network; narrower ones train much faster for experiments and the demo."""
    return IResNet(IRESNET_LAYERS[name], num_features=num_features, dropout=dropout, fp16=fp16,
                   width=width)


def torch_style_init(net: IResNet, seed: int = 0) -> None:
    """Re-initialise as insightface arcface_torch does: every convolution N(0, 0.1), the embedding
    Dense with PyTorch's default Linear init (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
    BatchNorm (1, 0) and PReLU (0.25) start the same in both schemes. With BatchNorm after every
    convolution this changes the effective early learning rate, not the function."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            cell.weight.set_data(ms.Tensor(rng.normal(0.0, 0.1, cell.weight.shape).astype(np.float32)))
        elif isinstance(cell, nn.Dense):
            bound = 1.0 / np.sqrt(cell.in_channels)
            cell.weight.set_data(ms.Tensor(rng.uniform(-bound, bound, cell.weight.shape).astype(np.float32)))
            if cell.has_bias:
                cell.bias.set_data(ms.Tensor(rng.uniform(-bound, bound, cell.bias.shape).astype(np.float32)))
