"""Merge the head shards of a checkpoint written by a run on several ranks into one checkpoint that
holds the whole classification head (for --ckpt_url, or to continue with --resume on one device).
Evaluation and export need only the checkpoint itself (the backbone), not this.

  python -m src.partial_fc --merge train_parallel/ArcFace-25_1421.ckpt --output merged.ckpt
"""
import argparse
import sys

from src.cli import run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", required=True, help="rank 0's checkpoint, e.g. train_parallel/ArcFace-25_1421.ckpt")
    parser.add_argument("--output", required=True, help="checkpoint file to write (*.ckpt)")
    args = parser.parse_args(argv)
    from src import runtime  # noqa: F401  (CPU settings before MindSpore starts)
    from src.heads.classifier import export_merged_checkpoint
    classes = export_merged_checkpoint(args.merge, args.output)
    print(f"wrote {args.output} with the whole head ({classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
