"""IJB-B / IJB-C 1:1 verification of an ONNX model with ONNX Runtime.

Aligns every face of IJB_release/<target>/loose_crop with its 5 landmarks, embeds it and its flip,
builds the templates, scores all pairs and prints the TAR@FAR table; writes <target>_scores.npy
and <target>_roc.png to --result-dir. One ONNX file serves every batch size (the last partial batch
is padded), so the model zoo's second "remainder" model is not needed.

  python eval_ijbc_onnx.py --image-path /data/IJB_release/IJBC --onnx_url arcface_r100.onnx --target IJBC
"""
import argparse
import os
import sys

from src.cli import ONNX_INPUT, ONNX_RUNTIME_DEVICE, add_model_options, run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-path", "--image_path", dest="image_path", required=True,
                        help="IJB_release/IJBB or IJB_release/IJBC folder (or IJB_release)")
    parser.add_argument("--onnx_url", required=True, help="ONNX model file")
    parser.add_argument("--target", default="IJBC", type=str.upper, choices=["IJBB", "IJBC"])
    parser.add_argument("--result-dir", "--result_dir", dest="result_dir", default=None,
                        help="scores, ROC plot and log (default: the model's folder)")
    parser.add_argument("--job", default=None, help="method name in the table (default: the target in lower case)")
    parser.add_argument("--log", default=None, help="log file (default: eval_onnx_<target>.log in the result folder)")
    add_model_options(parser, ("batch_size", "device_target") + ONNX_INPUT, batch_size=dict(default=128),
                      device_target=ONNX_RUNTIME_DEVICE)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.evaluation.embedders import model_from_args
    from src.evaluation.evaluate import ResultLog
    from src.evaluation.ijb import evaluate_ijb

    result_dir = args.result_dir or os.path.dirname(os.path.abspath(args.onnx_url))
    with ResultLog(args.log or os.path.join(result_dir, f"eval_onnx_{args.target}.log")) as log:
        model = model_from_args(args, args.onnx_url, kind="onnx", log=log)
        log.describe = model.description
        evaluate_ijb(model.embed, args.image_path, args.target, args.batch_size, result_dir, job=args.job, log=log,
                     progress=sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
