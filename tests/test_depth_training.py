"""One depth net from training to phone (issue 20): the cache records its net, the trainer
refuses another, the checkpoint records it, the export fuses it without a flag and refuses
another net in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from models.depth import load_depth_model
from train import trainer
from train.depth_cache import RECORD
from train.depth_cache import main as cache_main

TINY_NAFNET = '{"width": 4, "enc_blocks": [1], "middle_blocks": 1, "dec_blocks": [1]}'


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three photo pairs, a midas-small-tiny weights file, its cache, a 2-step NAFNet."""
    root = tmp_path_factory.mktemp("depth_training")
    rng = np.random.default_rng(0)
    for folder in ("input", "target"):
        (root / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(
                root / folder / f"{i}.png")
    weights = root / "midas_tiny.pt"
    torch.save(load_depth_model("midas-small-tiny", seed=3).state_dict(), weights)
    assert cache_main(["--depth", "midas-small-tiny", "--depth-weights", str(weights),
                       "--images", str(root / "input"), "--out", str(root / "cache"),
                       "--no-progress"]) == 0
    args = ["--data", "folders", "--input-dir", str(root / "input"), "--target-dir",
            str(root / "target"), "--depth-dir", str(root / "cache"), "--crop", "16",
            "--batch-size", "2", "--epochs1", "1", "--epochs2", "0", "--nafnet-config",
            TINY_NAFNET, "--out", str(root / "run"), "--no-tensorboard", "--no-progress",
            "--samples", "1", "--device", "cpu"]
    assert trainer.main([*args, "--depth", "midas-small-tiny", "--max-steps", "2"]) == 0
    return root, weights, args


def test_cache_records_its_net_and_refuses_another(trained, capsys):
    root, weights, _ = trained
    record = json.loads((root / "cache" / RECORD).read_text())["depth"]
    assert record["name"] == "midas-small-tiny" and record["short_side"] == 256
    assert len(record["weights_sha256"]) == 64 and record["random_seed"] is None
    assert len(list((root / "cache").glob("*.png"))) == 3
    capsys.readouterr()
    assert cache_main(["--depth", "dpt-tiny", "--images", str(root / "input"), "--out",
                       str(root / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "midas-small-tiny" in err and "dpt-tiny" in err


def test_cache_mask_is_the_fused_graphs_mask(trained):
    """The cached PNG is the reference pipeline's mask (models.pipeline.depth_mask)."""
    from models.depth import depth_input_size
    from models.pipeline import depth_mask

    root, weights, _ = trained
    photo = np.asarray(Image.open(root / "input" / "0.png"), np.float32) / 255
    net = load_depth_model("midas-small-tiny", weights)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        want = depth_mask(net, torch.from_numpy(photo.transpose(2, 0, 1))[None],
                          depth_input_size("midas-small-tiny", 64, 96), mean, std)[0, 0].numpy()
    cached = np.asarray(Image.open(root / "cache" / "0.png"), np.float64) / 65535
    assert np.abs(cached - want).max() < 1e-4


def test_trainer_records_the_cache_net_and_refuses_another(trained, capsys):
    root, _, args = trained
    capsys.readouterr()
    assert trainer.main([*args, "--depth", "dpt-tiny", "--out", str(root / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "midas-small-tiny" in err and "dpt-tiny" in err
    assert not (root / "run2" / "nafnet.pt").exists()
    saved = torch.load(root / "run" / "nafnet.pt", weights_only=True)
    assert saved["depth"]["name"] == "midas-small-tiny"
    assert saved["depth"]["weights_sha256"] == json.loads(
        (root / "cache" / RECORD).read_text())["depth"]["weights_sha256"]


def test_export_refuses_another_net_in_one_line(trained, tmp_path, capsys):
    from tools.cli import export_main

    root, _, _ = trained
    ckpt = root / "run" / "nafnet.pt"
    capsys.readouterr()
    assert export_main(["--checkpoint", str(ckpt), "--depth", "dpt-tiny", "--height", "64",
                        "--width", "96", "--export-dir", str(tmp_path / "x"),
                        "--quant-variants", "", "--no-gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "midas-small-tiny" in err and "dpt-tiny" in err
    assert "--allow-depth-mismatch" in err


def test_mismatch_allowed_is_said(trained, tmp_path):
    from export.pipeline import follow_checkpoint, load_generator

    root, _, _ = trained
    other = tmp_path / "other.pt"  # the same net, other weights
    torch.save(load_depth_model("midas-small-tiny", seed=4).state_dict(), other)
    _, weights = load_generator(root / "run" / "nafnet.pt")
    warnings: list[str] = []
    name, _, _ = follow_checkpoint(weights, "dpt-tiny", None, None, 0, True, warnings)
    assert name == "dpt-tiny" and "DEPTH MISMATCH" in warnings[0]
    with pytest.raises(UserError, match="trained on masks of midas-small-tiny.*other.pt"):
        follow_checkpoint(weights, None, other, None, 0, False, [])


@pytest.mark.slow
def test_export_follows_the_checkpoint_without_a_flag(trained, tmp_path):
    from export.pipeline import ExportOptions, export

    root, weights, _ = trained
    report = export(ExportOptions(tmp_path / "e", 64, 96, checkpoint=root / "run" / "nafnet.pt",
                                  variants=("fp32",), gpu_check=False), echo=lambda s: None)
    manifest = json.loads((tmp_path / "e" / "bokeh_fp32.manifest.json").read_text())
    assert manifest["depth"]["name"] == "midas-small-tiny"
    assert manifest["depth"]["checkpoint"] == str(weights.resolve())
    assert manifest["weights"]["trained_with_depth"]["name"] == "midas-small-tiny"
    assert report["depth"]["input_size"] == [256, 384]
    text = (tmp_path / "e" / "report.txt").read_text()
    assert "NAFNet trained on masks of: midas-small-tiny" in text
