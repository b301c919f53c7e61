"""Face-embedding backbones: IResNet-18/34/50/100/200, MobileFaceNet and the insightface ViTs, built by name.

All take 112x112 RGB crops as float32 NCHW tensors normalised to [-1, 1] and return unnormalised
float32 embeddings of size `num_features`. Names are checked here without importing MindSpore.
`backbone_from_checkpoint` rebuilds the backbone a checkpoint records (evaluation and export).
`cpu_ops` runs the IResNets' float32 training convolutions on the CPU through oneDNN's blocked layouts.
May import: src.errors, src.checkpoint, src.files (cpu_ops's build cache).
"""
import re

from src.errors import ArcFaceError

IRESNETS = ("r18", "r34", "r50", "r100", "r200")
# insightface arcface_torch names, spelled as there (their underscores are inconsistent).
VITS = ("vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
        "vit_l_dp005_mask_005", "vit_h")
# Published embedding dimension of each ViT; `width` scales it (64 = published). All have 8 heads.
VIT_EMBED_DIMS = {"vit_t": 256, "vit_t_dp005_mask0": 256, "vit_s": 512, "vit_s_dp005_mask_0": 512,
                  "vit_b": 512, "vit_b_dp005_mask_005": 512, "vit_l_dp005_mask_005": 768, "vit_h": 1024}
VIT_HEADS = 8
BACKBONES = IRESNETS + ("mbf",) + VITS

_ALIASES = {"mobilefacenet": "mbf"}
# Bounds on what any file may claim, checked before a network is built: an r100 of width 256 already
# has about a billion parameters, and a damaged record saying width 2**30 would ask for 108 GiB.
MAX_WIDTH = 256
MAX_NUM_FEATURES = 4096


def canonical_name(name):
    """Map a backbone name or alias ('R50', 'iresnet50', 'mobilefacenet', 'ViT_T') to its short name."""
    if not isinstance(name, str):
        raise ArcFaceError(f"backbone name must be a string, got {name!r}; valid names: {', '.join(BACKBONES)}")
    vit_key = name.strip().lower().replace("-", "_")
    if vit_key in VITS:  # their underscores carry meaning, so they are matched as written
        return vit_key
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    match = re.fullmatch(r"(?:iresnet|r)(\d+)", key)
    if match:
        key = f"r{int(match.group(1))}"
    if key not in BACKBONES:
        raise ArcFaceError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)} "
                           "(aliases: iresnet18 ... iresnet200, mobilefacenet; ViT names as written)")
    return key


def check_backbone_options(name, num_features=512, dropout=0.0, width=64):
    """The options a backbone accepts, checked before anything is built."""
    key = canonical_name(name)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or not 0 < num_features <= MAX_NUM_FEATURES:
        raise ArcFaceError(f"num_features must be an integer from 1 to {MAX_NUM_FEATURES}, got {num_features!r}")
    try:
        dropout = float(dropout)
    except (TypeError, ValueError):
        raise ArcFaceError(f"dropout must be a number in [0, 1), got {dropout!r}") from None
    if not 0.0 <= dropout < 1.0:
        raise ArcFaceError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= MAX_WIDTH:
        raise ArcFaceError(f"width must be an integer from 1 to {MAX_WIDTH} (64 is the published network), "
                           f"got {width!r}")
    if key not in IRESNETS and dropout > 0:
        raise ArcFaceError(f"dropout is only supported by the IResNet backbones, not {key!r}")
    if key == "mbf" and width != 64:
        raise ArcFaceError("width is only supported by the IResNet and ViT backbones, not 'mbf'")
    if key in VITS:
        embed_dim = VIT_EMBED_DIMS[key] * width // 64
        if embed_dim < VIT_HEADS or embed_dim % VIT_HEADS:
            raise ArcFaceError(f"width {width} gives {key!r} an embedding dimension of {embed_dim} "
                               f"({VIT_EMBED_DIMS[key]} * {width} // 64), which must be a positive multiple of "
                               f"its {VIT_HEADS} attention heads")
    return key


def get_backbone(name, num_features=512, dropout=0.0, fp16=False, width=64):
    """Build a backbone by name.

    Args:
        name: one of ``BACKBONES`` (case-insensitive; 'iresnet50' style aliases accepted).
        num_features: embedding size.
        dropout: dropout probability before the embedding layer (IResNet only).
        fp16: run the convolutional body in float16 (BatchNorm stays float32); for a ViT, its
            convolution and Linear layers (norms, attention scores and the head stay float32); the
            returned embedding is always float32.
        width: IResNet channels of the first stage (64 in the published networks); for a ViT, the
            embedding dimension is the published one * width // 64.
    """
    key = check_backbone_options(name, num_features, dropout, width)
    if key == "mbf":
        from src.models.mobilefacenet import mobilefacenet
        return mobilefacenet(num_features=num_features, fp16=bool(fp16))
    if key in VITS:
        from src.models.vit import vit
        return vit(key, num_features=num_features, fp16=bool(fp16), width=width)
    from src.models.iresnet import iresnet
    return iresnet(key, num_features=num_features, dropout=float(dropout), fp16=bool(fp16), width=width)


def apply_init(backbone, name, scheme, seed=0):
    """`scheme` 'zoo' keeps the initialisation the backbone was built with; 'torch' re-initialises as
    insightface arcface_torch does. Only the IResNets differ: arcface_torch's MobileFaceNet (He normal,
    fan_out) and ViTs (truncated normal) initialise as ours already do."""
    if scheme not in ("zoo", "torch"):
        raise ArcFaceError(f"init must be zoo or torch, not {scheme!r}")
    if scheme == "torch" and canonical_name(name) in IRESNETS:
        from src.models.iresnet import torch_style_init
        torch_style_init(backbone, seed)
    return backbone


def checkpoint_architecture(meta, network=None, width=None, num_features=None):
    """The backbone a checkpoint's meta entries record; arguments given override it (needed for
    checkpoints that do not record it: then r100, width 64, 512 features are assumed)."""
    return {"network": network or meta.get("network", "r100"), "width": width or meta.get("width", 64),
            "num_features": num_features or meta.get("num_features", 512)}


def backbone_from_checkpoint(ckpt_path, network=None, width=None, num_features=None, log=None):
    """Build the backbone a checkpoint (file, or training folder: its newest readable one) was trained
    with and load its weights; see checkpoint_architecture for the arguments."""
    import sys

    from src.checkpoint import load_backbone, read_checkpoint_or_newest
    path, params, meta = read_checkpoint_or_newest(ckpt_path, log=log or (lambda line: print(line, file=sys.stderr)))
    arch = checkpoint_architecture(meta, network, width, num_features)
    backbone = get_backbone(arch["network"], num_features=arch["num_features"], width=arch["width"])
    load_backbone(backbone, path, params)
    return backbone
