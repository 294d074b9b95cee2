"""validate quality: pairs, metrics, the classical baseline, the table, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.metrics import PSNR_CAP, psnr
from common.metrics import ssim_images as ssim
from validate.cli import main
from validate.quality import (
    LPIPS_UNAVAILABLE,
    classical_render,
    format_table,
    list_pairs,
)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def ebb(photo_dir, tmp_path):
    """Two EBB!-style pairs cut from real photos (the 'bokeh' is a box-blurred copy), plus
    one original with no partner, which is left out."""
    from PIL import ImageFilter

    for sub in ("original", "bokeh"):
        (tmp_path / sub).mkdir()
    for i, name in enumerate(("chelsea", "coffee")):
        img = Image.open(photo_dir / f"{name}.png").convert("RGB").crop((0, 0, 150, 100))
        img.save(tmp_path / "original" / f"{i}.jpg", quality=95)
        img.filter(ImageFilter.BoxBlur(3)).save(tmp_path / "bokeh" / f"{i}.jpg", quality=95)
    Image.new("RGB", (150, 100)).save(tmp_path / "original" / "7.jpg")
    return tmp_path


def test_list_pairs(ebb):
    pairs = list_pairs(ebb)
    assert [(s, o.name, b.name) for s, o, b in pairs] == [("0", "0.jpg", "0.jpg"),
                                                           ("1", "1.jpg", "1.jpg")]
    assert len(list_pairs(ebb, limit=1)) == 1


def test_metrics_and_classical_render(rng):
    a = rng.random((40, 50, 3), dtype=np.float32)
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, np.clip(a + 0.1, 0, 1)) < 21
    assert ssim(a, 1 - a) < 0.5
    flat = np.full((40, 50, 3), 0.3, np.float32)
    mask = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (40, 1))  # far left, near right
    np.testing.assert_allclose(classical_render(flat, mask), flat, atol=1e-5)  # flat stays flat
    out = classical_render(a, mask)
    assert out[:, :10].std() < 0.5 * a[:, :10].std()  # the far side is blurred
    np.testing.assert_allclose(out[:, -2:], a[:, -2:], atol=0.05)  # the focused side is sharp


@pytest.mark.slow
def test_quality_table(fused_export, ebb, tmp_path, capsys):
    import torch

    from models.lpips import LPIPS

    torch.manual_seed(0)  # random weights: this checks the column, not the values
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    torch.save(state, tmp_path / "lpips.pth")  # the official heads are non-negative too
    out, _ = fused_export
    code = main(["quality", "--data", str(ebb), "--tflite", str(out / "bokeh_fp32.tflite"),
                 "--tflite", str(out / "bokeh_fp16.tflite"), "--json", str(tmp_path / "q.json"),
                 "--lpips-weights", str(tmp_path / "lpips.pth")])
    assert code == 0
    text = capsys.readouterr().out
    assert "| Model | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |" in text
    assert "LPIPS: AlexNet v0.1 from" in text and "n/a" not in text
    result = json.loads((tmp_path / "q.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["Identity (input)", "Classical (thin-lens)", "PyTorch (random weights)",
                          "TFLite bokeh_fp32.tflite", "TFLite bokeh_fp16.tflite"]
    assert result["pairs"] == 2 and all(len(r["per_pair"]) == 2 for r in rows.values())
    assert rows["Identity (input)"]["psnr"] > 20  # a box blur is close to its input
    pytorch = rows["PyTorch (random weights)"]
    assert abs(rows["TFLite bokeh_fp32.tflite"]["psnr"] - pytorch["psnr"]) < 0.05
    assert abs(rows["TFLite bokeh_fp16.tflite"]["ssim"] - pytorch["ssim"]) < 0.01
    assert all(f"| {name} |" in text for name in rows)
    assert all(r["lpips"] > 0 and "lpips" in r["per_pair"][0] for r in rows.values())


def test_table_without_lpips():
    result = {"data": "d", "pairs": 1, "resized_originals": 0, "lpips": LPIPS_UNAVAILABLE,
              "rows": [{"model": "Identity (input)", "psnr": 23.456, "ssim": 0.81234,
                        "lpips": None}]}
    text = format_table(result)
    assert "| Identity (input) | 23.46 | 0.8123 | n/a |" in text
    assert text.endswith("LPIPS: unavailable (no --lpips-weights)")


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("gray", "is L, not a colour photo"),
    ("rgba", "has an alpha channel"),
    ("corrupt", "not a readable image"),
])
def test_bad_pair_files(fused_export, ebb, capsys, kind, message):
    path = ebb / "bokeh" / "1.png"
    (ebb / "bokeh" / "1.jpg").unlink()
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    else:
        Image.new({"gray": "L", "rgba": "RGBA"}[kind], (150, 100)).save(path)
    out, _ = fused_export
    assert main(["quality", "--data", str(ebb), "--tflite",
                 str(out / "bokeh_fp32.tflite")]) == 2
    line = _error_line(capsys)
    assert "bokeh/1.png" in line and message in line


def test_bad_folders_and_options(ebb, tmp_path, capsys):
    assert main(["quality", "--data", str(ebb), "--lpips-weights", str(tmp_path / "a.pth")]) == 2
    assert "a.pth: no such LPIPS weights file" in _error_line(capsys)
    assert main(["quality", "--data", str(ebb)]) == 2
    assert "nothing to score" in _error_line(capsys)
    assert main(["quality", "--data", str(tmp_path / "nope"), "--checkpoint", "x"]) == 2
    assert "no 'original/' folder" in _error_line(capsys)
    for p in (ebb / "bokeh").iterdir():
        p.rename(p.with_name("b" + p.name))
    assert main(["quality", "--data", str(ebb), "--checkpoint", "x"]) == 2
    assert "no pairs" in _error_line(capsys)
