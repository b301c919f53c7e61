"""Face-embedding backbones: IResNet-18/34/50/100/200 and MobileFaceNet, built by name.

All take 112x112 RGB crops as float32 NCHW tensors normalised to [-1, 1] and return unnormalised
float32 embeddings of size `num_features`. Names are checked here without importing MindSpore.
May import: src.errors, mindspore.
"""
import re

from src.errors import ArcFaceError

IRESNETS = ("r18", "r34", "r50", "r100", "r200")
BACKBONES = IRESNETS + ("mbf",)

_ALIASES = {"mobilefacenet": "mbf"}


def canonical_name(name):
    """Map a backbone name or alias ('R50', 'iresnet50', 'mobilefacenet') to its short name."""
    if not isinstance(name, str):
        raise ArcFaceError(f"backbone name must be a string, got {name!r}; valid names: {', '.join(BACKBONES)}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    match = re.fullmatch(r"(?:iresnet|r)(\d+)", key)
    if match:
        key = f"r{int(match.group(1))}"
    if key not in BACKBONES:
        raise ArcFaceError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)} "
                           "(aliases: iresnet18 ... iresnet200, mobilefacenet)")
    return key


def check_backbone_options(name, num_features=512, dropout=0.0, width=64):
    """The options a backbone accepts, checked before anything is built."""
    key = canonical_name(name)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ArcFaceError(f"num_features must be a positive integer, got {num_features!r}")
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        raise ArcFaceError(f"dropout must be a number in [0, 1), got {dropout!r}") from None
    if not 0.0 <= dropout < 1.0:
        raise ArcFaceError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ArcFaceError(f"width must be a positive integer, got {width!r}")
    if key == "mbf" and dropout > 0:
        raise ArcFaceError("dropout is only supported by the IResNet backbones, not 'mbf'")
    if key == "mbf" and width != 64:
        raise ArcFaceError("width is only supported by the IResNet backbones, not 'mbf'")
    return key


def get_backbone(name, num_features=512, dropout=0.0, fp16=False, width=64):
    """Build a backbone by name.

    Args:
        name: one of ``BACKBONES`` (case-insensitive; 'iresnet50' style aliases accepted).
        num_features: embedding size.
        dropout: dropout probability before the embedding layer (IResNet only).
        fp16: run the convolutional body in float16 (BatchNorm stays float32); the returned
            embedding is always float32.
        width: IResNet channels of the first stage (64 in the published networks).
    """
    key = check_backbone_options(name, num_features, dropout, width)
    if key == "mbf":
        from src.models.mobilefacenet import mobilefacenet
        return mobilefacenet(num_features=num_features, fp16=bool(fp16))
    from src.models.iresnet import iresnet
    return iresnet(key, num_features=num_features, dropout=float(dropout), fp16=bool(fp16), width=width)
