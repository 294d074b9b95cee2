"""DPT depth network (MiDaS v3.0), the depth estimator of Bokeh-Loss GAN.

Paper: Ranftl et al., "Vision Transformers for Dense Prediction" (ICCV 2021); DPT-Hybrid gives the
depth mask of Lee et al., "Bokeh-Loss GAN" (ECCV-W 2022). Reference implementation: isl-org/MiDaS,
``midas/dpt_depth.py``, ``midas/blocks.py`` and ``midas/vit.py``, whose backbones are timm's
``vit_base_resnet50_384`` (DPT-Hybrid) and ``vit_large_patch16_384`` (DPT-Large).

Written without timm: module and parameter names follow MiDaS's ``DPTDepthModel`` (timm names under
``pretrained.model``) so the official ``dpt_hybrid_384.pt`` / ``dpt_large_384.pt`` load with
``strict=True``. Unlike MiDaS, the transformer taps are read inside ``forward`` instead of through
module-global forward hooks, so two models can run side by side. The ViT's final ``norm`` and
classifier ``head`` are kept (they are in the checkpoint) but, as in MiDaS, never used.

Weight standardisation follows current timm's hybrid ViT: ``(w - mean) / sqrt(var + 1e-8)``.
timm 0.4.x, current when DPT was trained, computed ``(w - mean) / (std + 1e-5)``: a relative
difference of about ``1e-5 / std(w)`` per output channel (not verified on the real weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError
from models.checkpoint import load_strict, read_checkpoint

HYBRID_STEM_KEY = "pretrained.model.patch_embed.backbone.stem.conv.weight"
LARGE_PATCH_KEY = "pretrained.model.patch_embed.proj.weight"


@dataclass(frozen=True)
class DPTConfig:
    """Sizes of a DPT; the defaults are MiDaS v3.0 DPT-Hybrid (``vitb_rn50_384``)."""

    variant: str = "hybrid"  # "hybrid": ResNetV2-50 stem + ViT-B; "large": ViT-L/16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16  # output stride of the token grid
    pos_grid: int = 24  # the position embedding is trained for a pos_grid^2 token grid (384 px)
    num_classes: int = 1000  # unused ImageNet head, present in the official checkpoint
    hooks: tuple[int, ...] = (0, 1, 8, 11)  # hybrid: ResNet stages 0, 1 then ViT blocks 8, 11
    reassemble: tuple[int, ...] = (256, 512, 768, 768)  # channels of the four reassembled maps
    features: int = 256  # decoder width (scratch.*)
    head_features: int = 32  # second head conv width
    # Hybrid only: timm ResNetV2 (non pre-activation, StdConv2dSame, GroupNorm).
    stem_channels: int = 64
    resnet_layers: tuple[int, ...] = (3, 4, 9)
    resnet_channels: tuple[int, ...] = (256, 512, 1024)
    groups: int = 32
    std_conv_eps: float = 1e-8
    gn_eps: float = 1e-5
    ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.variant not in ("hybrid", "large"):
            raise ValueError(f"variant must be 'hybrid' or 'large', got {self.variant!r}")
        if len(self.hooks) != 4 or len(self.reassemble) != 4:
            raise ValueError("DPT needs four hooks and four reassemble widths")
        if self.variant == "hybrid":
            if len(self.resnet_layers) != 3 or len(self.resnet_channels) != 3:
                raise ValueError("the hybrid backbone has three ResNet stages (output stride 16)")
            if tuple(self.reassemble[:2]) != tuple(self.resnet_channels[:2]):
                raise ValueError("hybrid levels 1-2 are ResNet stages 0-1: widths must match")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")


HYBRID_CONFIG = DPTConfig()
LARGE_CONFIG = DPTConfig(
    variant="large", embed_dim=1024, depth=24, num_heads=16, hooks=(5, 11, 17, 23),
    reassemble=(256, 512, 1024, 1024),
)


def default_dpt_config(variant: str = "hybrid") -> DPTConfig:
    """The official MiDaS v3.0 configuration of ``variant`` ("hybrid" or "large")."""
    return {"hybrid": HYBRID_CONFIG, "large": LARGE_CONFIG}[variant]


def tiny_dpt_config(variant: str = "hybrid") -> DPTConfig:
    """A few-hundred-kB DPT with every kind of module of the real one, for fast tests."""
    if variant == "hybrid":
        return DPTConfig(
            variant="hybrid", embed_dim=32, depth=3, num_heads=4, pos_grid=3, num_classes=10,
            hooks=(0, 1, 1, 2), reassemble=(32, 64, 48, 48), features=16, head_features=8,
            stem_channels=16, resnet_layers=(1, 2, 1), resnet_channels=(32, 64, 128), groups=8,
        )
    return DPTConfig(
        variant="large", embed_dim=32, depth=3, num_heads=4, pos_grid=3, num_classes=10,
        hooks=(0, 1, 1, 2), reassemble=(8, 16, 32, 32), features=16, head_features=8,
    )


def dpt_input_size(height: int, width: int, short_side: int = 384,
                   multiple: int = 32) -> tuple[int, int]:
    """DPT input size for a ``height x width`` image: aspect kept, short side ``short_side``,
    both sides rounded to a multiple of ``multiple`` (1024x1536 -> 384x576).

    This is MiDaS's ``Resize(keep_aspect_ratio=True, ensure_multiple_of=32,
    resize_method="minimal")`` for images larger than the network size.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = short_side / min(height, width)

    def snap(side: int) -> int:
        return max(multiple, int(round(side * scale / multiple)) * multiple)

    return snap(height), snap(width)


def check_input_size(height: int, width: int) -> None:
    """DPT needs sides that are multiples of 32 (the 1/32 level must upsample exactly)."""
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"DPT input sides must be positive multiples of 32, got "
                         f"{height}x{width}; see dpt_input_size()")


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int,
                     start_index: int = 1) -> torch.Tensor:
    """Bilinearly resize the square position-embedding grid to ``grid_h x grid_w`` tokens, keeping
    the class token's row (MiDaS ``_resize_pos_embed``, align_corners=False)."""
    tok, grid = pos_embed[:, :start_index], pos_embed[0, start_index:]
    old = int(math.sqrt(len(grid)))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([tok, grid], dim=1)


# --- hybrid stem: timm ResNetV2 (vit_base_resnet50_384) ------------------------------------------


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding (more at the bottom/right), as timm's ``*Same`` layers do."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)
    return x


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output channel (w - mean) / sqrt(biased var + eps), as timm's StdConv computes it;
    the Keras port applies this once to the stored weights."""
    w = F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, training=True,
                     momentum=0.0, eps=eps)
    return w.reshape_as(weight)


class StdConv2dSame(nn.Conv2d):
    """Weight-standardised conv with TF "SAME" padding (timm ``StdConv2dSame``, no bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, standardize_weight(self.weight, self.eps), None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an optional ReLU (timm ``GroupNormAct``)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5, act: bool = True):
        super().__init__(groups, channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class MaxPool2dSame(nn.Module):
    """3x3 stride-2 max pool with TF "SAME" padding (timm pads with -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, 3, 2, value=-float("inf")), 3, 2)


class DownsampleConv(nn.Module):
    """Projection shortcut: strided 1x1 StdConv + GroupNorm without activation."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, cfg: DPTConfig):
        super().__init__()
        self.conv = StdConv2dSame(in_ch, out_ch, 1, stride, eps=cfg.std_conv_eps)
        self.norm = GroupNormAct(cfg.groups, out_ch, eps=cfg.gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non pre-activation bottleneck (1x1, strided 3x3, 1x1), ReLU after the residual sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, cfg: DPTConfig):
        super().__init__()
        mid = out_ch // 4
        eps = cfg.std_conv_eps
        self.downsample = (DownsampleConv(in_ch, out_ch, stride, cfg)
                           if stride != 1 or in_ch != out_ch else None)
        self.conv1 = StdConv2dSame(in_ch, mid, 1, eps=eps)
        self.norm1 = GroupNormAct(cfg.groups, mid, eps=cfg.gn_eps)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride, eps=eps)
        self.norm2 = GroupNormAct(cfg.groups, mid, eps=cfg.gn_eps)
        self.conv3 = StdConv2dSame(mid, out_ch, 1, eps=eps)
        self.norm3 = GroupNormAct(cfg.groups, out_ch, eps=cfg.gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks; the first one strides and projects."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, depth: int, cfg: DPTConfig):
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, cfg)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """timm ResNetV2 with the 'same' 7x7 stem, used as the hybrid ViT's patch embedding."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        stem = cfg.stem_channels
        self.stem = nn.Sequential()
        self.stem.add_module("conv", StdConv2dSame(3, stem, 7, 2, eps=cfg.std_conv_eps))
        self.stem.add_module("norm", GroupNormAct(cfg.groups, stem, eps=cfg.gn_eps))
        self.stem.add_module("pool", MaxPool2dSame())
        self.stages = nn.Sequential()
        in_ch = cfg.stem_channels
        for i, (depth, out_ch) in enumerate(zip(cfg.resnet_layers, cfg.resnet_channels,
                                                strict=True)):
            self.stages.add_module(str(i), ResNetStage(in_ch, out_ch, 1 if i == 0 else 2, depth,
                                                       cfg))
            in_ch = out_ch

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage (strides 4, 8, 16)."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class HybridEmbed(nn.Module):
    """ResNet features at stride 16, projected to tokens by a 1x1 conv."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.backbone = ResNetV2(cfg)
        self.proj = nn.Conv2d(cfg.resnet_channels[-1], cfg.embed_dim, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping 16x16 patches projected to tokens."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)


# --- ViT (timm names) ----------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm ViT (``vit_base_resnet50_384`` / ``vit_large_patch16_384``) parameters and blocks."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.patch_embed = HybridEmbed(cfg) if cfg.variant == "hybrid" else PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, cfg.embed_dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)  # unused by DPT
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)  # unused by DPT
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)


# --- reassemble and decoder (MiDaS names) --------------------------------------------------------


class ProjectReadout(nn.Module):
    """Readout "project": concat(token, class token) -> Linear -> GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, 1:]
        readout = x[:, :1].expand_as(tokens)
        return self.project(torch.cat((tokens, readout), -1))


def make_postprocess(level: int, cfg: DPTConfig) -> nn.Sequential:
    """MiDaS ``act_postprocess{level}``: readout, (transpose, unflatten), 1x1 conv, resample.

    Indices 1-2 hold MiDaS's Transpose/Unflatten; ``DPT`` reshapes to the grid itself so any
    input size works, so they are identities here and the parameter indices stay official.
    """
    dim, out = cfg.embed_dim, cfg.reassemble[level - 1]
    layers: list[nn.Module] = [ProjectReadout(dim), nn.Identity(), nn.Identity(),
                               nn.Conv2d(dim, out, 1)]
    if level == 1:
        layers.append(nn.ConvTranspose2d(out, out, 4, stride=4))
    elif level == 2:
        layers.append(nn.ConvTranspose2d(out, out, 2, stride=2))
    elif level == 4:
        layers.append(nn.Conv2d(out, out, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class ResidualConvUnit(nn.Module):
    """ReLU -> conv3x3 -> ReLU -> conv3x3, plus the input (MiDaS ``ResidualConvUnit_custom``)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """Add the refined skip, refine, upsample x2 (bilinear, align_corners=True), 1x1 conv.

    ``size`` replaces the x2 by an explicit output size (Depth Anything's fusion blocks).
    """

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        resize = dict(scale_factor=2) if size is None else dict(size=tuple(size))
        x = F.interpolate(x, **resize, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    """Bilinear x2 upsampling of the MiDaS depth heads: align_corners=True in DPT's,
    False (half-pixel centres) in MidasNet_small's."""

    def __init__(self, align_corners: bool = True):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear",
                             align_corners=self.align_corners)


def make_head(features: int, head_features: int, align_corners: bool = True) -> nn.Sequential:
    """A MiDaS depth head (``scratch.output_conv``, non_negative=True): conv, up x2, conv, ReLU,
    1x1, ReLU."""
    return nn.Sequential(
        nn.Conv2d(features, features // 2, 3, padding=1), Interpolate(align_corners),
        nn.Conv2d(features // 2, head_features, 3, padding=1), nn.ReLU(),
        nn.Conv2d(head_features, 1, 1), nn.ReLU(), nn.Identity(),
    )


class Scratch(nn.Module):
    """The decoder: per-level 3x3 convs to ``features``, four fusion blocks, the depth head."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        for i, ch in enumerate(cfg.reassemble, start=1):
            self.add_module(f"layer{i}_rn", nn.Conv2d(ch, cfg.features, 3, padding=1, bias=False))
        for i in range(1, 5):
            self.add_module(f"refinenet{i}", FeatureFusionBlock(cfg.features))
        self.output_conv = make_head(cfg.features, cfg.head_features)


def refine(scratch: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
    """The MiDaS decoder (DPT and MiDaS Small alike): per-level 3x3 convs, RefineNet fusion from
    the coarsest map up, the depth head; ``[N,H,W]``."""
    layer_1, layer_2, layer_3, layer_4 = maps
    s = scratch
    path_4 = s.refinenet4(s.layer4_rn(layer_4))
    path_3 = s.refinenet3(path_4, s.layer3_rn(layer_3))
    path_2 = s.refinenet2(path_3, s.layer2_rn(layer_2))
    path_1 = s.refinenet1(path_2, s.layer1_rn(layer_1))
    return s.output_conv(path_1).squeeze(1)


class DPT(nn.Module):
    """MiDaS ``DPTDepthModel``: normalised RGB ``[N,3,H,W]`` -> disparity ``[N,H,W]``."""

    def __init__(self, config: DPTConfig | None = None):
        super().__init__()
        self.config = cfg = config or HYBRID_CONFIG
        self.pretrained = nn.Module()
        self.pretrained.model = VisionTransformer(cfg)
        first = 3 if cfg.variant == "hybrid" else 1  # hybrid levels 1-2 come from the ResNet
        for level in range(first, 5):
            self.pretrained.add_module(f"act_postprocess{level}", make_postprocess(level, cfg))
        self.scratch = Scratch(cfg)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four reassembled maps at strides 4, 8, 16 and 32 (NCHW)."""
        cfg, vit = self.config, self.pretrained.model
        n, _, h, w = x.shape
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        maps: dict[int, torch.Tensor] = {}
        if cfg.variant == "hybrid":
            stages = vit.patch_embed.backbone.forward_stages(x)
            maps[1], maps[2] = stages[0], stages[1]
            x = stages[-1]
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((vit.cls_token.expand(n, -1, -1), tokens), dim=1)
        tokens = tokens + resize_pos_embed(vit.pos_embed, gh, gw)
        taps = [(hook, level) for level, hook in enumerate(cfg.hooks, start=1) if level not in maps]
        for i, block in enumerate(vit.blocks):
            if len(maps) == 4:
                break
            tokens = block(tokens)
            for level in [lv for hook, lv in taps if hook == i]:
                post = getattr(self.pretrained, f"act_postprocess{level}")
                t = post[0](tokens)  # readout -> [N, gh*gw, C]
                t = t.transpose(1, 2).reshape(n, -1, gh, gw)
                maps[level] = post[3:](t)
        return [maps[level] for level in range(1, 5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(*x.shape[-2:])
        return refine(self.scratch, self.forward_features(x))

    @classmethod
    def from_midas_checkpoint(cls, path: str | Path, config: DPTConfig | None = None) -> DPT:
        """Load an official MiDaS v3.0 DPT file strictly (``dpt_hybrid_384.pt``,
        ``dpt_large_384.pt``, ``dpt_hybrid-midas-501f0c75.pt``, ...).

        The variant is read from the keys; ``config`` (default: the official config of that
        variant) must agree with it. Every failure is a ``CheckpointError`` naming the file.
        """
        path = Path(path)
        return cls.from_state_dict(read_state_dict(path), path, config)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], path: Path,
                        config: DPTConfig | None = None) -> DPT:
        """``from_midas_checkpoint`` on a state dict already read from ``path``."""
        variant = detect_variant(state, path)
        if config is None:
            config = default_dpt_config(variant)
        elif config.variant != variant:
            raise CheckpointError(
                f"{path}: is a DPT-{variant.title()} checkpoint but a DPT-{config.variant.title()} "
                f"config was given"
            )
        with torch.device("meta"):  # no memory and no random init for 344M parameters
            model = cls(config)
        return load_strict(model, state, path, f"MiDaS DPT-{variant.title()} ({config})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict, or raise ``CheckpointError``."""
    return read_checkpoint(path, "a MiDaS DPT file such as dpt_hybrid_384.pt")[1]


def detect_variant(state: Mapping[str, torch.Tensor], path: Path | str = "checkpoint") -> str:
    """'hybrid' or 'large' from the keys; ``CheckpointError`` for anything else."""
    if HYBRID_STEM_KEY in state:
        return "hybrid"
    if LARGE_PATCH_KEY in state and "scratch.output_conv.0.weight" in state:
        return "large"
    raise CheckpointError(
        f"{path}: not a MiDaS v3.0 DPT checkpoint: expected DPT-Hybrid (dpt_hybrid_384.pt, key "
        f"{HYBRID_STEM_KEY!r}) or DPT-Large (dpt_large_384.pt, ViT-L/16 keys under "
        f"'pretrained.model.' and 'scratch.'); found keys {sorted(state)[:5]}"
    )


def random_dpt(config: DPTConfig | None = None, seed: int = 0) -> DPT:
    """A deterministic random-weight DPT whose disparity is neither constant nor all zero.

    Norm affine parameters are randomised so the port is tested on them too; the last conv's bias
    is then set so that about 90 % of the pre-ReLU outputs on a random probe image are positive.
    """
    torch.manual_seed(seed)
    model = DPT(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        last = model.scratch.output_conv[4]
        captured: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda m, i, o: captured.append(o))
        probe = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        model(probe)
        handle.remove()
        pre = captured[0] - last.bias.view(1, -1, 1, 1)
        last.bias.fill_(-torch.quantile(pre.flatten(), 0.1).item())
    return model
