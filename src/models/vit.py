"""Vision Transformer (ViT) backbones for 112x112 face crops.

The topology follows the insightface ``arcface_torch`` ``backbones/vit.py`` VisionTransformer and
the ViT entries of its ``get_model`` so parameter counts and layer order line up:

* patch embedding: Conv2d(3 -> D, kernel 9, stride 9, bias) turns 112x112 into 12x12 = 144 tokens
  (the last 4 pixel rows/columns are not seen, as in the reference), plus a learned position embedding
* ``depth`` pre-norm blocks: x + DropPath(Attention(Norm(x))), x + DropPath(MLP(Norm(x))); attention
  has no qkv bias, the MLP is Linear(D -> 4D) -> ReLU6 -> Linear(4D -> D); DropPath rates rise
  linearly from 0 to ``drop_path_rate`` over the depth
* in training only, a random ``mask_ratio`` of the patches is dropped before the blocks and refilled
  with a learned mask token after the final norm (MAE-style random masking)
* head: flatten(144*D) -> Linear(no bias) -> BN -> Linear(D -> num_features, no bias) -> BN

The norm is LayerNorm in every published configuration; ``norm="bn"`` is the reference's
alternative (BatchNorm over the patch axis). The output is the raw embedding in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Initializer

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
LN_EPS = 1e-5  # PyTorch's LayerNorm default (MindSpore's is 1e-7)
BN_EPS = 1e-5  # the reference's patch BatchNorm (PyTorch default)
HEAD_BN_EPS = 2e-5  # the reference's feature-head BatchNorms
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTConfig:
    """One published configuration (insightface arcface_torch backbones/__init__.py get_model)."""
    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    norm: str = "ln"


VIT_CONFIGS = {
    "vit_t": ViTConfig(256, 12, 8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_t_dp005_mask0": ViTConfig(256, 12, 8, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_s": ViTConfig(512, 12, 8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s_dp005_mask_0": ViTConfig(512, 12, 8, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_b": ViTConfig(512, 24, 8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_b_dp005_mask_005": ViTConfig(512, 24, 8, drop_path_rate=0.05, mask_ratio=0.05),
    "vit_l_dp005_mask_005": ViTConfig(768, 24, 8, drop_path_rate=0.05, mask_ratio=0.05),
    "vit_h": ViTConfig(1024, 48, 8, drop_path_rate=0.1, mask_ratio=0.0),
}


class TruncNormal(Initializer):
    """Normal(0, sigma) redrawn outside [a, b] (timm's ``trunc_normal_``, absolute bounds).

    MindSpore's own TruncatedNormal goes through scipy and needs ~8 s for the 85M weights of the
    ViT-L head; this draws float32 directly and is seeded from NumPy's global state, which
    ``mindspore.set_seed`` sets.
    """

    def __init__(self, sigma=INIT_STD, a=-2.0, b=2.0):
        super().__init__(sigma=sigma, a=a, b=b)
        self.sigma, self.a, self.b = sigma, a, b

    def _initialize(self, arr):
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        values = rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(self.sigma)
        outside = (values < self.a) | (values > self.b)
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32) * np.float32(self.sigma)
            outside = (values < self.a) | (values > self.b)
        arr[...] = values


def dense(in_features: int, out_features: int, has_bias: bool = True) -> nn.Dense:
    """Linear layer with the reference init: trunc-normal(0.02) weight, zero bias."""
    return nn.Dense(in_features, out_features, weight_init=TruncNormal(), bias_init="zeros", has_bias=has_bias)


class PatchBatchNorm(nn.Cell):
    """BatchNorm over the patch axis of (B, L, D) tokens: the reference's ``norm_layer="bn"``."""

    def __init__(self, num_patches: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_patches, eps=BN_EPS, momentum=BN_MOMENTUM)

    def construct(self, x):
        return self.bn(x.expand_dims(-1)).squeeze(-1)


def make_norm(norm: str, dim: int, num_patches: int) -> nn.Cell:
    if norm == "ln":
        return nn.LayerNorm((dim,), epsilon=LN_EPS)
    return PatchBatchNorm(num_patches)


class DropPath(nn.Cell):
    """Stochastic depth: in training, zero the branch for a random subset of samples and rescale
    the rest by 1 / keep_prob; identity in inference."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.keep_prob = 1.0 - self.drop_prob
        self.uniform = ops.UniformReal()

    def construct(self, x):
        if self.training and self.drop_prob > 0.0:
            keep = ops.floor(self.uniform((x.shape[0], 1, 1)) + self.keep_prob)
            return x * (keep / self.keep_prob).astype(x.dtype)
        return x


class Attention(nn.Cell):
    """Multi-head self-attention; the score/softmax/weighted-sum part always runs in float32, as
    the reference does under autocast."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = dense(dim, dim * 3, has_bias=qkv_bias)
        self.proj = dense(dim, dim)
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def extra_macs(self, input_shape) -> int:
        """Multiply-accumulates of q.k^T and attn.v (not Dense cells) for one (B, N, D) input."""
        batch, tokens = int(input_shape[0]), int(input_shape[1])
        return 2 * batch * self.num_heads * tokens * tokens * self.head_dim

    def construct(self, x):
        tokens = x.shape[1]
        # Every reshape leaves the batch as -1 and the Dense layers see 2-D input, so an exported
        # graph serves any batch size (a Dense on 3-D input reshapes back to a fixed batch).
        qkv = self.qkv(x.reshape(-1, self.dim)).astype(ms.float32)
        qkv = qkv.reshape(-1, tokens, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        attn = self.softmax(self.scores(q, k) * self.scale)
        out = self.weighted(attn, v).transpose(0, 2, 1, 3).reshape(-1, self.dim)
        return self.proj(out).reshape(-1, tokens, self.dim)


class Mlp(nn.Cell):
    """Linear -> ReLU6 -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = dense(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = dense(hidden, dim)

    def construct(self, x):
        tokens, dim = x.shape[1], x.shape[2]
        x = self.fc2(self.act(self.fc1(x.reshape(-1, dim))))
        return x.reshape(-1, tokens, dim)


class Block(nn.Cell):
    """Pre-norm transformer block; the residual stream stays float32 under fp16."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 norm: str, num_patches: int) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, num_patches)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = make_norm(norm, dim, num_patches)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def construct(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))).astype(x.dtype)
        return x + self.drop_path(self.mlp(self.norm2(x))).astype(x.dtype)


class PatchEmbed(nn.Cell):
    """Non-overlapping 9x9 patches -> (B, 144, D) tokens."""

    def __init__(self, embed_dim: int, patch_size: int = PATCH_SIZE, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_patches = (image_size // patch_size) ** 2
        # PyTorch's default Conv2d init (the reference does not re-initialise it) is MindSpore's default too.
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size, pad_mode="valid", has_bias=True)

    def construct(self, x):
        x = self.proj(x).reshape(-1, self.embed_dim, self.num_patches)
        return x.transpose(0, 2, 1)


class VisionTransformer(nn.Cell):
    """ViT embedding network for 3x112x112 inputs (NCHW, float32)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_features: int = 512,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path_rate: float = 0.0,
                 mask_ratio: float = 0.0, norm: str = "ln", fp16: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if norm not in ("ln", "bn"):
            raise ValueError(f"norm must be 'ln' or 'bn', got {norm!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if norm == "bn" and mask_ratio > 0:
            # BatchNorm over the patch axis needs all 144 patches; the reference fails here too.
            raise ValueError("norm='bn' normalises over the 144 patches and cannot be combined with masking")
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_features = num_features
        self.mask_ratio = float(mask_ratio)
        self.fp16_body = bool(fp16)

        self.patch_embed = PatchEmbed(embed_dim)
        self.num_patches = self.patch_embed.num_patches
        # Kept patches under masking; int() truncates as the reference does (144 * 0.9 -> 129). The
        # reference calls random_masking() without its ratio, so it always masks 10% (mask_ratio only
        # switches masking on); here the configured ratio is used (0.05 keeps 136 patches, not 129).
        self.len_keep = int(self.num_patches * (1.0 - self.mask_ratio))
        self.pos_embed = Parameter(Tensor(shape=(1, self.num_patches, embed_dim), dtype=ms.float32,
                                          init=TruncNormal()), name="pos_embed")
        # Exists (and counts) even without masking, as in the reference.
        self.mask_token = Parameter(Tensor(shape=(1, 1, embed_dim), dtype=ms.float32,
                                           init=ms.common.initializer.Normal(INIT_STD)), name="mask_token")
        rates = np.linspace(0.0, drop_path_rate, depth)  # torch.linspace in the reference
        self.blocks = nn.CellList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, float(rate), norm, self.num_patches)
            for rate in rates])
        self.norm = make_norm(norm, embed_dim, self.num_patches)
        self.feature = nn.SequentialCell(
            dense(embed_dim * self.num_patches, embed_dim, has_bias=False),
            nn.BatchNorm1d(embed_dim, eps=HEAD_BN_EPS, momentum=BN_MOMENTUM),
            dense(embed_dim, num_features, has_bias=False),
            nn.BatchNorm1d(num_features, eps=HEAD_BN_EPS, momentum=BN_MOMENTUM),
        )
        self.noise = ops.UniformReal()
        self.sort = ops.Sort(axis=1)

        if fp16:
            # Only the matmul-heavy cells compute in float16; norms, attention scores, the residual
            # stream and the head stay float32.
            for cell in (self.patch_embed, self.blocks):
                for _, sub in cell.cells_and_names():
                    if isinstance(sub, (nn.Dense, nn.Conv2d)):
                        sub.to_float(ms.float16)

    def _tokens(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _masked_tokens(self, x):
        """Run the blocks on a random ``len_keep`` of the patches of every sample, then put the
        kept ones back in place and fill the dropped ones with the mask token."""
        batch, tokens, dim = x.shape
        _, ids_shuffle = self.sort(self.noise((batch, tokens)))
        _, ids_restore = self.sort(ids_shuffle.astype(ms.float32))
        keep = ids_shuffle[:, :self.len_keep].expand_dims(-1).broadcast_to((batch, self.len_keep, dim))
        x = self._tokens(ops.gather_elements(x, 1, keep))
        fill = self.mask_token.broadcast_to((batch, tokens - self.len_keep, dim))
        x = ops.concat((x, fill), axis=1)
        return ops.gather_elements(x, 1, ids_restore.expand_dims(-1).broadcast_to((batch, tokens, dim)))

    def construct(self, x):
        x = self.patch_embed(x).astype(ms.float32) + self.pos_embed
        if self.training and self.mask_ratio > 0.0:
            x = self._masked_tokens(x)
        else:
            x = self._tokens(x)
        return self.feature(x.reshape(-1, self.num_patches * self.embed_dim))


def vit(name: str, num_features: int = 512, fp16: bool = False, width: int = 64) -> VisionTransformer:
    """Build the published ViT ``name`` (one of ``VIT_CONFIGS``). ``width`` 64 is the published
    network; other widths scale the embedding dimension by width / 64 (depth and heads unchanged)."""
    cfg = VIT_CONFIGS[name]
    return VisionTransformer(scaled_embed_dim(name, width), cfg.depth, cfg.num_heads, num_features=num_features,
                             mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path_rate,
                             mask_ratio=cfg.mask_ratio, norm=cfg.norm, fp16=fp16)


def scaled_embed_dim(name: str, width: int) -> int:
    return VIT_CONFIGS[name].embed_dim * width // 64
