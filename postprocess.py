"""Score the C++ inference app's outputs with the same verification protocol as val.py.

  python postprocess.py --result_dir result_Files --label_dir preprocess_Label --data_set lfw
"""
import argparse
import sys

from src.cli import run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result_dir", default="result_Files", help="the app's <name>_0.bin outputs")
    parser.add_argument("--label_dir", default="preprocess_Label", help="written by preprocess.py")
    parser.add_argument("--data_set", required=True, help="dataset name, e.g. lfw")
    parser.add_argument("--batch_size", type=int, default=None, help="checked against the preprocessed batches")
    parser.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default: %(default)s)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.deploy.offline import read_embeddings
    from src.evaluation.verification import evaluate, format_lines
    emb, emb_flip, issame = read_embeddings(args.result_dir, args.label_dir, args.data_set, args.batch_size)
    for line in format_lines(args.data_set, evaluate(emb, issame, emb_flip, nfolds=args.nfolds)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
