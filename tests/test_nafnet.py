"""NAFNet: the paper's size, official state-dict layout and math, any input size, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.nafnet import (
    PAPER_CONFIG,
    CheckpointError,
    NAFNet,
    load_nafnet,
    randomize_residual_scales,
)

SMALL = dict(in_channels=3, out_channels=3, width=8, enc_blocks=(1, 1), middle_blocks=1,
             dec_blocks=(1, 1))


def test_paper_config_has_1_047_891_parameters():
    model = NAFNet(**PAPER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 1_047_891


# An independent functional NAFNet written from the official architecture description, reading
# weights by their official state-dict names. If our module names or op order differ from the
# official network, this either raises KeyError or disagrees numerically.
def _official_layernorm(x, weight, bias, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return weight.view(1, -1, 1, 1) * (x - mu) / (var + eps).sqrt() + bias.view(1, -1, 1, 1)


def _official_block(sd, p, inp):
    c2 = sd[f"{p}conv2.weight"].shape[0]
    x = _official_layernorm(inp, sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"])
    x = F.conv2d(x, sd[f"{p}conv1.weight"], sd[f"{p}conv1.bias"])
    x = F.conv2d(x, sd[f"{p}conv2.weight"], sd[f"{p}conv2.bias"], padding=1, groups=c2)
    x = x[:, : c2 // 2] * x[:, c2 // 2 :]
    att = F.conv2d(F.adaptive_avg_pool2d(x, 1), sd[f"{p}sca.1.weight"], sd[f"{p}sca.1.bias"])
    x = F.conv2d(x * att, sd[f"{p}conv3.weight"], sd[f"{p}conv3.bias"])
    y = inp + x * sd[f"{p}beta"]
    x = _official_layernorm(y, sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"])
    x = F.conv2d(x, sd[f"{p}conv4.weight"], sd[f"{p}conv4.bias"])
    half = x.shape[1] // 2
    x = F.conv2d(x[:, :half] * x[:, half:], sd[f"{p}conv5.weight"], sd[f"{p}conv5.bias"])
    return y + x * sd[f"{p}gamma"]


def _official_forward(sd, cfg, inp):
    h, w = inp.shape[-2:]
    m = 2 ** len(cfg["enc_blocks"])
    inp = F.pad(inp, (0, (m - w % m) % m, 0, (m - h % m) % m))
    x = F.conv2d(inp, sd["intro.weight"], sd["intro.bias"], padding=1)
    skips = []
    for lvl, n in enumerate(cfg["enc_blocks"]):
        for b in range(n):
            x = _official_block(sd, f"encoders.{lvl}.{b}.", x)
        skips.append(x)
        x = F.conv2d(x, sd[f"downs.{lvl}.weight"], sd[f"downs.{lvl}.bias"], stride=2)
    for b in range(cfg["middle_blocks"]):
        x = _official_block(sd, f"middle_blks.{b}.", x)
    for lvl, n in enumerate(cfg["dec_blocks"]):
        x = F.pixel_shuffle(F.conv2d(x, sd[f"ups.{lvl}.0.weight"]), 2) + skips[-1 - lvl]
        for b in range(n):
            x = _official_block(sd, f"decoders.{lvl}.{b}.", x)
    x = F.conv2d(x, sd["ending.weight"], sd["ending.bias"], padding=1)
    return (x + inp[:, : x.shape[1]])[..., :h, :w]


@pytest.mark.parametrize("size", [(32, 48), (37, 53), (17, 90)])
def test_official_layout_loads_strictly_and_matches_official_math(size, tmp_path):
    torch.manual_seed(0)
    source = randomize_residual_scales(NAFNet(**SMALL), seed=3, std=0.3)
    official_sd = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "official.pth"
    torch.save({"params": official_sd}, path)  # the official release wraps weights in "params"
    model = load_nafnet(path, SMALL)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        ours, theirs = model(x), _official_forward(official_sd, SMALL, x)
    assert ours.shape == (2, 3, *size)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    # the blocks really contribute (beta/gamma non-zero), so the comparison above covers them
    zeroed = {k: v * 0 if k.endswith(("beta", "gamma")) else v for k, v in official_sd.items()}
    assert (theirs - _official_forward(zeroed, SMALL, x)).abs().max() > 1e-3


def test_paper_config_official_width32_layout_loads(tmp_path):
    """NAFNet-width32 for deblurring (official GoPro config) loads strictly into our module."""
    cfg = dict(in_channels=3, out_channels=3, width=32, enc_blocks=(1, 1, 1, 28),
               middle_blocks=1, dec_blocks=(1, 1, 1, 1))
    sd = NAFNet(**cfg).state_dict()
    torch.save({"params": sd}, tmp_path / "w32.pth")
    assert load_nafnet(tmp_path / "w32.pth", cfg).config["width"] == 32


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"params_ema": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd, "step": 3},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
])
def test_checkpoint_wrappers(wrap, tmp_path):
    torch.manual_seed(5)
    sd = {k: torch.randn_like(v) for k, v in NAFNet(**SMALL).state_dict().items()}
    torch.save(wrap(sd), tmp_path / "c.pth")
    loaded = load_nafnet(tmp_path / "c.pth", SMALL).state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)  # the weights, not a fresh init


def test_params_ema_wins_over_params(tmp_path):
    """BasicSR checkpoints hold both; the EMA weights are the ones NAFNet's authors evaluate."""
    torch.manual_seed(6)
    ema = {k: torch.randn_like(v) for k, v in NAFNet(**SMALL).state_dict().items()}
    raw = {k: torch.randn_like(v) for k, v in ema.items()}
    torch.save({"params": raw, "params_ema": ema}, tmp_path / "both.pth")
    loaded = load_nafnet(tmp_path / "both.pth", SMALL).state_dict()
    assert torch.equal(loaded["intro.weight"], ema["intro.weight"])
    assert not torch.equal(loaded["intro.weight"], raw["intro.weight"])


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_nafnet(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable"):
        load_nafnet(tmp_path / "junk.pth")
    sd = NAFNet(**SMALL).state_dict()
    sd["extra.weight"] = sd.pop("intro.weight")
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['intro.weight'\].*extra.weight"):
        load_nafnet(tmp_path / "keys.pth", SMALL)
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "nowrap.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_nafnet(tmp_path / "nowrap.pth")


def test_config_is_read_from_checkpoint(tmp_path):
    sd = NAFNet(**SMALL).state_dict()
    torch.save({"model": sd, "nafnet_config": SMALL}, tmp_path / "trained.pth")
    assert load_nafnet(tmp_path / "trained.pth").config["enc_blocks"] == (1, 1)
