"""Multiply-adds of a backbone per image, counted from the network itself.

insightface arcface_torch's ``flops.py`` prints ptflops' multiply-accumulates as "GFLOPs" (plus the
ViT's ``extra_gflops`` for the attention matmuls), which is what its README tables quote: r18 2.6,
r50 6.3, r100 12.1, mobilefacenet 0.45, ViT-T 1.5, ViT-S 5.7, ViT-B 11.4, ViT-L 25.3. A multiply-add
is two floating-point operations: the FLOPs a machine's peak is quoted in are twice these figures
(r100 24.2 GFLOPs, as OpenVINO lists iresnet100).

Counted: Conv2d (groups included) and Dense from the shapes they really see in one forward pass,
plus the matmuls a cell declares through ``extra_macs(input_shape)`` (the ViT
attention's q.k^T and attn.v). Not counted: biases, BatchNorm, activations, element-wise ops (ptflops
adds those, hence its figures are ~1% higher).
"""

from __future__ import annotations

import numpy as np

from src.errors import ArcFaceError


def conv2d_macs(cell, output_shape) -> int:
    """Multiply-accumulates of an nn.Conv2d producing ``output_shape`` (N, C_out, H, W)."""
    kernel_h, kernel_w = cell.kernel_size
    return int(np.prod(output_shape)) * (cell.in_channels // cell.group) * kernel_h * kernel_w


def dense_macs(cell, input_shape) -> int:
    """Multiply-accumulates of an nn.Dense on an input of ``input_shape`` (..., in_channels)."""
    return int(np.prod(input_shape[:-1])) * cell.in_channels * cell.out_channels


def gmacs(backbone, image_size: int = 112) -> float:
    """Multiply-accumulates (in 1e9) for one ``image_size`` x ``image_size`` image.

    Runs one PyNative inference forward pass with forward hooks, then restores the execution
    mode, every cell's train flag and phase, and removes the hooks.
    """
    import mindspore as ms
    from mindspore import nn

    counts = []

    def on_conv(cell, args, output):
        counts.append(conv2d_macs(cell, output.shape))

    def on_dense(cell, args, output):
        counts.append(dense_macs(cell, args[0].shape))

    def on_extra(cell, args, output):
        counts.append(int(cell.extra_macs(args[0].shape)))

    cells = [cell for _, cell in backbone.cells_and_names()]
    saved = [(cell, cell.training, cell.phase) for cell in cells]
    mode = ms.get_context("mode")
    handles = []
    try:
        for cell in cells:
            if isinstance(cell, nn.Conv2d):
                handles.append(cell.register_forward_hook(on_conv))
            elif isinstance(cell, nn.Dense):
                handles.append(cell.register_forward_hook(on_dense))
            if callable(getattr(cell, "extra_macs", None)):
                handles.append(cell.register_forward_hook(on_extra))
        ms.set_context(mode=ms.PYNATIVE_MODE)
        backbone.set_train(False)
        image = ms.Tensor(np.zeros((1, 3, image_size, image_size), np.float32))
        try:
            backbone(image)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ArcFaceError(f"cannot run the backbone on a 3x{image_size}x{image_size} image: "
                               f"{str(err).splitlines()[0]}") from None
    finally:
        for handle in handles:
            handle.remove()
        for cell, training, phase in saved:
            cell.add_flags(training=training)
            cell.phase = phase
        ms.set_context(mode=mode)
    return sum(counts) / 1e9
