"""PatchGAN critics for Bokeh-Loss GAN's adversarial stage.

Paper: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix,
CVPR 2017), ``NLayerDiscriminator``; used by Lee et al., "Bokeh-Loss GAN" (ECCV-W 2022) as two
critics of depth 3 (70 px receptive field) and 5 (286 px). Reference implementation:
junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``; parameter names (``model.N``) follow
it with ``norm_layer`` removed, because a WGAN-GP critic must not normalise over the batch.

The critics judge the RGB image alone (real bokeh vs generated), not conditioned on the input
photo: the paper does not say it conditions them, and L1/SSIM/VGG already tie the output to its
input.
"""

from __future__ import annotations

from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN without BatchNorm: 4x4 convs, LeakyReLU 0.2, one score per patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers

    @staticmethod
    def min_size(n_layers: int) -> int:
        """Smallest square input that still leaves one output patch (96 for n_layers 5)."""
        return 3 * 2**n_layers

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def dual_scale_critics(in_channels: int = 3, ndf: int = 64) -> nn.ModuleList:
    """The paper's pair of critics: n_layers 3 and 5, adversarial losses averaged over them."""
    return nn.ModuleList([NLayerDiscriminator(in_channels, ndf, 3),
                          NLayerDiscriminator(in_channels, ndf, 5)])
