"""Export a trained backbone to MINDIR, AIR or ONNX for deployment.

  python export.py --ckpt_file outputs/r100/ArcFace-25_11372.ckpt --file_name arcface_r100 --file_format ONNX

MINDIR and ONNX files have a dynamic batch unless --batch_size is given; the ONNX input is named
`data` (insightface convention), the output `embedding` (512-d, not normalised). The backbone is
rebuilt from what the checkpoint records (or --network). AIR export needs an Ascend device.
"""
import argparse
import sys

from src.cli import run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_file", required=True, help="checkpoint file (or training folder: newest)")
    parser.add_argument("--file_name", default="arcface", help="output file name, suffix optional")
    parser.add_argument("--file_format", default="MINDIR", type=str.upper, choices=["MINDIR", "AIR", "ONNX"])
    parser.add_argument("--batch_size", type=int, default=None, help="fixed batch size (default: dynamic)")
    parser.add_argument("--network", default=None, help="backbone (default: as recorded in the checkpoint)")
    parser.add_argument("--width", type=int, default=None, help="iresnet width (default: from the checkpoint)")
    parser.add_argument("--num_features", type=int, default=None, help="embedding size (default: from the checkpoint)")
    parser.add_argument("--device_target", default="CPU", choices=["Ascend", "GPU", "CPU"])
    parser.add_argument("--device_id", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src import runtime
    from src.deploy.exporting import export_backbone
    from src.errors import ArcFaceError
    from src.evaluation.embedders import backbone_from_checkpoint

    if args.file_format == "AIR" and args.device_target != "Ascend":
        raise ArcFaceError("AIR export needs an Ascend device (--device_target Ascend); use MINDIR or ONNX here")
    runtime.setup(args.device_target, args.device_id, distributed=False)
    backbone = backbone_from_checkpoint(args.ckpt_file, args.network, args.width, args.num_features)
    path = export_backbone(backbone, args.file_name, args.file_format, args.batch_size, args.device_target)
    batch = args.batch_size or "dynamic"
    print(f"exported {args.file_format} to {path} (batch {batch})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
