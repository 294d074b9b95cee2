"""Depth Anything V2 Small: a DINOv2 ViT-S/14 encoder and a DPT decoder giving relative depth.

Paper: Yang et al., "Depth Anything V2" (NeurIPS 2024); encoder from Oquab et al., "DINOv2:
Learning Robust Visual Features without Supervision" (TMLR 2024). Reference implementation:
DepthAnything/Depth-Anything-V2, ``depth_anything_v2/dpt.py``, ``depth_anything_v2/dinov2.py``,
``depth_anything_v2/dinov2_layers/`` and ``depth_anything_v2/util/blocks.py`` (Apache-2.0, like the
``depth_anything_v2_vits.pth`` weights).

Module and parameter names follow the official ``DepthAnythingV2`` (``pretrained.*`` for DINOv2,
``depth_head.*`` for the DPT head) so the official file loads with ``strict=True``. The pieces
shared with MiDaS's DPT (attention, MLP, patch embedding, residual units, fusion blocks) are the
ones of ``models.dpt``. Parameters in the checkpoint that inference never reads are kept so the
load stays strict: DINOv2's ``mask_token`` and ``scratch.refinenet4.resConfUnit1`` (refinenet4 has
no skip input).

What the official forward does, and this one too: the ViT runs with LayerScale after attention
and MLP; the outputs of four blocks go through the ViT's final ``norm``, lose their class token
(``use_clstoken=False``) and are reassembled at strides 4, 8, 16 and 32 (transposed convs k4s4
and k2s2, identity, a stride-2 3x3 conv). The fusion blocks resize to the next level's exact size
(the 1/32 level is ceil(grid / 2) tokens, so not always x2). The head resizes to the input size
and ends in two ReLUs. The position embedding, trained for a 37x37 grid (518 px), is resized
bicubically with DINOv2's ``scale_factor`` of ``(grid + 0.1) / 37`` unless the grid is exactly
37x37 (``interpolate_pos_embed``).

Input: RGB normalised with the ImageNet mean and std, ``[N, 3, H, W]`` with sides multiples of 14
(the official app resizes the short side to 518); output: relative inverse depth ``[N, H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError
from models.checkpoint import load_strict, read_checkpoint
from models.dpt import Attention, FeatureFusionBlock, Mlp, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys every Depth Anything V2 checkpoint has and a MiDaS DPT or NAFNet file has not.
SIGNATURE_KEYS = (
    "pretrained.patch_embed.proj.weight",
    "pretrained.blocks.0.ls1.gamma",
    "depth_head.projects.0.weight",
    "depth_head.scratch.output_conv1.weight",
)
ENCODER_BY_WIDTH = {384: "vits", 768: "vitb", 1024: "vitl", 1536: "vitg"}


@dataclass(frozen=True)
class DepthAnythingConfig:
    """Sizes of a Depth Anything V2; the defaults are the official Small (``vits``).

    Attribute names match ``models.dpt.DPTConfig`` where the meaning is the same, so the shared
    ViT pieces of ``models.dpt`` / ``models.dpt_tf`` take either config.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    pos_grid: int = 37  # the position embedding is trained for a pos_grid^2 token grid (518 px)
    interpolate_offset: float = 0.1  # DINOv2 resizes the grid by (grid + offset) / pos_grid
    hooks: tuple[int, ...] = (2, 5, 8, 11)  # blocks whose outputs feed the head
    out_channels: tuple[int, ...] = (48, 96, 192, 384)  # widths of the four reassembled maps
    features: int = 64  # decoder width (depth_head.scratch.*)
    head_features: int = 32  # width of output_conv2's first conv
    ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        if len(self.hooks) != 4 or len(self.out_channels) != 4:
            raise ValueError("Depth Anything needs four hooks and four out_channels")
        if list(self.hooks) != sorted(set(self.hooks)) or not 0 <= self.hooks[0] \
                or self.hooks[-1] >= self.depth:
            raise ValueError(f"hooks must be increasing block indices below depth {self.depth}, "
                             f"got {self.hooks}")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        if self.features % 2:
            raise ValueError("features must be even (output_conv1 halves it)")


SMALL_CONFIG = DepthAnythingConfig()
# Every kind of module of the real one, a 4x4 position grid (56 px): for fast tests.
TINY_CONFIG = DepthAnythingConfig(
    embed_dim=48, depth=4, num_heads=2, pos_grid=4, hooks=(0, 1, 2, 3),
    out_channels=(8, 16, 24, 32), features=16, head_features=8,
)


def check_input_size(height: int, width: int, patch_size: int = 14) -> None:
    """Depth Anything needs sides that are positive multiples of the patch size (14)."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise ValueError(f"Depth Anything input sides must be positive multiples of "
                         f"{patch_size}, got {height}x{width}")


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int,
                          offset: float = 0.1) -> torch.Tensor:
    """DINOv2's position embedding for a ``grid_h x grid_w`` token grid (class token kept).

    As ``DinoVisionTransformer.interpolate_pos_encoding``: unchanged when the grid is the trained
    square one; otherwise bicubic (A = -0.75, no antialias) with ``scale_factor`` (not ``size``)
    ``((grid_h + offset) / side, (grid_w + offset) / side)``, which makes the sampling positions
    those of a grid ``offset`` tokens larger than the output.
    """
    tokens = pos_embed.shape[1] - 1
    if tokens == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    side, dim = math.sqrt(tokens), pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + offset) / side, (grid_w + offset) / side),
                         mode="bicubic", antialias=False)
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"position grid {int(side)}^2 resized to {tuple(grid.shape[-2:])}, "
                         f"expected {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([pos_embed[:, :1].float(), grid], dim=1).to(pos_embed.dtype)


# --- DINOv2 encoder (official names under ``pretrained``) ----------------------------------------


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (the Keras port folds it into the Linear before)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DinoBlock(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT (no registers, 1-chunk block list) as Depth Anything V2 builds it."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)  # patch_embed.proj: Conv2d(3, dim, 14, stride 14)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))  # training only
        self.blocks = nn.ModuleList([DinoBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def intermediate_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normed patch tokens ``[N, grid_h * grid_w, dim]`` after each hooked block
        (``get_intermediate_layers(x, hooks, return_class_token=True)`` minus the class token)."""
        cfg = self.config
        n, _, h, w = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(n, -1, -1), tokens), dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, h // cfg.patch_size,
                                                w // cfg.patch_size, cfg.interpolate_offset)
        outs = []
        for i, block in enumerate(self.blocks[:cfg.hooks[-1] + 1]):
            tokens = block(tokens)
            if i in cfg.hooks:
                outs.append(self.norm(tokens)[:, 1:])
        return outs


# --- DPT head (official names under ``depth_head``) ----------------------------------------------


class HeadScratch(nn.Module):
    """``depth_head.scratch``: 3x3 convs to ``features``, four fusion blocks, the output convs."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        f = cfg.features
        for i, ch in enumerate(cfg.out_channels, start=1):
            self.add_module(f"layer{i}_rn", nn.Conv2d(ch, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            self.add_module(f"refinenet{i}", FeatureFusionBlock(f))
        self.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, cfg.head_features, 3, padding=1), nn.ReLU(),
            nn.Conv2d(cfg.head_features, 1, 1), nn.ReLU(), nn.Identity(),
        )


class DPTHead(nn.Module):
    """Reassemble four token maps (strides 4, 8, 16, 32), fuse them, predict depth."""

    def __init__(self, cfg: DepthAnythingConfig):
        super().__init__()
        dim, out = cfg.embed_dim, cfg.out_channels
        self.projects = nn.ModuleList([nn.Conv2d(dim, ch, 1) for ch in out])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out[0], out[0], 4, stride=4),
            nn.ConvTranspose2d(out[1], out[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(out[3], out[3], 3, stride=2, padding=1),
        ])
        self.scratch = HeadScratch(cfg)

    def forward(self, tokens: Sequence[torch.Tensor], grid_h: int, grid_w: int,
                patch_size: int = 14) -> torch.Tensor:
        """Hooked tokens ``[N, grid_h * grid_w, dim]`` -> depth ``[N, 1, H, W]`` before the
        model's final ReLU."""
        maps = []
        for t, project, resize in zip(tokens, self.projects, self.resize_layers, strict=True):
            t = t.transpose(1, 2).reshape(t.shape[0], -1, grid_h, grid_w)
            maps.append(resize(project(t)))
        s = self.scratch
        rn = [getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1)]
        path = s.refinenet4(rn[3], size=rn[2].shape[2:])
        path = s.refinenet3(path, rn[2], size=rn[1].shape[2:])
        path = s.refinenet2(path, rn[1], size=rn[0].shape[2:])
        path = s.refinenet1(path, rn[0])
        out = F.interpolate(s.output_conv1(path), (grid_h * patch_size, grid_w * patch_size),
                            mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """Official ``DepthAnythingV2``: ImageNet-normalised RGB ``[N,3,H,W]`` -> depth ``[N,H,W]``."""

    def __init__(self, config: DepthAnythingConfig | None = None):
        super().__init__()
        self.config = cfg = config or SMALL_CONFIG
        self.pretrained = DinoVisionTransformer(cfg)
        self.depth_head = DPTHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h, w = x.shape[-2:]
        check_input_size(h, w, cfg.patch_size)
        tokens = self.pretrained.intermediate_tokens(x)
        depth = self.depth_head(tokens, h // cfg.patch_size, w // cfg.patch_size, cfg.patch_size)
        return F.relu(depth).squeeze(1)

    @classmethod
    def from_checkpoint(cls, path: str | Path,
                        config: DepthAnythingConfig | None = None) -> DepthAnythingV2:
        """Load an official file (``depth_anything_v2_vits.pth``) strictly; ``config`` defaults
        to the official Small. Every failure is a one-line ``CheckpointError`` naming the file."""
        path = Path(path)
        state = read_checkpoint(path, "a Depth Anything V2 file such as "
                                      "depth_anything_v2_vits.pth")[1]
        return cls.from_state_dict(state, path, config)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], path: Path,
                        config: DepthAnythingConfig | None = None) -> DepthAnythingV2:
        """``from_checkpoint`` on a state dict already read from ``path``."""
        if not is_depth_anything_state(state):
            raise CheckpointError(
                f"{path}: not a Depth Anything V2 checkpoint (depth_anything_v2_vits.pth): "
                f"expected keys such as {SIGNATURE_KEYS[1]!r} and {SIGNATURE_KEYS[3]!r}; found "
                f"keys {sorted(state)[:5]}"
            )
        config = config or SMALL_CONFIG
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = cls(config)
        width = state[SIGNATURE_KEYS[0]].shape[0]
        encoder = ENCODER_BY_WIDTH.get(width, f"embed {width}")
        return load_strict(model, state, path,
                           f"{config} (the file is a Depth Anything V2 {encoder} checkpoint)")


def is_depth_anything_state(state: Mapping[str, object]) -> bool:
    """Whether a flat state dict has Depth Anything V2's keys (any encoder size)."""
    return all(k in state for k in SIGNATURE_KEYS)


def random_depth_anything(config: DepthAnythingConfig | None = None,
                          seed: int = 0) -> DepthAnythingV2:
    """A deterministic random-weight Depth Anything V2 whose depth is neither constant nor zero.

    LayerNorm affine parameters and LayerScale gammas are randomised (so the port is tested on
    them), the class token and position embedding are drawn large enough to matter; the last
    conv's bias is then set so that about 90 % of its outputs on a random probe are positive.
    """
    torch.manual_seed(seed)
    model = DepthAnythingV2(config).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, LayerScale):
                module.gamma.copy_(0.1 + 0.9 * torch.rand(module.gamma.shape, generator=gen))
        vit = model.pretrained
        vit.cls_token.copy_(0.5 * torch.randn(vit.cls_token.shape, generator=gen))
        vit.pos_embed.copy_(0.5 * torch.randn(vit.pos_embed.shape, generator=gen))
        last = model.depth_head.scratch.output_conv2[2]
        captured: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda m, i, o: captured.append(o))
        side = 4 * cfg.patch_size
        probe = torch.rand(1, 3, side, side, generator=gen)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        model((probe - mean) / std)
        handle.remove()
        pre = captured[0] - last.bias.view(1, -1, 1, 1)
        last.bias.fill_(-torch.quantile(pre.flatten(), 0.1).item())
    return model
