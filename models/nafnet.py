"""NAFNet, the generator of Bokeh-Loss GAN.

Paper: Chen et al., "Simple Baselines for Image Restoration" (ECCV 2022); used with width 8 and
36 blocks by Lee et al., "Bokeh-Loss GAN" (ECCV-W 2022). Reference implementation:
megvii-research/NAFNet, ``basicsr/models/archs/NAFNet_arch.py``. Module and parameter names follow
that file so official checkpoints load with ``strict=True``.

Two deliberate differences from the reference, both exact:
- ``LayerNorm2d`` is written with plain tensor ops instead of a custom autograd Function, so it
  traces to ONNX; the variance is ``mean((x - mean)^2)`` (no sum of squares that could overflow
  fp16 on a phone GPU).
- With more input than output channels (RGB + depth mask in, RGB out) the global residual adds the
  first ``out_channels`` input channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError
from models.checkpoint import check_values, read_checkpoint

PAPER_CONFIG: dict = dict(
    in_channels=4, out_channels=3, width=8, enc_blocks=(2, 2, 2, 20), middle_blocks=2,
    dec_blocks=(2, 2, 2, 2),
)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (biased variance, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        variance = centred.pow(2).mean(dim=1, keepdim=True)
        y = centred / torch.sqrt(variance + self.eps)
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split the channels in half and multiply the halves: NAFNet's activation-free nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Norm -> 1x1 -> depthwise 3x3 -> gate -> channel attention -> 1x1, then a gated FFN."""

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = channels * dw_expand
        ffn = channels * ffn_expand
        self.conv1 = nn.Conv2d(channels, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, channels, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(channels, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, 1)
        self.norm1 = LayerNorm2d(channels)
        self.norm2 = LayerNorm2d(channels)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class NAFNet(nn.Module):
    """U-Net of NAFBlocks with a global residual; any input size (padded to a multiple of 16)."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        width: int = 8,
        enc_blocks: Sequence[int] = (2, 2, 2, 20),
        middle_blocks: int = 2,
        dec_blocks: Sequence[int] = (2, 2, 2, 2),
    ):
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError("enc_blocks and dec_blocks must have one entry per level")
        if out_channels > in_channels:
            raise ValueError("the global residual needs in_channels >= out_channels")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, width=width,
            enc_blocks=tuple(enc_blocks), middle_blocks=middle_blocks, dec_blocks=tuple(dec_blocks),
        )
        self.out_channels = out_channels
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, out_channels, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        chan = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan) for _ in range(middle_blocks)])
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False),
                                          nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(n)]))
        self.multiple = 2 ** len(enc_blocks)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        pad_h = (self.multiple - h % self.multiple) % self.multiple
        pad_w = (self.multiple - w % self.multiple) % self.multiple
        if pad_h or pad_w:
            inp = F.pad(inp, (0, pad_w, 0, pad_h))
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp[:, : self.out_channels]
        return x[..., :h, :w]


def randomize_residual_scales(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Give every block non-zero ``beta``/``gamma``.

    A fresh NAFNet has them at zero, so its blocks contribute nothing and a parity check on it
    proves nothing about them. Random-weight exports and tests call this first.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def activation_bytes(config: Mapping, height: int, width: int) -> int:
    """A lower bound on the memory of one forward pass at ``height x width``: its largest
    tensor, the first conv of a full-resolution block (2 x width channels, float32), twice (an
    op's input and output are alive at once)."""
    return 2 * 4 * height * width * 2 * int(config["width"])


def random_nafnet(config: Mapping | None = None, seed: int = 0) -> NAFNet:
    """A deterministic random-weight NAFNet (paper config by default) with every block active."""
    torch.manual_seed(seed)
    model = NAFNet(**dict(config or PAPER_CONFIG))
    return randomize_residual_scales(model, seed).eval()


def load_nafnet(path: str | Path, config: Mapping | None = None) -> NAFNet:
    """Load a NAFNet checkpoint strictly; every failure is a ``CheckpointError`` naming the file."""
    path = Path(path)
    raw, state = read_checkpoint(path)
    saved_config = raw.get("nafnet_config") if isinstance(raw, Mapping) else None
    if config is None and isinstance(saved_config, Mapping):
        config = saved_config
    try:
        model = NAFNet(**dict(config or PAPER_CONFIG))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its NAFNet config {dict(config)} does not make a NAFNet "
                              f"({exc})") from None
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit NAFNet{model.config}: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: shapes do not fit NAFNet{model.config} "
                              f"(checkpoint vs model): {'; '.join(wrong[:3])}")
    check_values(state, own, path)
    model.load_state_dict(state, strict=True)
    return model.eval()
