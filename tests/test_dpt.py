"""PyTorch DPT: official sizes and state-dict layout, input sizes, strict checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from common.errors import CheckpointError
from models.dpt import (
    DPT,
    HYBRID_CONFIG,
    LARGE_CONFIG,
    dpt_input_size,
    random_dpt,
    resize_pos_embed,
    tiny_dpt_config,
)
from models.nafnet import random_nafnet


def _meta_state(config):
    """Shapes of a full-size model without allocating its weights."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DPT(config).state_dict().items()}


def test_hybrid_has_123_146_985_parameters():
    with torch.device("meta"):
        model = DPT(HYBRID_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 123_146_985


def test_large_has_344m_parameters():
    with torch.device("meta"):
        model = DPT(LARGE_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 344_055_465


def test_hybrid_official_keys():
    state = _meta_state(HYBRID_CONFIG)
    bb = "pretrained.model.patch_embed.backbone"
    assert state["pretrained.model.pos_embed"] == (1, 577, 768)
    assert state["pretrained.model.cls_token"] == (1, 1, 768)
    assert state[f"{bb}.stem.conv.weight"] == (64, 3, 7, 7)
    assert state[f"{bb}.stem.norm.weight"] == (64,)
    assert state[f"{bb}.stages.0.blocks.0.downsample.conv.weight"] == (256, 64, 1, 1)
    assert state[f"{bb}.stages.2.blocks.8.conv3.weight"] == (1024, 256, 1, 1)
    assert f"{bb}.stages.2.blocks.9.conv1.weight" not in state
    assert state["pretrained.model.patch_embed.proj.weight"] == (768, 1024, 1, 1)
    assert state["pretrained.model.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert state["pretrained.model.head.weight"] == (1000, 768)
    assert state["pretrained.act_postprocess3.0.project.0.weight"] == (768, 1536)
    assert state["pretrained.act_postprocess3.3.weight"] == (768, 768, 1, 1)
    assert state["pretrained.act_postprocess4.4.weight"] == (768, 768, 3, 3)
    assert not any(k.startswith(("pretrained.act_postprocess1", "pretrained.act_postprocess2"))
                   for k in state)
    assert state["scratch.layer1_rn.weight"] == (256, 256, 3, 3)
    assert "scratch.layer1_rn.bias" not in state
    assert state["scratch.refinenet4.resConfUnit1.conv1.weight"] == (256, 256, 3, 3)
    assert state["scratch.output_conv.0.weight"] == (128, 256, 3, 3)
    assert state["scratch.output_conv.2.weight"] == (32, 128, 3, 3)
    assert state["scratch.output_conv.4.weight"] == (1, 32, 1, 1)
    assert all(k.startswith(("pretrained.model.", "pretrained.act_postprocess", "scratch."))
               for k in state)


def test_large_official_keys():
    state = _meta_state(LARGE_CONFIG)
    assert state["pretrained.model.patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert state["pretrained.model.blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert state["pretrained.act_postprocess1.4.weight"] == (256, 256, 4, 4)  # ConvTranspose
    assert state["pretrained.act_postprocess2.4.weight"] == (512, 512, 2, 2)
    assert state["pretrained.act_postprocess4.4.weight"] == (1024, 1024, 3, 3)
    assert state["scratch.layer4_rn.weight"] == (256, 1024, 3, 3)


@pytest.mark.parametrize(("size", "expected"), [
    ((1024, 1536), (384, 576)), ((1536, 1024), (576, 384)), ((384, 384), (384, 384)),
    ((480, 640), (384, 512)), ((3000, 4000), (384, 512)), ((100, 1000), (384, 3840)),
])
def test_dpt_input_size(size, expected):
    assert dpt_input_size(*size) == expected


def test_pos_embed_resize_keeps_class_token_and_identity_size():
    pos = torch.randn(1, 1 + 9, 4)
    assert torch.equal(resize_pos_embed(pos, 3, 3), pos)
    out = resize_pos_embed(pos, 4, 6)
    assert out.shape == (1, 1 + 24, 4) and torch.equal(out[:, 0], pos[:, 0])


@pytest.mark.parametrize("variant", ["hybrid", "large"])
def test_forward_shape_and_random_output_not_degenerate(variant):
    model = random_dpt(tiny_dpt_config(variant), seed=0)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 64, 96)
    assert (y > 0).float().mean() > 0.5
    assert y.std() > 1e-3 * y.abs().max()
    assert not torch.equal(y[0], y[1])


def test_input_size_must_be_multiple_of_32():
    model = random_dpt(tiny_dpt_config(), seed=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 64, 80))


def test_random_dpt_is_deterministic():
    a = random_dpt(tiny_dpt_config(), seed=3).state_dict()
    b = random_dpt(tiny_dpt_config(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["hybrid", "large"])
@pytest.mark.parametrize("wrap", ["raw", "midas_training", "dataparallel"])
def test_strict_load_round_trip(tmp_path, variant, wrap):
    cfg = tiny_dpt_config(variant)
    model = random_dpt(cfg, seed=1)
    state = model.state_dict()
    if wrap == "midas_training":  # MiDaS BaseModel.load accepts {"model", "optimizer"}
        state = {"model": state, "optimizer": {"state": {}}}
    elif wrap == "dataparallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "dpt.pt"
    torch.save(state, path)
    loaded = DPT.from_midas_checkpoint(path, cfg)
    assert loaded.config.variant == variant and not loaded.training
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "dpt_hybrid_384.pt"
    path.write_bytes(b"\x80\x02not really a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="dpt_hybrid_384.pt.*not a readable PyTorch"):
        DPT.from_midas_checkpoint(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        DPT.from_midas_checkpoint(tmp_path / "absent.pt")


def test_nafnet_checkpoint_is_rejected_by_name(tmp_path):
    path = tmp_path / "nafnet.pt"
    torch.save(random_nafnet(dict(in_channels=4, out_channels=3, width=8, enc_blocks=(1,),
                                  middle_blocks=1, dec_blocks=(1,))).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a MiDaS v3.0 DPT checkpoint.*DPT-Hybrid"):
        DPT.from_midas_checkpoint(path)


def test_hybrid_file_with_large_config_is_rejected(tmp_path):
    path = tmp_path / "dpt.pt"
    torch.save(random_dpt(tiny_dpt_config("hybrid")).state_dict(), path)
    with pytest.raises(CheckpointError, match="DPT-Hybrid checkpoint but a DPT-Large config"):
        DPT.from_midas_checkpoint(path, tiny_dpt_config("large"))


def test_tiny_file_does_not_fit_the_official_config(tmp_path):
    path = tmp_path / "dpt.pt"
    torch.save(random_dpt(tiny_dpt_config("large")).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit MiDaS DPT-Large"):
        DPT.from_midas_checkpoint(path)


def test_truncated_state_dict_names_missing_keys(tmp_path):
    cfg = tiny_dpt_config()
    state = random_dpt(cfg).state_dict()
    del state["scratch.output_conv.4.weight"]
    path = tmp_path / "dpt.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 missing keys.*scratch.output_conv.4.weight"):
        DPT.from_midas_checkpoint(path, cfg)
