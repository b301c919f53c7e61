"""What every entry script shares: turning user errors into one line on stderr and exit code 2, and the
one model/device option group of the doors that run or export a model (val.py, eval_onnx.py,
eval_ijbc_onnx.py, embed.py, export.py).

Each shared option is defined once, in MODEL_OPTIONS; a door picks the ones that apply to it and
overrides only what the model zoo's seed gives it differently (eval_onnx.py offers no Ascend, export.py's
--batch_size defaults to a dynamic batch). src.evaluation.embedders.model_from_args turns the parsed
options into an opened model.
"""
import sys

from src.errors import ArcFaceError

DEVICES = ("Ascend", "GPU", "CPU")
# What runs a model (src.evaluation.embedders: which backend runs which kind of model).
BACKENDS = ("auto", "mindspore", "onnxruntime")

MODEL_OPTIONS = {
    "device_target": dict(default="CPU", choices=DEVICES, help="device to run on (default: %(default)s)"),
    "device_id": dict(type=int, default=0, help="device number (default: %(default)s)"),
    "batch_size": dict(type=int, default=64, help="images per forward pass (default: %(default)s)"),
    "backend": dict(default="auto", choices=BACKENDS,
                    help="what runs the model. auto (default): a checkpoint runs in ONNX Runtime on the CPU when "
                         "it is installed (exported once to a cached ONNX file next to it, checked against the "
                         "checkpoint on every use), in MindSpore on GPU/Ascend; a .mindir runs in MindSpore, an "
                         ".onnx in ONNX Runtime"),
    "network": dict(default=None, help="checkpoint: backbone (default: as recorded in it, else r100)"),
    "width": dict(type=int, default=None, help="checkpoint: iresnet/ViT width (default: as recorded in it, else 64)"),
    "num_features": dict(type=int, default=None,
                         help="checkpoint: embedding size (default: as recorded in it, else 512)"),
    "input_mean": dict(type=float, default=None, help="ONNX: pixel mean the model expects (default: 127.5)"),
    "input_std": dict(type=float, default=None, help="ONNX: pixel std the model expects (default: 127.5)"),
}
DEVICE = ("device_target", "device_id")
ARCHITECTURE = ("network", "width", "num_features")  # how to rebuild a checkpoint's backbone
ONNX_INPUT = ("input_mean", "input_std")             # the pixel normalisation of a third-party ONNX model
# --device_target of the doors that only run ONNX models (ONNX Runtime has no Ascend provider).
ONNX_RUNTIME_DEVICE = dict(choices=("GPU", "CPU"),
                           help="GPU uses onnxruntime-gpu's CUDA provider when installed (default: %(default)s)")


def add_model_options(parser, names, title="model and device", **overrides):
    """Add the shared options `names` (keys of MODEL_OPTIONS) to `parser` as one argument group;
    `overrides` maps an option name to the add_argument keywords this door sets differently."""
    unknown = [name for name in list(names) + list(overrides) if name not in MODEL_OPTIONS]
    if unknown:
        raise ValueError(f"not shared model options: {unknown}")
    group = parser.add_argument_group(title)
    for name in names:
        group.add_argument(f"--{name}", **{**MODEL_OPTIONS[name], **overrides.get(name, {})})
    return group


def architecture(args):
    """{network, width, num_features} as given on the command line (None: as the checkpoint records)."""
    return {name: getattr(args, name, None) for name in ARCHITECTURE}


def run_main(main, argv=None):
    """Call main(argv); an ArcFaceError becomes `error: <message>` and exit code 2, running out of
    memory one line and exit code 1, Ctrl-C exit 130."""
    try:
        return main(argv)
    except ArcFaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (the input, or the model or batch size asked for, does not fit in the "
              "memory of this machine)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
