"""Stress weights: random nets given the activation magnitudes of trained ones (issue 19).

Random weights keep every activation near 1, which hides what fp16 does to a trained net
(docs/design.md, section 13): a trained NAFNet's residual stream reaches |x| around 175-500,
trained ViTs carry a few residual channels near +-1000 ("massive activations", Darcet et al.
2024; Sun et al. 2024), and a trained ResNet's GroupNorms see inputs at that scale. Each function
here changes a model in place, deterministically and without any file, so that it reaches those
magnitudes, and returns it:
- where a norm follows, the magnitudes are a pure rescaling (a norm's output does not depend on
  its input's scale) compensated where the stream leaves the normalised part: the net computes
  the same function, only larger inside;
- the massive channels are a constant the MLP of an early block writes into two channels of every
  token, as trained ViTs do: that changes the function (as it does in a trained net).
``residual_peaks`` measures what a model actually reaches on an input.
"""

from __future__ import annotations

import torch
from torch import nn

from models.depth_anything import DepthAnythingV2, LayerScale
from models.dpt import DPT, GroupNormAct
from models.midas_small import DepthwiseSeparable, InvertedResidual, MidasSmall
from models.nafnet import NAFBlock, NAFNet

NAFNET_PEAK = 500.0  # |x| the NAFNet residual stream is scaled to reach
MASSIVE = (1000.0, -700.0)  # values of the two massive residual channels
GROUP_NORM_PEAK = 1000.0  # |x| the largest GroupNorm input is scaled to reach


def _peak_inputs(model: nn.Module, kinds: tuple[type, ...], *inputs: torch.Tensor) -> float:
    """The largest |value| entering any module of ``kinds`` during ``model(*inputs)``."""
    peak = [0.0]

    def hook(_module, args, _out):
        peak[0] = max(peak[0], float(args[0].detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def residual_peaks(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """What ``model`` reaches on ``x`` (its own input layout): the largest |value| of the
    residual stream (NAFBlock inputs; ViT or EfficientNet block outputs) and of GroupNorm
    inputs, the magnitudes the stress functions set."""
    peaks: dict[str, float] = {}
    outputs: list[float] = []

    def out_hook(_module, _args, out):
        outputs.append(float(out.detach().abs().max()))

    if isinstance(model, NAFNet):
        peaks["residual"] = _peak_inputs(model, (NAFBlock,), x)
        return peaks
    blocks = [m for m in model.modules() if type(m).__name__ in ("Block", "DinoBlock")
              or isinstance(m, InvertedResidual | DepthwiseSeparable)]
    handles = [m.register_forward_hook(out_hook) for m in blocks]
    try:
        peaks["group_norm_input"] = _peak_inputs(model, (GroupNormAct,), x)
    finally:
        for h in handles:
            h.remove()
    peaks["residual"] = max(outputs, default=0.0)
    if not peaks["group_norm_input"]:
        del peaks["group_norm_input"]
    return peaks


def stress_nafnet(model: NAFNet, probe: torch.Tensor | None = None,
                  peak: float = NAFNET_PEAK) -> NAFNet:
    """Scale NAFNet's residual stream so that it reaches ``peak`` on ``probe`` (default: a
    seeded random photo and mask), the same function.

    ``intro`` (weight and bias), every block's ``beta``/``gamma`` and the ``downs`` biases are
    multiplied by ``s``; then every value of the stream is ``s`` times the original (the
    LayerNorms inside the blocks do not see the scale, ``ups`` has no bias), and ``ending``'s
    weight divided by ``s`` gives back the original output.
    """
    if probe is None:
        probe = torch.rand(1, 4, 64, 96, generator=torch.Generator().manual_seed(19))
    s = peak / _peak_inputs(model, (NAFBlock,), probe)
    with torch.no_grad():
        model.intro.weight.mul_(s)
        model.intro.bias.mul_(s)
        for block in model.modules():
            if isinstance(block, NAFBlock):
                block.beta.mul_(s)
                block.gamma.mul_(s)
        for down in model.downs:
            down.bias.mul_(s)
        model.ending.weight.div_(s)
    return model


def _massive_channels(blocks: nn.ModuleList | nn.Sequential, dim: int) -> None:
    """Make the MLP of block 1 (0 in a one-block net) write ``MASSIVE`` into two channels of
    every token (through its LayerScale where there is one)."""
    block = blocks[min(1, len(blocks) - 1)]
    layer_scale = getattr(block, "ls2", None)
    scale = layer_scale.gamma if isinstance(layer_scale, LayerScale) else None
    for channel, value in zip((dim // 3, 2 * dim // 3), MASSIVE, strict=True):
        gain = 1.0 if scale is None else float(scale[channel])
        block.mlp.fc2.bias[channel] += value / gain


def _scale_group_norms(model: DPT, probe: torch.Tensor, peak: float) -> None:
    """Scale every GroupNorm's output by ``k`` so that the largest GroupNorm input after the
    stem reaches ``peak``; the convs that read the ResNet's output (the ViT's projection and the
    decoder's level 1-2 convs) divide it back. Each weight-standardised conv then outputs ``k``
    times its original (ReLU and the sums are homogeneous) and each GroupNorm undoes it."""
    backbone = model.pretrained.model.patch_embed.backbone
    norms = [m for m in backbone.modules() if isinstance(m, GroupNormAct)]
    k = peak / _peak_inputs(backbone.stages, (GroupNormAct,), backbone.stem(probe))
    for norm in norms:
        norm.weight.mul_(k)
        norm.bias.mul_(k)
    model.pretrained.model.patch_embed.proj.weight.div_(k)
    model.scratch.layer1_rn.weight.div_(k)
    model.scratch.layer2_rn.weight.div_(k)


def stress_depth(model: nn.Module, probe: torch.Tensor | None = None) -> nn.Module:
    """Massive activations for any depth net of models/depth.py, in place.

    - DPT (Hybrid, Large) and Depth Anything V2: two residual channels of every ViT token at
      ``MASSIVE`` from block 1 on; DPT-Hybrid also GroupNorm inputs up to ``GROUP_NORM_PEAK``
      (``probe``: a seeded random normalised image by default).
    - MiDaS v2.1 Small (no norm left after BatchNorm folding): the first block of its 1/16
      stage writes ``MASSIVE`` into two channels, which its residual blocks carry on.
    """
    with torch.no_grad():
        if isinstance(model, DPT):
            vit = model.pretrained.model
            _massive_channels(vit.blocks, model.config.embed_dim)
            if model.config.variant == "hybrid":
                if probe is None:
                    probe = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(19))
                _scale_group_norms(model, probe * 2 - 1, GROUP_NORM_PEAK)
        elif isinstance(model, DepthAnythingV2):
            _massive_channels(model.pretrained.blocks, model.config.embed_dim)
        elif isinstance(model, MidasSmall):
            first = model.pretrained.layer3[0][0]  # stage 3: strides to 1/16, then residuals
            bn = first.bn3 if isinstance(first, InvertedResidual) else first.bn2
            dim = bn.bias.shape[0]
            for channel, value in zip((dim // 3, 2 * dim // 3), MASSIVE, strict=True):
                bn.bias[channel] += value
        else:
            raise TypeError(f"no stress weights for {type(model).__name__}")
    return model
