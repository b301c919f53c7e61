"""Convolutions, PReLU and BatchNorm for training on the CPU (the operators of cpu_ops.cc, on oneDNN).

MindSpore's CPU Conv2D and its two gradients hand oneDNN plain NCHW tensors, on which oneDNN runs
im2col + GEMM; left free to choose the memory layout, the same library runs direct kernels on
blocked layouts, as PyTorch has it do (bench/README.md: `profile_step.py --onednn`). The operators
run on a private copy of MindSpore's oneDNN library, a second instance of it with its own limit on
instruction sets: theirs uses all the CPU has (AVX-512 where present), while MindSpore's instance
stays at AVX2 (src/runtime.py: above it, its plain-layout convolutions fall back to reference
code). `Conv2d` is
nn.Conv2d (the same parameter, so checkpoints, imports and exports are unchanged) whose training
graph on the CPU runs cpu_ops.cc's forward, input-gradient and weight-gradient operators instead.
`prelu_operators` give the backbones' training PReLU on the CPU its forward pass, input gradient and
slope gradient (src/models/iresnet.py): oneDNN's PReLU and a reduction of ours read and write each
tensor once, where the same arithmetic from MindSpore's element-wise kernels takes several passes
over tensors of the activation's size.
`BatchNorm2d` is nn.BatchNorm2d whose training graph on the CPU runs cpu_ops.cc's batch normalization:
loops that read each tensor the fewest times the arithmetic allows, on the operators' threads, where
oneDNN's kernel for plain layouts (MindSpore's BatchNorm) took about twice as long forward and backward.
Inference, export, other devices, float16 inputs and convolutions those operators do not cover
(groups, dilation, bias, even kernels, other paddings) keep MindSpore's operator, and so does
everything when the library cannot be built (no C++ compiler or no oneDNN headers, which
`make install` puts into the environment): a warning says so once.

The library is compiled once per source, headers and oneDNN library (its bytes' hash) into a cache folder
($ARCFACE_CACHE_DIR, else $XDG_CACHE_HOME/arcface-mindspore or ~/.cache/arcface-mindspore), under
a name carrying the hash of what it was built from, beside the hash of its own bytes, which is
checked before every reuse. ARCFACE_CPU_OPS=0 turns the operators off.
"""
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import mindspore as ms
from mindspore import nn, ops

from src.errors import ArcFaceError
from src.files import atomic_write

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_ops.cc")
_log = logging.getLogger(__name__)


def cache_folder():
    if os.environ.get("ARCFACE_CACHE_DIR"):
        return os.environ["ARCFACE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arcface-mindspore")


def _onednn_library():
    """MindSpore's oneDNN library: the operators run a copy of it (the version MindSpore was built with)."""
    path = os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.3")
    return path if os.path.isfile(path) else None


def _onednn_headers():
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        folder = os.path.join(prefix, "include")
        if os.path.isfile(os.path.join(folder, "oneapi", "dnnl", "dnnl.h")):
            return folder
    return None


_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-DONEDNN_ISA=dnnl_cpu_isa_default",
          # MindSpore closes a kernel's library with its graph; the pool's threads and the oneDNN state
          # must outlive that
          "-Wl,-z,nodelete"]


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


@functools.cache
def library():
    """Path of the built operators' library, or None (the reason logged once as a warning)."""
    if os.environ.get("ARCFACE_CPU_OPS", "1") == "0":
        return None
    try:
        path = _build()
        if not ctypes.CDLL(path).CpuOpsReady():
            raise RuntimeError(f"the operators' copy of oneDNN could not be set up (see the messages above; {path})")
        return path
    except (OSError, subprocess.SubprocessError, RuntimeError, ArcFaceError) as exc:
        _log.warning("training convolutions, PReLU and BatchNorm run on MindSpore's CPU kernels (slower): %s", exc)
        return None


def _build():
    dnnl, headers = _onednn_library(), _onednn_headers()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if dnnl is None:
        raise RuntimeError("this MindSpore has no lib/libdnnl.so.3")
    if headers is None:
        raise RuntimeError("no oneDNN headers (`make install` installs them: pip install --no-deps onednn-devel)")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++)")
    with open(SOURCE, "rb") as fh:
        source = fh.read()  # read once: the hash and the build both use these bytes
    with open(os.path.join(headers, "oneapi", "dnnl", "dnnl_version.h"), "rb") as fh:
        version = fh.read()
    with open(dnnl, "rb") as fh:
        onednn = fh.read()  # read once: its hash names the build and proves the copy
    onednn_hash = _sha256(onednn)
    identity = b"\0".join([source, version, onednn_hash.encode(), compiler.encode(), " ".join(_FLAGS).encode()])
    folder = cache_folder()
    built = os.path.join(folder, f"cpu_ops-{_sha256(identity)[:24]}.so")
    # A private copy of MindSpore's oneDNN: opened by the operators as a second instance of the library.
    copy = built[:-len(".so")] + "-onednn.so"
    if _verified(built) and _verified(copy, onednn_hash):
        return built
    white_list = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if white_list and os.path.commonpath([os.path.realpath(built), os.path.realpath(white_list)]) != \
            os.path.realpath(white_list):
        raise RuntimeError(f"MS_CUSTOM_AOT_WHITE_LIST ({white_list}) does not include {folder}")
    with tempfile.TemporaryDirectory() as scratch:
        src, out = os.path.join(scratch, "cpu_ops.cc"), os.path.join(scratch, "cpu_ops.so")
        with open(src, "wb") as fh:
            fh.write(source)
        done = subprocess.run([compiler, *_FLAGS, "-I", headers, f'-DONEDNN_COPY="{copy}"', src, "-o", out, "-ldl"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed:\n{done.stderr[-2000:]}")
        with open(out, "rb") as fh:
            binary = fh.read()
    if not _verified(copy, onednn_hash):  # only once the build succeeded: the copy is 58 MB
        atomic_write(copy, onednn)
        atomic_write(copy + ".sha256", onednn_hash)
    atomic_write(built, binary)
    atomic_write(built + ".sha256", _sha256(binary))
    stem = os.path.basename(built)[:-len(".so")]
    for name in os.listdir(folder):  # builds for another source or oneDNN (58 MB each with the copy)
        if name.startswith("cpu_ops-") and not name.startswith(stem):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
    _log.info("built the CPU training operators: %s", built)
    return built


def _verified(path, expected=None):
    """True when `path` exists and its bytes hash to the value recorded when it was written (and to
    `expected` when given)."""
    try:
        with open(path, "rb") as fh, open(path + ".sha256", encoding="ascii") as record:
            digest = _sha256(fh.read())
            return digest == record.read().strip() and expected in (None, digest)
    except OSError:
        return False


class _OneDNNConvolution(nn.Cell):
    """(x, w) -> conv(x, w) with padding (k - 1) / 2 and `stride`, and its two gradients, by the
    operators of cpu_ops.cc."""

    def __init__(self, path, kernel, stride):
        super().__init__()
        pad = (kernel - 1) // 2

        def out_shape(x, w):
            return [x[0], w[0], (x[2] + 2 * pad - kernel) // stride + 1, (x[3] + 2 * pad - kernel) // stride + 1]

        def like_third(a, b, c):
            return c
        self.forward = ops.Custom(f"{path}:ConvForward", out_shape=out_shape, out_dtype=lambda x, w: x,
                                  func_type="aot")
        # PyNative mode reused the output shape of the first ConvForward for every other one with the
        # same inputs' shapes; the attributes make the kernel and stride part of what it compares.
        self.forward.add_prim_attr("kernel", kernel)
        self.forward.add_prim_attr("stride", stride)
        self.input_gradient = ops.Custom(f"{path}:ConvBackwardData", out_shape=like_third, out_dtype=like_third,
                                         func_type="aot")
        self.weight_gradient = ops.Custom(f"{path}:ConvBackwardWeights", out_shape=like_third,
                                          out_dtype=like_third, func_type="aot")

    def construct(self, x, w):
        return self.forward(x, w)

    def bprop(self, x, w, out, dout):
        return self.input_gradient(dout, w, x), self.weight_gradient(dout, x, w)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose float32 training graph on the CPU runs oneDNN's blocked-layout kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.onednn = None
        kernel, stride = self.kernel_size, self.stride
        pad = (kernel[0] - 1) // 2
        if self.pad_mode == "pad":
            padding = self.padding if isinstance(self.padding, tuple) else (self.padding,) * 4
            padded_alike = tuple(padding) == (pad,) * 4
        else:
            padded_alike = self.pad_mode == "valid" and pad == 0
        covered = (padded_alike and kernel[0] == kernel[1] and kernel[0] % 2 == 1 and stride[0] == stride[1]
                   and self.group == 1 and tuple(self.dilation) == (1, 1) and not self.has_bias)
        if covered and ms.get_context("device_target") == "CPU":
            path = library()
            if path:
                self.onednn = _OneDNNConvolution(path, kernel[0], stride[0])
        self.use_onednn = self.onednn is not None

    def construct(self, x):
        if self.use_onednn and self.training and x.dtype == ms.float32:
            return self.onednn(x, self.weight)
        return self.conv2d(x, self.weight)


class _BatchNormOperators(nn.Cell):
    """(x, scale, shift, moving mean, moving variance, (epsilon, momentum)) -> (y, the batch's mean and
    biased variance, the new moving mean and variance): batch normalization in training by the operators
    of cpu_ops.cc, with its gradients."""

    def __init__(self, path):
        super().__init__()
        self.forward = ops.Custom(f"{path}:BatchNormForward",
                                  out_shape=lambda x, c, *rest: (x, c, c, c, c),
                                  out_dtype=lambda x, c, *rest: (x, c, c, c, c), func_type="aot")
        self.backward = ops.Custom(f"{path}:BatchNormBackward",
                                   out_shape=lambda x, c, *rest: (x, c, c),
                                   out_dtype=lambda x, c, *rest: (x, c, c), func_type="aot")

    def construct(self, x, scale, shift, moving_mean, moving_variance, hyper):
        return self.forward(x, scale, shift, moving_mean, moving_variance, hyper)

    def bprop(self, x, scale, shift, moving_mean, moving_variance, hyper, out, dout):
        dx, dscale, dshift = self.backward(x, scale, out[1], out[2], dout[0], hyper)
        return (dx, dscale, dshift, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance),
                ops.zeros_like(hyper))


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose float32 training graph on the CPU runs cpu_ops.cc's batch normalization: the
    same normalization, gradients and moving statistics as MindSpore's BatchNorm (momentum the batch's
    weight, the batch's unbiased variance in the moving variance). Inference (so every export), other
    devices and use_batch_statistics set keep MindSpore's operators."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = library() if ms.get_context("device_target") == "CPU" else None
        self.onednn = _BatchNormOperators(path) if path else None
        self.use_onednn = self.onednn is not None
        self.hyper = ms.Tensor([self.eps, self.momentum], ms.float32)

    def construct(self, x):
        if self.use_onednn and self.training and self.use_batch_statistics is None and x.dtype == ms.float32:
            y, _, _, new_mean, new_variance = self.onednn(x, self.gamma, self.beta, self.moving_mean,
                                                          self.moving_variance, self.hyper)
            y = ops.depend(y, ops.assign(self.moving_mean, ops.stop_gradient(new_mean)))
            return ops.depend(y, ops.assign(self.moving_variance, ops.stop_gradient(new_variance)))
        return super().construct(x)


def prelu_operators(path):
    """PReLU as the operators (x, w) -> y, (x, w, dy) -> dx (oneDNN's) and (x, dy) -> dw (ours), for x
    (N, C, H, W) float32 and w (C,): y = x where x > 0 else w x; dx = dy where x > 0 else w dy; dw the
    sum over batch and space of dy x where x <= 0 (src/models/iresnet.py)."""
    forward = ops.Custom(f"{path}:PreluForward", out_shape=lambda x, w: x, out_dtype=lambda x, w: x,
                         func_type="aot")
    input_gradient = ops.Custom(f"{path}:PreluBackwardData", out_shape=lambda x, w, dy: x,
                                out_dtype=lambda x, w, dy: x, func_type="aot")
    weight_gradient = ops.Custom(f"{path}:PreluWeightGradient", out_shape=lambda x, dy: [x[1]],
                                 out_dtype=lambda x, dy: x, func_type="aot")
    return forward, input_gradient, weight_gradient
