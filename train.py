"""Train an iresnet / MobileFaceNet backbone with the ArcFace (combined margin) loss.

Examples:
  python train.py --config configs/ms1mv2_r100.yaml --data_url /data/faces_emore --device_target GPU
  python train.py --config configs/demo.yaml
  python train.py --config configs/demo.yaml --resume auto
"""
import sys

from src.cli import run_main


def main(argv=None):
    from src.config import parse_train_args
    cfg, given = parse_train_args(argv, description=__doc__)
    from src.training.trainer import train  # imports MindSpore: after --help and argument errors
    train(cfg, given)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
