"""Losses of Bokeh-Loss GAN (paper sections 3.3-3.5, docs/design.md, section 5).

Images are ``[N,3,H,W]`` in [0,1], the depth mask ``M`` is ``[N,1,H,W]`` in [0,1] with 1 = near (in
focus). Every loss returns a scalar averaged over the batch. The bokeh losses are normalised per
image by ``h*w`` as in the paper, so their size does not depend on the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import CheckpointError, UserError
from common.metrics import ssim
from models.checkpoint import load_weights_only


def ssim_loss(output: Tensor, target: Tensor) -> Tensor:
    """``L_SSIM = 1 - SSIM``."""
    return 1 - ssim(output, target)


def l1_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error."""
    return (output - target).abs().mean()


# --- Bokeh losses (section 3.4) ----------------------------------------------------------------

# 0, 90, +45 and -45 degrees, as in docs/design.md, section 5.
SOBEL_KERNELS = torch.tensor(
    [
        [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
        [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
        [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]],
        [[-2, -1, 0], [-1, 0, 1], [0, 1, 2]],
    ],
    dtype=torch.float32,
)


def edge_strength(x: Tensor) -> Tensor:
    """Per image: summed L1 norm of the four Sobel responses, divided by ``h*w``. Shape ``[N]``.

    The convolution is 'valid' (no padding): zero padding would invent an edge along the image
    border and the foreground edge loss would reward it.
    """
    n, c, h, w = x.shape
    k = SOBEL_KERNELS.to(dtype=x.dtype, device=x.device)
    k = k.unsqueeze(1).repeat(c, 1, 1, 1)  # [4c,1,3,3]: four kernels per channel
    responses = F.conv2d(x, k, groups=c)
    return responses.abs().flatten(1).sum(1) / (h * w)


def foreground_edge_loss(output: Tensor, mask: Tensor) -> Tensor:
    """Eq. 1: minus the edge strength of ``output * M``; lower when the in-focus part is sharper."""
    return -edge_strength(output * mask).mean()


def edge_difference_loss(inp: Tensor, output: Tensor, mask: Tensor) -> Tensor:
    """Eq. 2: ``| |L_fe(output, M)| - |L_fe(input, M)| |`` per image, averaged over the batch.

    Keeps the foreground edges as strong as the all-in-focus input's, so eq. 1 cannot win by
    inventing edges.
    """
    return (edge_strength(output * mask) - edge_strength(inp * mask)).abs().mean()


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation per image (sum of absolute neighbour differences). ``[N]``."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dx + dy


def background_blur_loss(output: Tensor, mask: Tensor) -> Tensor:
    """Eq. 3: total variation of ``output * (1 - M)`` divided by ``h*w``; lower when smoother."""
    h, w = output.shape[-2:]
    return (total_variation(output * (1 - mask)) / (h * w)).mean()


STAGE1_WEIGHTS = dict(l1=0.5, ssim=0.05, edgediff=0.005, backblur=0.1, foreedge=0.005)
STAGE2_WEIGHTS = dict(l1=0.5, vgg=0.1, ssim=0.05, adv=1.0)


def stage1_loss(inp: Tensor, output: Tensor, target: Tensor, mask: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4 (pretraining). Returns the total and the unweighted terms for logging."""
    terms = dict(
        l1=l1_loss(output, target),
        ssim=ssim_loss(output, target),
        edgediff=edge_difference_loss(inp, output, mask),
        backblur=background_blur_loss(output, mask),
        foreedge=foreground_edge_loss(output, mask),
    )
    total = sum(STAGE1_WEIGHTS[k] * v for k, v in terms.items())
    return total, terms


# --- VGG19 perceptual loss ---------------------------------------------------------------------

# torchvision's vgg19 "features" layout: channel counts, "M" = max pool.
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19Features(nn.Module):
    """VGG19 ``features`` up to conv5_4 (before its ReLU), with torchvision's key names.

    ``features.34`` is conv5_4; the module stops there, so a torchvision ``vgg19`` state dict loads
    after dropping its later keys (classifier). Input is an RGB image in [0,1]; the ImageNet
    normalisation happens inside.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers[:-1])  # drop relu5_4: the loss reads conv5_4
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.features((x - self.mean) / self.std)


class VGGWeightsError(UserError, ValueError):
    """A VGG19 weights file that is missing or does not fit."""


def load_vgg19_features(path: str | Path | None, allow_random: bool = False) -> VGG19Features:
    """A frozen VGG19 feature extractor from a local torchvision ``vgg19`` weights file.

    Without a file it refuses, unless ``allow_random`` (a perceptual loss on random features is a
    smoke test, not the paper's loss).
    """
    model = VGG19Features()
    if path is None:
        if not allow_random:
            raise VGGWeightsError(
                "stage 2 needs VGG19 weights: pass --vgg-weights PATH (torchvision "
                "vgg19-dcbb9e9d.pth) or --allow-random-vgg for a smoke run")
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(0)
            model = VGG19Features()
    else:
        path = Path(path)
        if not path.is_file():
            raise VGGWeightsError(f"{path}: no such VGG19 weights file")
        try:
            state = load_weights_only(path)
        except CheckpointError as exc:
            raise VGGWeightsError(f"{path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise VGGWeightsError(f"{path}: not a torchvision vgg19 state dict "
                                  f"(missing {missing[:3]})")
        try:
            model.load_state_dict({k: state[k] for k in expected}, strict=True)
        except RuntimeError as exc:
            raise VGGWeightsError(f"{path}: shapes do not fit VGG19: {exc}") from None
    model.eval().requires_grad_(False)
    return model


def vgg_loss(vgg: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """L1 between conv5_4 features of output and target."""
    with torch.no_grad():
        target_features = vgg(target)
    return (vgg(output) - target_features).abs().mean()


# --- WGAN-GP over the dual-scale critics (section 3.3) ------------------------------------------


def critic_score(critic: nn.Module, x: Tensor) -> Tensor:
    """One Wasserstein score per image: the mean of the critic's patch map. ``[N]``."""
    return critic(x).flatten(1).mean(1)


def critic_loss(critics: Sequence[nn.Module], real: Tensor, fake: Tensor,
                gp_weight: float = 1.0, alpha: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """WGAN-GP critic loss ``D(fake) - D(real) + gp_weight * (|grad D(x_hat)| - 1)^2``.

    Averaged over the critics. ``x_hat`` interpolates real and fake with one uniform ``alpha``
    per image (drawn from torch's global RNG unless given). Real, fake and interpolates go through
    each critic in one forward pass: DistributedDataParallel expects one forward per backward, and
    without BatchNorm the batch composition does not change any image's score.
    """
    fake = fake.detach()
    n = real.shape[0]
    if alpha is None:
        alpha = torch.rand(n, 1, 1, 1, device=real.device, dtype=real.dtype)
    interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    totals, wdists, gps = [], [], []
    for critic in critics:
        scores = critic_score(critic, torch.cat([real, fake, interp]))
        s_real, s_fake, s_interp = scores.split(n)
        (grad,) = torch.autograd.grad(s_interp.sum(), interp, create_graph=True)
        gp = ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        wdist = s_real.mean() - s_fake.mean()
        totals.append(-wdist + gp_weight * gp)
        wdists.append(wdist.detach())
        gps.append(gp.detach())
    k = len(critics)
    return sum(totals) / k, dict(wdist=sum(wdists) / k, gp=sum(gps) / k)


def generator_adversarial_loss(critics: Sequence[nn.Module], fake: Tensor) -> Tensor:
    """``-D(fake)`` averaged over the critics."""
    return sum(-critic_score(c, fake).mean() for c in critics) / len(critics)


def stage2_loss(output: Tensor, target: Tensor, vgg: nn.Module, critics: Sequence[nn.Module]
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5 (refinement). Returns the total and the unweighted terms for logging."""
    terms = dict(
        l1=l1_loss(output, target),
        vgg=vgg_loss(vgg, output, target),
        ssim=ssim_loss(output, target),
        adv=generator_adversarial_loss(critics, output),
    )
    total = sum(STAGE2_WEIGHTS[k] * v for k, v in terms.items())
    return total, terms
