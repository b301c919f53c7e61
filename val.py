"""Evaluate a checkpoint on face-verification sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) or IJB-B/C.

Reads <eval_url>/<target>.bin for every target, embeds the images and their flips, and prints
the 10-fold protocol's lines, e.g. `[lfw]Accuracy-Flip: 0.99817+-0.00273`. A missing set is
reported and skipped. `--target IJBB` or `IJBC` runs the IJB 1:1 protocol on an IJB_release/<target>
folder (or its parent) and prints the TAR@FAR table; scores and a ROC plot go to --result_dir.
The lines also go to --log (default: eval.log next to the checkpoint).

  python val.py --eval_url /data/eval --ckpt_url outputs/ms1mv2_r100
  python val.py --eval_url /data/IJB_release/IJBC --target IJBC --ckpt_url outputs/ms1mv2_r100
"""
import argparse
import os
import sys

from src.cli import ARCHITECTURE, DEVICE, add_model_options, run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_url", required=True, help="folder with the <target>.bin files")
    parser.add_argument("--ckpt_url", required=True,
                        help="checkpoint file, or a training output folder (its latest checkpoint)")
    parser.add_argument("--target", default="lfw,cfp_fp,agedb_30,calfw,cplfw",
                        help="comma-separated set names (default: %(default)s)")
    parser.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default: %(default)s)")
    parser.add_argument("--log", default=None, help="file the result lines are appended to (default: eval.log in the "
                                                     "checkpoint's folder)")
    parser.add_argument("--result_dir", default=None, help="IJB scores and ROC plot (default: the checkpoint's folder)")
    parser.add_argument("--flip_fusion", default="sum", choices=("sum", "norm"),
                        help="how the features of an image and of its flip are combined: sum (default: the "
                             "references' sum of the unnormalised features) or norm (AdaFace's: each normalised "
                             "and multiplied by its own norm, then summed; the same direction up to rounding)")
    add_model_options(parser, ("backend", "batch_size") + DEVICE + ARCHITECTURE)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.evaluation.embedders import model_from_args
    from src.evaluation.evaluate import ResultLog, check_eval_folder, run_evaluation, split_targets

    targets = split_targets(args.target)
    check_eval_folder(args.eval_url)  # before a checkpoint is exported for nothing
    folder = args.ckpt_url if os.path.isdir(args.ckpt_url) else os.path.dirname(os.path.abspath(args.ckpt_url))
    model = model_from_args(args, args.ckpt_url, kind="checkpoint")
    with ResultLog(args.log or os.path.join(folder, "eval.log"), model.description) as log:
        run_evaluation(model.embed, args.eval_url, targets, args.batch_size, args.nfolds, log,
                       args.result_dir or folder, fusion=args.flip_fusion)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
