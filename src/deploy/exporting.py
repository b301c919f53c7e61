"""Export a trained backbone to MINDIR, AIR or ONNX.

- MINDIR: dynamic batch by default (input shape [None, 3, 112, 112]); a fixed batch on request.
- ONNX: MindSpore exports a static batch only, so the file is exported at a probe batch and then
  the batch dimension is made symbolic (`batch`) in the input, the output and every Reshape
  target: one file serves every batch size. The input is named `data` and the output
  `embedding` (insightface's input convention), 512-d.
- AIR: Ascend only.

`python -m src.deploy.exporting CKPT FILE.onnx` exports a checkpoint to ONNX in a process of its own:
MindSpore cannot export a network of a class whose training graph the calling process already compiled
(BatchNorm's training outputs are cached with the class's graph), so evaluation during training and
the evaluation's export cache run it through `export_in_fresh_process`.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from src.cli import ARCHITECTURE, add_model_options, architecture, run_main
from src.errors import ArcFaceError
from src.files import TEMP_PREFIX, atomic_path

FORMATS = ("MINDIR", "AIR", "ONNX")
SUFFIX = {"MINDIR": ".mindir", "AIR": ".air", "ONNX": ".onnx"}
INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
# An unusual batch for exporting a dynamic-batch ONNX, so Reshape targets that carry the batch
# are recognisable by their leading value.
PROBE_BATCH = 5


def export_backbone(backbone, file_name, file_format="MINDIR", batch_size=None, device_target="CPU", metadata=None):
    """Write `file_name` + suffix; returns the path written. `metadata` ({str: str}) is stored in an ONNX
    file's metadata_props (ONNX Runtime reads it back as the session's custom metadata)."""
    import mindspore as ms
    file_format = file_format.upper()
    if file_format not in FORMATS:
        raise ArcFaceError(f"--file_format must be one of {', '.join(FORMATS)}, not {file_format!r}")
    if file_format == "AIR" and device_target != "Ascend":
        raise ArcFaceError("AIR export needs an Ascend device (--device_target Ascend); "
                           "use MINDIR or ONNX on other machines")
    if batch_size is not None and batch_size < 1:
        raise ArcFaceError(f"--batch_size must be positive, got {batch_size}")
    backbone.set_train(False)
    base = file_name[:-len(SUFFIX[file_format])] if file_name.endswith(SUFFIX[file_format]) else file_name
    path = base + SUFFIX[file_format]
    directory = os.path.dirname(os.path.abspath(base))
    if file_format == "MINDIR" and batch_size is None:
        example = ms.Tensor(shape=[None, 3, 112, 112], dtype=ms.float32)
    else:
        example = ms.Tensor(np.zeros((batch_size or PROBE_BATCH, 3, 112, 112), np.float32))
    try:
        os.makedirs(directory, exist_ok=True)
        # MindSpore's exporter makes the folder it writes into owner-only (0700) and the file read-only:
        # it writes into a private folder of ours, and the file moves out with the user's umask.
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-export-", dir=directory) as scratch:
            written = os.path.join(scratch, "model" + SUFFIX[file_format])
            ms.export(backbone, example, file_name=written[:-len(SUFFIX[file_format])], file_format=file_format)
            os.chmod(written, 0o600)  # writable again for the ONNX rewrite below
            if file_format == "ONNX":
                finish_onnx(written, probe_batch=None if batch_size else PROBE_BATCH, metadata=metadata)
            leftovers = sorted(set(os.listdir(scratch)) - {os.path.basename(written)})
            if leftovers:  # e.g. the external weights of a MINDIR above 1 GB: not supported here
                raise ArcFaceError(f"exporting {path}: the exporter also wrote {', '.join(leftovers)}, which this "
                                   f"export does not move; export a smaller network or another format")
            os.chmod(written, 0o666 & ~_umask())
            with atomic_path(path) as tmp:
                os.replace(written, tmp)
    except OSError as exc:
        raise ArcFaceError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_checkpoint(ckpt_path, file_name, file_format="MINDIR", batch_size=None, device_target="CPU",
                      network=None, width=None, num_features=None, metadata=None):
    """Rebuild the backbone of a checkpoint (file or training folder: its newest) and export it."""
    from src.models import backbone_from_checkpoint
    backbone = backbone_from_checkpoint(ckpt_path, network, width, num_features)
    return export_backbone(backbone, file_name, file_format, batch_size, device_target, metadata)


def finish_onnx(path, probe_batch=None, metadata=None):
    """Name the input `data` and the output `embedding`; with `probe_batch`, make the batch
    dimension symbolic everywhere it was fixed to `probe_batch`; store `metadata`. Checked with
    onnx.checker."""
    import onnx
    model = onnx.load(path)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    graph = model.graph
    _rename(graph, graph.input[0].name, INPUT_NAME)
    _rename(graph, graph.output[0].name, OUTPUT_NAME)
    if probe_batch:
        for value in list(graph.input[:1]) + list(graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
        # Shapes the exporter recorded for intermediate values would pin the batch again.
        del graph.value_info[:]
        _unpin_reshapes(graph, probe_batch)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _rename(graph, old, new):
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new


def _unpin_reshapes(graph, probe_batch):
    """Reshape targets starting with the probe batch get 0 there ("keep the input's dimension")."""
    from onnx import numpy_helper
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in tensors:
            continue
        tensor = tensors[node.input[1]]
        shape = numpy_helper.to_array(tensor).astype(np.int64)
        if shape.size and shape[0] == probe_batch:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))




# --- an export in a process of its own --------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_in_fresh_process(ckpt_path, file_name, network=None, width=None, num_features=None, metadata=None,
                            shown_as=None, timeout=1800):
    """Export checkpoint `ckpt_path` to ONNX at `file_name` by running this module in a new Python
    process (see the module's docstring for why). Its user errors come back as one ArcFaceError, with
    the checkpoint named `shown_as` (e.g. the file a private copy was made of). Returns the path."""
    command = [sys.executable, "-m", "src.deploy.exporting", os.path.abspath(ckpt_path), os.path.abspath(file_name)]
    for name, value in (("network", network), ("width", width), ("num_features", num_features)):
        if value is not None:
            command += [f"--{name}", str(value)]
    for key, value in (metadata or {}).items():
        command += ["--metadata", f"{key}={value}"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ArcFaceError(f"exporting {shown_as or ckpt_path} to ONNX took more than {timeout} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["?"]
        errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
        message = errors[-1] if errors else f"exporting {ckpt_path} to ONNX failed (exit code {done.returncode}): " \
                                            f"{lines[-1]}"
        raise ArcFaceError(message.replace(os.path.abspath(ckpt_path), shown_as or ckpt_path))
    return done.stdout.strip().splitlines()[-1]


def build_parser():
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX (dynamic batch) in this process; "
                                                 "prints the path written.")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("file_name", help="output file (.onnx)")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="stored in the model's metadata_props (repeatable)")
    add_model_options(parser, ARCHITECTURE)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src import runtime
    metadata = dict(item.partition("=")[::2] for item in args.metadata)
    runtime.setup("CPU", distributed=False)
    print(export_checkpoint(args.checkpoint, args.file_name, "ONNX", metadata=metadata, **architecture(args)))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
