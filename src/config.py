"""Training configuration: defaults, a yaml file and the command line merged in that order.

Every option has one definition here (name, type, default, help), so `train.py --help`, the yaml
files in `configs/` and the code that reads the config agree by construction.
"""
import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import List

import yaml

from src.errors import ArcFaceError

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "softmax": (1.0, 0.0, 0.0)}


@dataclass
class TrainConfig:
    # Data and output (the model zoo's names)
    data_url: str = field(default="", metadata={"help": "training data: a RecordIO folder "
                                                "(train.rec/train.idx[/property]) or an ImageFolder"})
    train_url: str = field(default="outputs", metadata={"help": "output folder for checkpoints and logs"})
    ckpt_url: str = field(default="", metadata={"help": "checkpoint to initialise the backbone (and the head "
                                                "when shapes match) from; use --resume to continue a run"})
    resume: str = field(default="", metadata={"help": "checkpoint to resume from (weights, head, optimizer, "
                                              "epoch/step), or 'auto' for the latest in --train_url"})
    # Device
    device_target: str = field(default="CPU", metadata={"help": "Ascend, GPU or CPU"})
    device_id: int = field(default=0, metadata={"help": "device used by standalone training"})
    device_num: int = field(default=1, metadata={"help": "number of devices; the launched world size "
                                                 "is read from mindspore.communication"})
    modelarts: bool = field(default=False, metadata={"help": "copy data from/results to OBS with moxing"})
    mode: str = field(default="graph", metadata={"help": "graph (fast) or pynative (debugging)"})
    # Model
    network: str = field(default="r100", metadata={"help": "backbone: r18 r34 r50 r100 r200 mbf"})
    width: int = field(default=64, metadata={"help": "iresnet channels of the first stage (64 is the "
                                             "published network; 16 trains ~10x faster for experiments)"})
    num_features: int = field(default=512, metadata={"help": "embedding size"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the embedding layer"})
    margin: str = field(default="arcface", metadata={"help": "arcface, cosface, softmax or 'm1,m2,m3' for "
                                                     "the combined margin cos(m1*t+m2)-m3"})
    scale: float = field(default=64.0, metadata={"help": "logit scale s"})
    num_classes: int = field(default=0, metadata={"help": "identities; 0 reads the dataset's own count"})
    partial_fc: bool = field(default=False, metadata={"help": "Partial FC: shard the head's class centres over "
                                                      "the ranks (for heads too large for one device)"})
    sample_rate: float = field(default=1.0, metadata={"help": "with --partial_fc: share of each rank's class "
                                                      "centres used per step (all positives kept); 1 = all"})
    # Optimisation
    epochs: int = field(default=25, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={"help": "batch size per device"})
    lr: float = field(default=0.08, metadata={"help": "base learning rate for a global batch of 512 "
                                              "(scaled by batch_size*devices/512)"})
    schedule: List[int] = field(default_factory=lambda: [10, 16, 21],
                                metadata={"help": "epochs at which lr is multiplied by --gamma"})
    gamma: float = field(default=0.1, metadata={"help": "lr decay factor at each --schedule epoch"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear lr warm-up length in epochs"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (not applied to BatchNorm)"})
    amp: str = field(default="auto", metadata={"help": "auto (fp16 backbone on GPU/Ascend, fp32 on CPU), "
                                               "O0 (fp32) or O2 (fp16 backbone with dynamic loss scaling)"})
    seed: int = field(default=1024, metadata={"help": "random seed"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many global steps (0: all epochs)"})
    # Data pipeline
    num_workers: int = field(default=4, metadata={"help": "parallel workers for decoding/augmentation"})
    skip_corrupt: bool = field(default=False, metadata={"help": "replace undecodable images (each logged with "
                                                        "its file and key) instead of stopping"})
    # Verification during training
    eval_url: str = field(default="", metadata={"help": "folder with verification .bin files to evaluate "
                                                "during training (rank 0); keeps best.ckpt"})
    eval_targets: str = field(default="lfw,cfp_fp,agedb_30", metadata={"help": "comma-separated sets in "
                                                                       "--eval_url"})
    eval_interval: int = field(default=2000, metadata={"help": "steps between evaluations"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for evaluation"})
    # Logging and checkpoints
    log_interval: int = field(default=50, metadata={"help": "steps between log lines"})
    save_interval: int = field(default=0, metadata={"help": "steps between checkpoints "
                                                    "(0: at the end of each epoch)"})
    keep_checkpoint_max: int = field(default=5, metadata={"help": "checkpoints to keep"})

    @property
    def margins(self):
        return parse_margin(self.margin)


def parse_margin(text):
    """'arcface' -> (1, 0.5, 0); '1,0.3,0.2' -> (1.0, 0.3, 0.2)."""
    if text.lower() in MARGINS:
        return MARGINS[text.lower()]
    try:
        m1, m2, m3 = (float(v) for v in text.split(","))
    except ValueError:
        raise ArcFaceError(f"--margin {text!r}: expected one of {', '.join(MARGINS)} or 'm1,m2,m3'") from None
    return m1, m2, m3


def _str2bool(text):
    if isinstance(text, bool):
        return text
    text = str(text)
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _int_list(text):
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="yaml file with any of the options below; "
                                                     "command-line values override it")
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        kind = {bool: _str2bool, int: int, float: float, str: str}.get(f.type, _int_list)
        # default=None on the parser marks "not given", so a yaml value is not overridden by a default.
        parser.add_argument(f"--{f.name}", type=kind, default=None,
                            help=f"{f.metadata.get('help', '')} (default: {default})")
    return parser


def load_yaml(path):
    if not os.path.isfile(path):
        raise ArcFaceError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArcFaceError(f"config file {path} is not valid yaml: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ArcFaceError(f"config file {path} must be a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ArcFaceError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def parse_train_args(argv=None, description=None):
    """Defaults <- yaml (--config) <- explicitly given command-line options."""
    args = build_parser(description).parse_args(argv)
    values = {}
    if args.config:
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    cfg = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in values:
            value = values[f.name]
            try:
                if f.type in (int, float, str):
                    value = f.type(value)
                elif f.type is bool:
                    value = _str2bool(value)
                else:
                    value = _int_list(",".join(str(v) for v in value) if isinstance(value, list) else value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ArcFaceError(f"option {f.name}: invalid value {values[f.name]!r}") from None
            setattr(cfg, f.name, value)
    validate(cfg)
    return cfg


def validate(cfg):
    if cfg.device_target not in ("Ascend", "GPU", "CPU"):
        raise ArcFaceError(f"--device_target must be Ascend, GPU or CPU, not {cfg.device_target!r}")
    if cfg.mode not in ("graph", "pynative"):
        raise ArcFaceError(f"--mode must be graph or pynative, not {cfg.mode!r}")
    if cfg.amp not in ("auto", "O0", "O2"):
        raise ArcFaceError(f"--amp must be auto, O0 or O2, not {cfg.amp!r}")
    for name in ("epochs", "batch_size", "log_interval", "keep_checkpoint_max", "eval_interval",
                 "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ArcFaceError(f"--{name} must be at least 1")
    for name in ("max_steps", "save_interval", "warmup_epochs"):
        if getattr(cfg, name) < 0:
            raise ArcFaceError(f"--{name} must not be negative")
    if cfg.num_workers < 1:
        raise ArcFaceError("--num_workers must be at least 1")
    if cfg.lr <= 0:
        raise ArcFaceError("--lr must be positive")
    if cfg.num_classes < 0:
        raise ArcFaceError("--num_classes must not be negative")
    if not 0.0 < cfg.sample_rate <= 1.0:
        raise ArcFaceError("--sample_rate must be in (0, 1]")
    if cfg.sample_rate < 1.0 and not cfg.partial_fc:
        raise ArcFaceError("--sample_rate needs --partial_fc")
    parse_margin(cfg.margin)


def as_dict(cfg):
    return asdict(cfg)
