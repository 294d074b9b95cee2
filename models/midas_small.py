"""MiDaS v2.1 Small: a phone-sized depth network (EfficientNet-Lite3 encoder, RefineNet decoder).

Paper: Ranftl et al., "Towards Robust Monocular Depth Estimation: Mixing Datasets for Zero-shot
Cross-dataset Transfer" (TPAMI 2022); the small model is the MiDaS v2.1 release
``midas_v21_small_256.pt``. Reference implementation: isl-org/MiDaS, ``midas/midas_net_custom.py``
(``MidasNet_small``) and ``midas/blocks.py``; its encoder is ``tf_efficientnet_lite3`` from
rwightman/gen-efficientnet-pytorch (``geffnet/gen_efficientnet.py``,
``geffnet/efficientnet_builder.py``, ``geffnet/conv2d_layers.py``), built with
``exportable=True``. Tan & Le, "EfficientNet" (ICML 2019), describes the encoder family.

Written without geffnet: module and parameter names follow ``MidasNet_small`` so the official file
loads with ``strict=True``. MiDaS keeps the EfficientNet stem and its first seven stages, split
into four levels at strides 4, 8, 16 and 32:

- ``pretrained.layer1``: ``0`` stem conv, ``1`` its BatchNorm, ``2`` ReLU6, ``3`` stage 0,
  ``4`` stage 1;
- ``pretrained.layer2``: ``0`` stage 2;
- ``pretrained.layer3``: ``0`` stage 3, ``1`` stage 4;
- ``pretrained.layer4``: ``0`` stage 5, ``1`` stage 6.

The "tf_" EfficientNet pads its strided convs like TensorFlow's "SAME" (more at the bottom and
right); geffnet's exportable conv computes that padding once from the first input it sees, which
gives the same padding for every size here (sides are multiples of 32, so every strided conv sees
an even size). BatchNorm runs on its running statistics (eval mode).

``scratch.refinenet4.resConfUnit1`` is in the checkpoint but never used (the coarsest fusion block
has no skip input); it is kept so the file loads strictly.
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
from models.dpt import ResidualConvUnit, make_head, pad_same, refine

# EfficientNet-Lite before width/depth scaling, one row per stage:
# (block kind, repeats, depthwise kernel, stride, expansion ratio, output channels).
# "ds": depthwise-separable block, "ir": inverted residual (MobileNetV2); never squeeze-excite.
LITE_STAGES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)

# Which EfficientNet stages make each MiDaS level, and where they sit in pretrained.layer{level}.
LEVEL_STAGES: tuple[tuple[int, ...], ...] = ((0, 1), (2,), (3, 4), (5, 6))
_FIRST_SLOT = (3, 0, 0, 0)  # layer1 starts with the stem conv, BatchNorm and ReLU6

STEM_KEY = "pretrained.layer1.0.weight"
_SIGNATURE_KEYS = (  # present in every MidasNet_small file, absent from other MiDaS nets
    "pretrained.layer1.3.0.conv_dw.weight",
    "pretrained.layer1.4.0.conv_pwl.weight",
    "pretrained.layer4.1.0.conv_pwl.weight",
    "scratch.refinenet1.out_conv.weight",
    "scratch.output_conv.4.weight",
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never more
    than 10 % below ``value`` (EfficientNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class StageSpec:
    """One EfficientNet stage after scaling."""

    kind: str
    repeats: int
    kernel: int
    stride: int
    expansion: int
    channels: int


@dataclass(frozen=True)
class MidasSmallConfig:
    """Sizes of a MiDaS Small; the defaults are the official ``midas_v21_small_256.pt``
    (``MidasNet_small(features=64, backbone="efficientnet_lite3", blocks={"expand": True})``)."""

    channel_multiplier: float = 1.2  # EfficientNet-Lite3 width
    depth_multiplier: float = 1.4  # EfficientNet-Lite3 depth (first and last stage not scaled)
    stem_channels: int = 32  # the lite variants keep the stem unscaled
    stages: tuple[tuple[str, int, int, int, int, int], ...] = LITE_STAGES
    features: int = 64  # decoder width of the finest level
    expand: bool = True  # level widths features * (1, 2, 4, 8) instead of features * 1
    head_features: int = 32  # second head conv width
    bn_eps: float = 1e-3  # TensorFlow's BatchNorm epsilon (geffnet BN_EPS_TF_DEFAULT)

    def __post_init__(self) -> None:
        if len(self.stages) != 7:
            raise ValueError("MiDaS Small taps seven EfficientNet stages")
        for kind, repeats, kernel, stride, _, _ in self.stages:
            if kind not in ("ds", "ir") or repeats < 1 or kernel % 2 == 0 or stride not in (1, 2):
                raise ValueError(f"bad EfficientNet stage {(kind, repeats, kernel, stride)}")
        if self.features % 2:
            raise ValueError("features must be even (the head halves it)")

    def stage_specs(self) -> tuple[StageSpec, ...]:
        """The stages scaled by the width and depth multipliers (geffnet ``decode_arch_def`` with
        ``fix_first_last=True``, repeats rounded up; ``round_channels`` for the widths)."""
        specs = []
        last = len(self.stages) - 1
        for i, (kind, repeats, kernel, stride, expansion, channels) in enumerate(self.stages):
            if 0 < i < last:
                repeats = max(1, math.ceil(repeats * self.depth_multiplier))
            specs.append(StageSpec(kind, repeats, kernel, stride, expansion,
                                   make_divisible(channels * self.channel_multiplier)))
        return tuple(specs)

    def level_channels(self) -> tuple[int, ...]:
        """Encoder channels at strides 4, 8, 16, 32 (official: 32, 48, 136, 384)."""
        specs = self.stage_specs()
        return tuple(specs[stages[-1]].channels for stages in LEVEL_STAGES)

    def level_features(self) -> tuple[int, ...]:
        """Decoder widths of levels 1-4 (official: 64, 128, 256, 512)."""
        f = self.features
        return (f, 2 * f, 4 * f, 8 * f) if self.expand else (f,) * 4


OFFICIAL_CONFIG = MidasSmallConfig()


def tiny_midas_small_config(expand: bool = True) -> MidasSmallConfig:
    """A 1.6 MB (400k parameters) MiDaS Small with every kind of block of the real one
    (depthwise-separable with and without residual, 3x3 and 5x5 inverted residuals at strides 1
    and 2, residual repeats), for fast tests. The stem is 8 wide so that stage 0 has its residual
    (the official one has not)."""
    return MidasSmallConfig(channel_multiplier=0.25, depth_multiplier=0.5, stem_channels=8,
                            features=8, expand=expand, head_features=8)


def stage_prefix(stage: int) -> str:
    """State-dict prefix of EfficientNet stage ``stage`` (0-6), e.g. ``pretrained.layer3.1``."""
    for level, stages in enumerate(LEVEL_STAGES):
        if stage in stages:
            return f"pretrained.layer{level + 1}.{_FIRST_SLOT[level] + stages.index(stage)}"
    raise ValueError(f"no EfficientNet stage {stage} in MiDaS Small")


def check_input_size(height: int, width: int) -> None:
    """MiDaS Small needs sides that are multiples of 32 (the 1/32 level must upsample exactly)."""
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"MiDaS Small input sides must be positive multiples of 32, got "
                         f"{height}x{width}")


# --- encoder: EfficientNet-Lite (geffnet names) --------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """Strided conv without bias, padded like TensorFlow "SAME" for each input's size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size[0], self.stride[0]))


def effnet_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                depthwise: bool = False) -> nn.Conv2d:
    """geffnet's ``select_conv2d`` with ``pad_type="same"``: stride 1 pads k//2 on every side
    (what "SAME" gives for odd kernels), stride 2 pads TensorFlow's way."""
    groups = out_ch if depthwise else 1
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=False)
    return Conv2dSame(in_ch, out_ch, kernel, stride, groups=groups)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv, BN, ReLU6, pointwise conv, BN (no activation); residual when the shape
    is kept."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, eps: float):
        super().__init__()
        self.residual = stride == 1 and in_ch == out_ch
        self.conv_dw = effnet_conv(in_ch, in_ch, kernel, stride, depthwise=True)
        self.bn1 = nn.BatchNorm2d(in_ch, eps=eps)
        self.conv_pw = effnet_conv(in_ch, out_ch, 1)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return y + x if self.residual else y


class InvertedResidual(nn.Module):
    """1x1 expansion, BN, ReLU6, depthwise conv, BN, ReLU6, 1x1 projection, BN; residual when
    the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int,
                 eps: float):
        super().__init__()
        mid = make_divisible(in_ch * expansion)
        self.residual = stride == 1 and in_ch == out_ch
        self.conv_pw = effnet_conv(in_ch, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=eps)
        self.conv_dw = effnet_conv(mid, mid, kernel, stride, depthwise=True)
        self.bn2 = nn.BatchNorm2d(mid, eps=eps)
        self.conv_pwl = effnet_conv(mid, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.residual else y


def make_stage(spec: StageSpec, in_ch: int, eps: float) -> nn.Sequential:
    """``spec.repeats`` blocks; only the first one strides."""
    blocks = []
    for i in range(spec.repeats):
        stride = spec.stride if i == 0 else 1
        if spec.kind == "ds":
            blocks.append(DepthwiseSeparable(in_ch, spec.channels, spec.kernel, stride, eps))
        else:
            blocks.append(InvertedResidual(in_ch, spec.channels, spec.kernel, stride,
                                           spec.expansion, eps))
        in_ch = spec.channels
    return nn.Sequential(*blocks)


def make_encoder(cfg: MidasSmallConfig) -> nn.Module:
    """``pretrained``: the EfficientNet stem and stages 0-6 as four levels."""
    specs = cfg.stage_specs()
    stages, in_ch = [], cfg.stem_channels
    for spec in specs:
        stages.append(make_stage(spec, in_ch, cfg.bn_eps))
        in_ch = spec.channels
    encoder = nn.Module()
    stem = [effnet_conv(3, cfg.stem_channels, 3, 2), nn.BatchNorm2d(cfg.stem_channels,
                                                                    eps=cfg.bn_eps), nn.ReLU6()]
    for level, indices in enumerate(LEVEL_STAGES, start=1):
        modules = (stem if level == 1 else []) + [stages[i] for i in indices]
        encoder.add_module(f"layer{level}", nn.Sequential(*modules))
    return encoder


# --- decoder (MiDaS names) -----------------------------------------------------------------------


class FeatureFusionBlock(nn.Module):
    """MiDaS ``FeatureFusionBlock_custom``: add the refined skip, refine, bilinear x2
    (align_corners=True), then a 1x1 ``out_conv`` that halves the channels when ``expand``."""

    def __init__(self, features: int, expand: bool):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features // 2 if expand else features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """Per-level 3x3 convs to the decoder widths, four fusion blocks, the depth head."""

    def __init__(self, cfg: MidasSmallConfig):
        super().__init__()
        widths = cfg.level_features()
        for i, (ch, f) in enumerate(zip(cfg.level_channels(), widths, strict=True), start=1):
            self.add_module(f"layer{i}_rn", nn.Conv2d(ch, f, 3, padding=1, bias=False))
        for i in range(4, 0, -1):  # refinenet1 never expands (its output feeds the head)
            self.add_module(f"refinenet{i}", FeatureFusionBlock(widths[i - 1],
                                                                cfg.expand and i > 1))
        # MidasNet_small's head upsamples with half-pixel centres (align_corners=False)
        self.output_conv = make_head(cfg.features, cfg.head_features, align_corners=False)


class MidasSmall(nn.Module):
    """MiDaS ``MidasNet_small``: ImageNet-normalised RGB ``[N,3,H,W]`` -> relative inverse depth
    (disparity) ``[N,H,W]``, non-negative. Call ``eval()`` before use (BatchNorm)."""

    def __init__(self, config: MidasSmallConfig | None = None):
        super().__init__()
        self.config = cfg = config or OFFICIAL_CONFIG
        self.pretrained = make_encoder(cfg)
        self.scratch = Scratch(cfg)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs at strides 4, 8, 16 and 32 (NCHW)."""
        p = self.pretrained
        layer_1 = p.layer1(x)
        layer_2 = p.layer2(layer_1)
        layer_3 = p.layer3(layer_2)
        return [layer_1, layer_2, layer_3, p.layer4(layer_3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(*x.shape[-2:])
        return refine(self.scratch, self.forward_features(x))

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: MidasSmallConfig | None = None
                        ) -> MidasSmall:
        """Load ``midas_v21_small_256.pt`` (or a file of the same layout for ``config``) strictly,
        in eval mode. Every failure is a one-line ``CheckpointError`` naming the file."""
        path = Path(path)
        state = read_checkpoint(path, "a MiDaS v2.1 Small file such as midas_v21_small_256.pt")[1]
        return cls.from_state_dict(state, path, config)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], path: Path,
                        config: MidasSmallConfig | None = None) -> MidasSmall:
        """``from_checkpoint`` on a state dict already read from ``path``."""
        if not is_midas_small_state(state):
            raise CheckpointError(
                f"{path}: not a MiDaS v2.1 Small checkpoint (midas_v21_small_256.pt, "
                f"EfficientNet-Lite3 keys such as {_SIGNATURE_KEYS[0]!r}); found keys "
                f"{sorted(state)[:5]}"
            )
        config = config or OFFICIAL_CONFIG
        with torch.device("meta"):
            model = cls(config)
        return load_strict(model, state, path, f"MiDaS v2.1 Small ({config})")


def is_midas_small_state(state: Mapping[str, object]) -> bool:
    """Whether a flat state dict has the layout of a MiDaS v2.1 Small (``MidasNet_small`` with an
    EfficientNet-Lite encoder), whatever its widths; DPT and MiDaS v2.1 (ResNeXt) files do not."""
    return all(k in state for k in (STEM_KEY, *_SIGNATURE_KEYS))


def random_midas_small(config: MidasSmallConfig | None = None, seed: int = 0) -> MidasSmall:
    """A deterministic random-weight MiDaS Small (eval mode) whose disparity is neither constant
    nor all zero.

    BatchNorm affine parameters are randomised, then the running statistics are set to those of
    a random probe batch (one training-mode pass with momentum 1), so every BatchNorm has
    non-trivial statistics for the port to fold and activations keep their scale through the
    encoder. The last conv's bias is then set so that about 90 % of the pre-ReLU outputs on the
    probe are positive.
    """
    torch.manual_seed(seed)
    model = MidasSmall(config)
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    probe = (torch.rand(2, 3, 128, 128, generator=gen) - 0.45) / 0.225  # ImageNet-normalised
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=gen))
            bn.momentum = 1.0
        model.train()(probe)
        for bn in norms:
            bn.momentum = 0.1
            bn.num_batches_tracked.fill_(1000)
        model.eval()
        last = model.scratch.output_conv[4]
        captured: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda m, i, o: captured.append(o))
        model(probe)
        handle.remove()
        pre = captured[0] - last.bias.view(1, -1, 1, 1)
        last.bias.fill_(-torch.quantile(pre.flatten(), 0.1).item())
    return model
