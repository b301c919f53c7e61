"""Training configuration: defaults, a yaml file and the command line merged in that order, validated
once, and recorded.

Every option has one definition here (name, type, default, allowed values, help, and whether a
resumed run may change it), so `train.py --help`, the yaml files in `configs/`, validation, the run
record and the code that reads the config agree by construction.

The run record: training writes the resolved options as `config.yaml` into its output folder and
into every checkpoint (`record_text`). A resumed run starts from the record of its checkpoint;
options given again may change what is safe to change (epochs, lr, evaluation, ...), while a change
of an option marked `fixed` (what the network and its loss are) is refused (`resume_config`).
"""
import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import yaml

from src.cli import BACKENDS, DEVICES
from src.errors import ArcFaceError
from src.models import BACKBONES

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "softmax": (1.0, 0.0, 0.0)}
# The hyper-parameters of each --margin_type besides s (--scale), read from the options
# <type>_<name> (the official names); `gradient` comes from --margin_grad.
MARGIN_HYPER = {"combined": (), "adaface": ("m", "h", "t_alpha"), "curricularface": ("m", "alpha"),
                "magface": ("l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin"), "subcenter": ("m", "k")}
MARGIN_WITH_GRADIENT = ("combined", "adaface", "subcenter")


def option(default, help, *, fixed=False, choices=None, low=None, above=None, high=None):
    """An option: `fixed` options cannot change on --resume; `choices` lists the allowed values;
    numbers must be finite and >= `low` / > `above` / <= `high` when given."""
    meta = {"help": help, "fixed": fixed, "choices": choices, "low": low, "above": above, "high": high}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # Data and output (the model zoo's names)
    data_url: str = option("", "training data: a RecordIO folder (train.rec/train.idx[/property]), an ImageFolder "
                               "or a MindRecord folder")
    train_url: str = option("outputs", "output folder for checkpoints, logs and config.yaml")
    ckpt_url: str = option("", "checkpoint to initialise the backbone (and the head when its classes match) from; "
                               "use --resume to continue a run")
    resume: str = option("", "checkpoint to resume from (weights, head, optimizer, epoch/step, recorded options), "
                             "or 'auto' for the newest in --train_url")
    # Device
    device_target: str = option("CPU", "Ascend, GPU or CPU", choices=DEVICES)
    device_id: int = option(0, "device used by standalone training", low=0)
    device_num: int = option(1, "number of devices; the launched world size is read from mindspore.communication",
                             low=1)
    modelarts: bool = option(False, "copy data from/results to OBS with moxing")
    mode: str = option("graph", "graph (fast) or pynative (debugging)", choices=("graph", "pynative"))
    # Model
    network: str = option("r100", f"backbone: {', '.join(BACKBONES)} (r100 is the model zoo's; CPU training is "
                                  f"practical only for r18/r34 or a small --width, see configs/demo.yaml)", fixed=True)
    width: int = option(64, "iresnet channels of the first stage (64 is the published network; 16 trains ~10x "
                            "faster for experiments)", fixed=True, low=1)
    num_features: int = option(512, "embedding size", fixed=True, low=1)
    dropout: float = option(0.0, "dropout before the embedding layer", low=0.0, high=0.999)
    margin: str = option("arcface", "arcface, cosface, softmax or 'm1,m2,m3' for the combined margin "
                                    "cos(m1*t+m2)-m3", fixed=True)
    scale: float = option(64.0, "logit scale s", fixed=True, above=0.0)
    num_classes: int = option(0, "identities; 0 reads the dataset's own count", fixed=True, low=0)
    margin_grad: str = option("exact", "exact: differentiate through arccos and the margin (model zoo); straight: "
                                       "the margin as a constant shift of the target logit (insightface "
                                       "arcface_torch)", choices=("exact", "straight"))
    interclass_filtering_threshold: float = option(0.0, "combined margin: zero non-target cosines above this "
                                                        "value, for data with conflicting labels (0: off)",
                                                   low=0.0, high=1.0)
    margin_type: str = option("combined", "the loss: combined (--margin), adaface, curricularface, magface or "
                                          "subcenter (their hyper-parameters below; s is --scale)", fixed=True,
                              choices=tuple(MARGIN_HYPER))
    adaface_m: float = option(0.4, "AdaFace margin m", fixed=True, low=0.0)
    adaface_h: float = option(0.333, "AdaFace h: how far the feature norm moves the margin", fixed=True, low=0.0)
    adaface_t_alpha: float = option(0.01, "AdaFace: weight of the batch in the running norm mean/std", fixed=True,
                                    low=0.0, high=1.0)
    curricularface_m: float = option(0.5, "CurricularFace angular margin m", fixed=True, low=0.0)
    curricularface_alpha: float = option(0.01, "CurricularFace: weight of the batch in the running target cosine "
                                               "t", fixed=True, low=0.0, high=1.0)
    magface_l_a: float = option(10.0, "MagFace lower bound of the feature norm", fixed=True, above=0.0)
    magface_u_a: float = option(110.0, "MagFace upper bound of the feature norm", fixed=True, above=0.0)
    magface_l_m: float = option(0.45, "MagFace margin at the lower norm bound", fixed=True, low=0.0)
    magface_u_m: float = option(0.8, "MagFace margin at the upper norm bound", fixed=True, low=0.0)
    magface_lambda_g: float = option(35.0, "MagFace weight of the norm regulariser", fixed=True, low=0.0)
    magface_easy_margin: bool = option(True, "MagFace: apply the margin only where the target cosine is positive",
                                       fixed=True)
    subcenter_m: float = option(0.5, "sub-center ArcFace angular margin m", fixed=True, low=0.0)
    subcenter_k: int = option(3, "sub-center ArcFace: centres per class", fixed=True, low=1)
    init: str = option("zoo", "initialisation: zoo (He normal convolutions, N(0, 0.01) fc) or torch (arcface_torch: "
                              "N(0, 0.1) convolutions, PyTorch's default Linear)", choices=("zoo", "torch"))
    partial_fc: bool = option(False, "kept for old commands and configs, no effect: the head's class centres are "
                                     "always sharded over the ranks (see --sample_rate)")
    sample_rate: float = option(1.0, "share of each rank's class centres used per step (all classes of the batch "
                                     "are kept); 1 = the full softmax", above=0.0, high=1.0)
    # Optimisation
    epochs: int = option(25, "training epochs", low=1)
    batch_size: int = option(64, "batch size per device", low=1)
    lr: float = option(0.08, "base learning rate for a global batch of 512 (scaled by batch_size*devices/512)",
                       above=0.0)
    lr_schedule: str = option("step", "step (decay by --gamma at --schedule epochs), poly (linear to 0 over the run, "
                                      "arcface_torch) or cosine; all after --warmup_epochs, stepped every iteration",
                              choices=("step", "poly", "cosine"))
    schedule: list[int] = option([10, 16, 21], "epochs at which lr is multiplied by --gamma", low=0)
    gamma: float = option(0.1, "lr decay factor at each --schedule epoch", above=0.0)
    warmup_epochs: float = option(0.0, "linear lr warm-up length in epochs", low=0.0)
    optimizer: str = option("sgd", "sgd (with --momentum) or adamw (decoupled weight decay, betas 0.9/0.999)",
                            fixed=True, choices=("sgd", "adamw"))
    momentum: float = option(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = option(1e-4, "weight decay", low=0.0)
    weight_decay_bn: bool = option(False, "apply the weight decay to BatchNorm's gamma/beta too (arcface_torch)")
    clip_grad_norm: float = option(0.0, "clip the backbone's gradient to this global norm, after unscaling (0: off; "
                                        "arcface_torch: 5)", low=0.0)
    gradient_acc: int = option(1, "micro-batches per optimizer step (gradients summed over them, as arcface_torch)",
                               low=1)
    amp: str = option("auto", "auto (fp16 backbone on GPU/Ascend, fp32 on CPU), O0 (fp32) or O2 (fp16 backbone with "
                              "dynamic loss scaling)", choices=("auto", "O0", "O2"))
    loss_scale_window: int = option(2000, "fp16: steps without overflow before the loss scale doubles "
                                          "(arcface_torch's GradScaler: 100)", low=1)
    seed: int = option(1024, "random seed", low=0)
    max_steps: int = option(0, "stop after this many global steps (0: all epochs)", low=0)
    sink_size: int = option(0, "GPU/Ascend: run this many steps per call on the device, fed by MindSpore's data sink "
                               "(0: one step per call, fed from the host); logs and saves fall at block ends", low=0)
    # Data pipeline
    num_workers: int = option(4, "parallel workers for decoding/augmentation", low=1)
    skip_corrupt: bool = option(False, "replace undecodable images (each logged with its file and key) instead "
                                       "of stopping")
    # Verification during training
    eval_url: str = option("", "folder with verification .bin files to evaluate during training (rank 0); keeps "
                               "best.ckpt")
    eval_targets: str = option("lfw,cfp_fp,agedb_30", "comma-separated sets in --eval_url")
    eval_interval: int = option(2000, "steps between evaluations", low=1)
    eval_batch_size: int = option(64, "batch size for evaluation", low=1)
    eval_backend: str = option("auto", "auto (ONNX Runtime on the CPU when installed: the backbone is exported "
                                       "for each evaluation; MindSpore on GPU/Ascend), mindspore or onnxruntime",
                               choices=BACKENDS)
    # Logging and checkpoints
    log_interval: int = option(50, "steps between log lines", low=1)
    save_interval: int = option(0, "steps between checkpoints (0: at the end of each epoch)", low=0)
    keep_checkpoint_max: int = option(5, "checkpoints to keep", low=1)

    @property
    def margins(self):
        return parse_margin(self.margin)

    @property
    def eval_sets(self):
        """The verification sets of --eval_targets, in order."""
        return [name.strip() for name in self.eval_targets.split(",") if name.strip()]

    @property
    def margin_hyper(self):
        """build_margin's keyword arguments for --margin_type (src.heads.margin)."""
        hyper = {"s": self.scale}
        if self.margin_type == "combined":
            hyper.update(zip(("m1", "m2", "m3"), self.margins),
                         interclass_filtering_threshold=self.interclass_filtering_threshold)
        hyper.update({name: getattr(self, f"{self.margin_type}_{name}") for name in MARGIN_HYPER[self.margin_type]})
        if self.margin_type in MARGIN_WITH_GRADIENT:
            hyper["gradient"] = self.margin_grad
        return hyper


OPTIONS = {f.name: f for f in fields(TrainConfig)}
FIXED = tuple(f.name for f in fields(TrainConfig) if f.metadata["fixed"])
_FIXED_NAMED = [name for name in FIXED if not name.startswith(tuple(f"{kind}_" for kind in MARGIN_HYPER))]


def parse_margin(text):
    """'arcface' -> (1, 0.5, 0); '1,0.3,0.2' -> (1.0, 0.3, 0.2)."""
    if text.lower() in MARGINS:
        return MARGINS[text.lower()]
    try:
        values = tuple(float(v) for v in text.split(","))
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError
    except ValueError:
        raise ArcFaceError(f"--margin {text!r}: expected one of {', '.join(MARGINS)} or 'm1,m2,m3' (finite "
                           f"numbers)") from None
    if values[0] <= 0:
        raise ArcFaceError(f"--margin {text!r}: m1 must be positive")
    return values


def _str2bool(text):
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _to_int(value):
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    return int(str(value).strip())


def _to_float(value):
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return float(value)


def _to_int_list(value):
    if isinstance(value, (list, tuple)):
        return [_to_int(v) for v in value]
    return [_to_int(v) for v in str(value).replace(" ", "").split(",") if v]


def _to_str(value):
    if isinstance(value, (dict, list, tuple)):
        raise ValueError("expected a single value")
    return str(value)


CONVERT = {bool: _str2bool, int: _to_int, float: _to_float, str: _to_str}


def convert(name, value):
    """A raw value (command line text or yaml) as the option's type; one clear error otherwise."""
    kind = OPTIONS[name].type
    try:
        return CONVERT.get(kind, _to_int_list)(value)
    except (TypeError, ValueError) as exc:
        raise ArcFaceError(f"--{name} {value!r}: {exc if 'expected' in str(exc) else 'invalid value'}") from None


def check_value(name, value):
    """Bounds and allowed values of one option (NaN and Inf are never allowed)."""
    meta = OPTIONS[name].metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ArcFaceError(f"--{name} must be one of {', '.join(meta['choices'])}, not {value!r}")
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if not math.isfinite(number):
            raise ArcFaceError(f"--{name} must be a finite number, not {number}")
        if meta["low"] is not None and number < meta["low"]:
            raise ArcFaceError(f"--{name} must be at least {meta['low']:g}, not {number:g}")
        if meta["above"] is not None and number <= meta["above"]:
            raise ArcFaceError(f"--{name} must be greater than {meta['above']:g}, not {number:g}")
        if meta["high"] is not None and number > meta["high"]:
            raise ArcFaceError(f"--{name} must be at most {meta['high']:g}, not {number:g}")


def validate(cfg):
    """Every option's own rule, then the rules between options."""
    for name in OPTIONS:
        check_value(name, getattr(cfg, name))
    parse_margin(cfg.margin)
    if cfg.magface_l_a >= cfg.magface_u_a:
        raise ArcFaceError(f"--magface_l_a {cfg.magface_l_a:g} must be below --magface_u_a {cfg.magface_u_a:g}")
    if cfg.magface_l_m > cfg.magface_u_m:
        raise ArcFaceError(f"--magface_l_m {cfg.magface_l_m:g} must not exceed --magface_u_m {cfg.magface_u_m:g}")
    if cfg.sink_size and cfg.device_target == "CPU":
        raise ArcFaceError("--sink_size needs --device_target GPU or Ascend (MindSpore sinks data to those only)")
    if cfg.train_url and os.path.exists(cfg.train_url) and not os.path.isdir(cfg.train_url):
        raise ArcFaceError(f"--train_url {cfg.train_url} is a file, not a folder")
    from src.models import canonical_name, check_backbone_options
    cfg.network = canonical_name(cfg.network)
    check_backbone_options(cfg.network, cfg.num_features, cfg.dropout, cfg.width)
    return cfg


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="yaml file with any of the options below (config.yaml of a "
                                                     "run works too); command-line values override it")
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        # type=str and default=None: conversion happens in one place (convert), and None marks
        # "not given" so a yaml value is not overridden by a default.
        parser.add_argument(f"--{f.name}", default=None, metavar=f.type.__name__.upper() if f.type in CONVERT
                            else "LIST", help=f"{f.metadata['help']} (default: {default})")
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
    unknown = sorted(set(map(str, data)) - set(OPTIONS))
    if unknown:
        raise ArcFaceError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def parse_train_args(argv=None, description=None):
    """Defaults <- yaml (--config) <- explicitly given command-line options. Returns the validated
    config and the names of the options given (in the yaml file or on the command line)."""
    args = build_parser(description).parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    cfg = TrainConfig()
    for name, value in values.items():
        setattr(cfg, name, convert(name, value))
    return validate(cfg), frozenset(values)


# --- the run record -------------------------------------------------------------------------------

def record_text(cfg):
    """The resolved options as yaml (loadable again with --config)."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False, default_flow_style=None)


def read_record(text, source):
    """A TrainConfig from a record (unknown keys of another version are ignored, missing ones take
    their defaults)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ArcFaceError(f"{source}: the recorded configuration is not valid yaml: {str(exc).splitlines()[0]}") \
            from None
    if not isinstance(data, dict):
        raise ArcFaceError(f"{source}: the recorded configuration is not a mapping")
    cfg = TrainConfig()
    for name, value in data.items():
        if name in OPTIONS:
            setattr(cfg, name, convert(name, value))
    return cfg


def resume_config(cfg, given, recorded, source):
    """The configuration of a resumed run: the record, with the options given now on top. A fixed
    option given with another value than recorded is refused."""
    changed = [name for name in FIXED if name in given and _differs(name, getattr(cfg, name), getattr(recorded, name))]
    if changed:
        name = changed[0]
        raise ArcFaceError(f"--resume: {source} was trained with --{name} {_show(getattr(recorded, name))}, not "
                           f"{_show(getattr(cfg, name))}; a resumed run cannot change {', '.join(_FIXED_NAMED)} "
                           f"or the margin's hyper-parameters (start a new run with --ckpt_url to initialise "
                           f"from it)")
    merged = TrainConfig(**{name: getattr(cfg if name in given else recorded, name) for name in OPTIONS})
    return validate(merged)


def _differs(name, new, old):
    if name == "num_classes" and new == 0:
        return False  # 0 means "the dataset's own", which the record has resolved
    if name == "margin":
        return parse_margin(new) != parse_margin(old)
    if name == "network":
        from src.models import canonical_name
        return canonical_name(new) != canonical_name(old)
    return new != old


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
