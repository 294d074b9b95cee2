"""Losses against values computed by hand, against scikit-image, and in the right direction."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from models.discriminator import NLayerDiscriminator, dual_scale_critics
from train.losses import (
    VGG19Features,
    VGGWeightsError,
    background_blur_loss,
    critic_loss,
    edge_difference_loss,
    foreground_edge_loss,
    generator_adversarial_loss,
    l1_loss,
    load_vgg19_features,
    ssim,
    stage1_loss,
    vgg_loss,
)


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()


def photo(name: str = "astronaut", size: int = 128) -> np.ndarray:
    im = getattr(skdata, name)()[:size, :size].astype(np.float64) / 255
    return im if im.ndim == 3 else np.repeat(im[..., None], 3, 2)


# --- SSIM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_ssim_matches_scikit_image_on_real_photos(name):
    a = getattr(skdata, name)()[:160, :200].astype(np.float64) / 255
    rng = np.random.default_rng(0)
    b = np.clip(gaussian(a, sigma=1.5, channel_axis=-1) + rng.normal(0, 0.03, a.shape), 0, 1)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert abs(ssim(nchw(a), nchw(b)).item() - ref) < 1e-3


def test_ssim_by_hand_constant_images():
    # Constant images: means only, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    # float64: in float32 E[x^2] - E[x]^2 cancels to ~1e-8, which C2 = 9e-4 turns into ~1e-4.
    a = torch.full((1, 3, 16, 16), 0.2, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    expected = (2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4)
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-9)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-9)
    assert ssim(a.float(), b.float()).item() == pytest.approx(expected, abs=1e-3)


# --- bokeh losses by hand ------------------------------------------------------------------------


def step_image() -> torch.Tensor:
    """3x3, every channel [[0,0,1]]*3: one valid Sobel position."""
    x = torch.zeros(1, 3, 3, 3)
    x[..., 2] = 1
    return x


def test_foreground_edge_loss_by_hand():
    # Per channel: 0deg -> 1+2+1 = 4, 90deg -> 0, +45deg -> 2+1+0 = 3, -45deg -> 0+1+2 = 3: 10.
    # Three channels: 30, divided by h*w = 9, negated.
    x, ones = step_image(), torch.ones(1, 1, 3, 3)
    assert foreground_edge_loss(x, ones).item() == pytest.approx(-30 / 9)
    assert foreground_edge_loss(x, 0.5 * ones).item() == pytest.approx(-15 / 9)
    assert foreground_edge_loss(x, 0 * ones).item() == 0


def test_edge_difference_loss_by_hand():
    x, ones = step_image(), torch.ones(1, 1, 3, 3)
    assert edge_difference_loss(torch.zeros_like(x), x, ones).item() == pytest.approx(30 / 9)
    assert edge_difference_loss(x, torch.zeros_like(x), ones).item() == pytest.approx(30 / 9)
    assert edge_difference_loss(x, x, ones).item() == 0


def test_background_blur_loss_by_hand():
    # [[0,1],[1,0]]: two vertical and two horizontal unit steps per channel: TV 4, x3 channels,
    # divided by h*w = 4 -> 3. A mask of ones (all foreground) removes it.
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 3, 2, 2)
    assert background_blur_loss(x, torch.zeros(1, 1, 2, 2)).item() == pytest.approx(3.0)
    assert background_blur_loss(x, torch.ones(1, 1, 2, 2)).item() == 0
    assert background_blur_loss(x, torch.full((1, 1, 2, 2), 0.75)).item() == pytest.approx(0.75)


def test_l1_by_hand():
    a = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 0.5, 0.0, 0.0]).view(1, 1, 2, 2)
    assert l1_loss(a, b).item() == pytest.approx((1 + 0 + 1 + 0.25) / 4)


def test_bokeh_losses_move_the_right_way():
    sharp = nchw(photo())
    soft = nchw(gaussian(photo(), sigma=2, channel_axis=-1))
    ones, zeros = torch.ones(1, 1, 128, 128), torch.zeros(1, 1, 128, 128)
    assert foreground_edge_loss(sharp, ones) < foreground_edge_loss(soft, ones)
    assert background_blur_loss(soft, zeros) < background_blur_loss(sharp, zeros)
    # Matching the input's edge strength costs nothing; blurring it does.
    assert edge_difference_loss(sharp, sharp, ones) < edge_difference_loss(sharp, soft, ones)


def test_stage1_loss_is_the_weighted_sum():
    rng = torch.Generator().manual_seed(0)
    inp, out, tgt = (torch.rand(2, 3, 24, 24, generator=rng) for _ in range(3))
    mask = torch.rand(2, 1, 24, 24, generator=rng)
    total, t = stage1_loss(inp, out, tgt, mask)
    expected = (0.5 * t["l1"] + 0.05 * t["ssim"] + 0.005 * t["edgediff"] + 0.1 * t["backblur"]
                + 0.005 * t["foreedge"])
    assert total.item() == pytest.approx(expected.item())


# --- WGAN-GP -------------------------------------------------------------------------------------


def linear_critic(weight) -> torch.nn.Conv2d:
    c = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        c.weight.copy_(torch.tensor(weight, dtype=torch.float32).view(1, 3, 1, 1))
        c.bias.zero_()
    return c


def test_wgan_gp_by_hand():
    # Score = mean over the 2x2 patch map of w.x, so d score / d x = w / 4 at each of 4 pixels:
    # gradient norm = |w| / 2. With w = (4,0,0): norm 2, penalty (2 - 1)^2 = 1.
    # Real = ones scores 4, fake = zeros scores 0: D loss = 0 - 4 + 1 = -3 for each critic.
    critics = [linear_critic([4, 0, 0]), linear_critic([4, 0, 0])]
    real, fake = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    loss, terms = critic_loss(critics, real, fake, gp_weight=1.0)
    assert loss.item() == pytest.approx(-3.0)
    assert terms["gp"].item() == pytest.approx(1.0)
    assert terms["wdist"].item() == pytest.approx(4.0)
    # |w| = 2: gradient norm 1, no penalty; the two critics are averaged.
    loss, _ = critic_loss([linear_critic([2, 0, 0]), linear_critic([4, 0, 0])], real, fake)
    assert loss.item() == pytest.approx(((0 - 2 + 0) + (0 - 4 + 1)) / 2)
    assert generator_adversarial_loss(critics, 0.5 * real).item() == pytest.approx(-2.0)


def test_wgan_gp_trains_the_critic_parameters():
    critics = dual_scale_critics(ndf=4)
    real, fake = torch.rand(2, 3, 96, 96), torch.rand(2, 3, 96, 96)
    loss, _ = critic_loss(critics, real, fake)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in critics.parameters())


def test_critics_follow_pix2pix_names_and_fields():
    d3, d5 = dual_scale_critics()
    assert "model.0.weight" in d3.state_dict() and "model.8.weight" in d3.state_dict()
    assert not any("norm" in k or "running" in k for k in d5.state_dict())  # no BatchNorm
    assert d5(torch.zeros(1, 3, 96, 96)).shape == (1, 1, 1, 1)
    assert NLayerDiscriminator.min_size(5) == 96


# --- VGG19 ---------------------------------------------------------------------------------------


def test_vgg19_loads_a_torchvision_style_file(tmp_path):
    ref = VGG19Features().state_dict()
    assert "features.34.weight" in ref and "features.35.weight" not in ref
    state = {k: torch.randn_like(v) for k, v in ref.items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    torch.save(state, tmp_path / "vgg19.pth")
    vgg = load_vgg19_features(tmp_path / "vgg19.pth")
    assert torch.equal(vgg.features[34].weight, state["features.34.weight"])
    assert not any(p.requires_grad for p in vgg.parameters())
    x = torch.rand(1, 3, 32, 32)
    assert vgg_loss(vgg, x, x).item() == 0


def test_vgg19_refuses_random_weights_unless_allowed(tmp_path):
    with pytest.raises(VGGWeightsError, match="--allow-random-vgg"):
        load_vgg19_features(None)
    assert isinstance(load_vgg19_features(None, allow_random=True), VGG19Features)
    with pytest.raises(VGGWeightsError, match="missing.pth"):
        load_vgg19_features(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(VGGWeightsError, match="bad.pth"):
        load_vgg19_features(tmp_path / "bad.pth")


# --- LPIPS ---------------------------------------------------------------------------------------


def write_lpips_files(folder):
    """Random weights in the layouts of torchvision's alexnet and the lpips package's alex.pth."""
    from models.lpips import LPIPS

    torch.manual_seed(0)
    ref = LPIPS()
    alex = {f"features.{k}": torch.randn_like(v) * 0.05
            for k, v in ref.features.state_dict().items()}
    alex["classifier.1.weight"] = torch.zeros(2, 2)
    heads = {f"lin{i}.model.1.weight": torch.rand_like(getattr(ref, f"lin{i}").model[1].weight)
             for i in range(5)}
    torch.save(alex, folder / "alexnet.pth")
    torch.save(heads, folder / "alex.pth")
    return folder / "alex.pth", folder / "alexnet.pth"


def test_lpips_loads_local_weights_and_behaves_like_a_distance(tmp_path):
    from common.errors import UserError
    from models.lpips import load_lpips

    heads, alex = write_lpips_files(tmp_path)
    lpips = load_lpips([alex, heads])
    a = nchw(photo("astronaut", 64))
    b = nchw(gaussian(photo("astronaut", 64), sigma=2, channel_axis=-1))
    assert lpips(a, a).item() == 0
    d_ab, d_ba = lpips(a, b).item(), lpips(b, a).item()
    assert d_ab > 0 and d_ab == pytest.approx(d_ba)
    with pytest.raises(UserError, match="LPIPS needs AlexNet features"):
        load_lpips([heads, heads])  # the AlexNet file is missing its convolutions
