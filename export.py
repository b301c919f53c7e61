"""Export a trained backbone to MINDIR, AIR or ONNX for deployment.

  python export.py --ckpt_file outputs/r100/ArcFace-25_11372.ckpt --file_name arcface_r100 --file_format ONNX

MINDIR and ONNX files have a dynamic batch unless --batch_size is given; the ONNX input is named
`data` (insightface convention), the output `embedding` (512-d, not normalised). The backbone is
rebuilt from what the checkpoint records (or --network). AIR export needs an Ascend device.
"""
import argparse
import sys

from src.cli import ARCHITECTURE, DEVICE, add_model_options, architecture, run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_file", required=True, help="checkpoint file (or training folder: newest)")
    parser.add_argument("--file_name", default="arcface", help="output file name, suffix optional")
    parser.add_argument("--file_format", default="MINDIR", type=str.upper, choices=["MINDIR", "AIR", "ONNX"])
    add_model_options(parser, ("batch_size",) + DEVICE + ARCHITECTURE,
                      batch_size=dict(default=None, help="fixed batch size (default: dynamic)"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src import runtime
    from src.deploy.exporting import export_checkpoint
    from src.errors import ArcFaceError

    if args.file_format == "AIR" and args.device_target != "Ascend":
        raise ArcFaceError("AIR export needs an Ascend device (--device_target Ascend); use MINDIR or ONNX here")
    runtime.setup(args.device_target, args.device_id, distributed=False)
    path = export_checkpoint(args.ckpt_file, args.file_name, args.file_format, args.batch_size, args.device_target,
                             **architecture(args))
    batch = args.batch_size or "dynamic"
    print(f"exported {args.file_format} to {path} (batch {batch})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
