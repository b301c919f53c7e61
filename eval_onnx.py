"""Evaluate an ONNX model with ONNX Runtime on verification sets or IJB-B/C.

Same protocol and output lines as val.py; only the embeddings come from ONNX Runtime. Works with
the files written by export.py (dynamic batch, input `data`) and with third-party ArcFace ONNX
models: the input name and a fixed batch are read from the model, the pixel normalisation is
(x - --input_mean) / --input_std.

  python eval_onnx.py --eval_url /data/eval --onnx_url arcface_r100.onnx --device_target GPU
"""
import argparse
import os
import sys

from src.cli import ONNX_INPUT, ONNX_RUNTIME_DEVICE, add_model_options, run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_url", required=True, help="folder with the <target>.bin files (or an IJB folder)")
    parser.add_argument("--onnx_url", required=True, help="ONNX model file")
    parser.add_argument("--target", default="lfw,cfp_fp,agedb_30,calfw,cplfw",
                        help="comma-separated set names, IJBB/IJBC for IJB (default: %(default)s)")
    parser.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default: %(default)s)")
    parser.add_argument("--log", default=None, help="file the result lines are appended to (default: eval_onnx.log "
                                                     "next to the model)")
    parser.add_argument("--result_dir", default=None, help="IJB scores and ROC plot (default: the model's folder)")
    add_model_options(parser, ("batch_size", "device_target") + ONNX_INPUT, device_target=ONNX_RUNTIME_DEVICE)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.evaluation.embedders import model_from_args
    from src.evaluation.evaluate import ResultLog, check_eval_folder, run_evaluation, split_targets

    targets = split_targets(args.target)
    check_eval_folder(args.eval_url)  # before a checkpoint is exported for nothing
    folder = os.path.dirname(os.path.abspath(args.onnx_url))
    with ResultLog(args.log or os.path.join(folder, "eval_onnx.log")) as log:
        model = model_from_args(args, args.onnx_url, kind="onnx", log=log)
        log.describe = model.description
        run_evaluation(model.embed, args.eval_url, targets, args.batch_size, args.nfolds, log,
                       args.result_dir or folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
