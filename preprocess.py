"""Prepare a verification set for the C++ inference app (ascend310_infer).

Writes normalised float32 batches of the images and of their flips to --result_dir, and the pair
labels to --label_dir, all named after the dataset (see src/deploy/offline.py for the layout).

  python preprocess.py --dataset_path /data/eval/lfw.bin --result_dir preprocess_Result --label_dir preprocess_Label
"""
import argparse
import sys

from src.cli import run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="one verification .bin file")
    parser.add_argument("--result_dir", default="preprocess_Result", help="batches for the app")
    parser.add_argument("--label_dir", default="preprocess_Label", help="pair labels and batch layout")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch file (default: %(default)s)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.deploy.offline import write_batches
    name = write_batches(args.dataset_path, args.result_dir, args.label_dir, args.batch_size,
                         progress=sys.stderr.isatty())
    print(f"wrote the batches of {name} to {args.result_dir} and its labels to {args.label_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
