"""tools.render: photos of any size through the fused TFLite model or PyTorch, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.images import letterbox, unletterbox
from tools.render import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return img.size


def test_letterbox_round_trip():
    """Scaled to fit, reflect-padded, and back: a smooth photo comes back nearly unchanged."""
    y, x = np.mgrid[0:90, 0:300].astype(np.float32)
    photo = np.stack([x / 300, y / 90, 0.5 + 0 * x], axis=-1)
    canvas, where = letterbox(photo, 64, 96)
    assert canvas.shape == (64, 96, 3) and (where.height, where.width) == (29, 96)
    assert (where.top, where.left) == (17, 0)
    back = unletterbox(canvas, where)
    assert back.shape == photo.shape and np.abs(back - photo).max() < 0.02
    # reflect padding: the rows above the photo mirror its first rows
    np.testing.assert_allclose(canvas[where.top - 1], canvas[where.top + 1])


@pytest.mark.slow
def test_tflite_render_with_compare(fused_export, photo_dir, tmp_path, capsys):
    out, _ = fused_export
    thin = tmp_path / "in" / "thin.png"
    thin.parent.mkdir()
    Image.fromarray(np.full((20, 301, 3), 120, np.uint8)).save(thin)
    dest = tmp_path / "out"
    code = main([str(photo_dir / "chelsea.png"), str(photo_dir / "coffee.png"), str(thin),
                 "--tflite", str(out / "bokeh_fp32.tflite"), "--compare", "--out", str(dest),
                 "--panel-height", "120"])
    assert code == 0
    text = capsys.readouterr().out
    assert "WARNING: NO CHECKPOINT GIVEN" in text and "chelsea.png (451x300 -> 96x64" in text
    for name, size in (("chelsea", (451, 300)), ("coffee", (600, 400)), ("thin", (301, 20))):
        assert _size(dest / f"{name}_bokeh.png") == size
    width, height = _size(dest / "chelsea_compare.png")
    assert height > 120 and width > 3 * 451 * 120 / 300  # three panels, caption strip on top
    assert (dest / "thin_compare.png").is_file()
    # The other interpreter renders the same picture (8-bit PNGs, up to one level apart)
    again = tmp_path / "again"
    assert main([str(photo_dir / "chelsea.png"), "--tflite", str(out / "bokeh_fp32.tflite"),
                 "--runtime", "tensorflow", "--out", str(again)]) == 0
    a, b = (np.asarray(Image.open(d / "chelsea_bokeh.png"), np.int16) for d in (dest, again))
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_refuses_nafnet_alone_and_corrupt_tflite(fused_export, photo_dir, tmp_path, capsys):
    out, _ = fused_export
    photo = str(photo_dir / "chelsea.png")
    assert main([photo, "--tflite", str(out / "nafnet_fp32.tflite"), "--out",
                 str(tmp_path)]) == 2
    assert "is NAFNet alone (photo + depth mask in)" in _error_line(capsys)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    assert main([photo, "--tflite", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.tflite: not a readable TFLite model" in _error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("missing", "no such image file"),
    ("corrupt", "not a readable image"),
    ("gray", "is L, not a colour photo"),
    ("rgba", "has an alpha channel"),
])
def test_bad_photos(fused_export, photo_dir, tmp_path, capsys, kind, message):
    path = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif kind != "missing":
        mode = {"gray": "L", "rgba": "RGBA"}[kind]
        Image.new(mode, (40, 30)).save(path)
    out, _ = fused_export
    dest = tmp_path / "out"
    code = main([str(photo_dir / "chelsea.png"), str(path), "--tflite",
                 str(out / "bokeh_fp32.tflite"), "--out", str(dest)])
    assert code == 2
    line = _error_line(capsys)
    assert f"{kind}.png" in line and message in line
    assert not dest.exists()  # checked before any rendering


def test_pytorch_needs_real_depth_unless_allowed(photo_dir, tmp_path, capsys):
    from models.nafnet import PAPER_CONFIG, random_nafnet

    ckpt = tmp_path / "g.pth"
    torch.save(random_nafnet(PAPER_CONFIG, seed=3).state_dict(), ckpt)
    photo = str(photo_dir / "chelsea.png")
    assert main([photo, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint needs --depth-weights" in _error_line(capsys)
    code = main([photo, "--checkpoint", str(ckpt), "--allow-random-depth", "--size", "64x96",
                 "--compare", "--out", str(tmp_path / "o")])
    assert code == 0
    assert "RANDOM depth net" in capsys.readouterr().out
    assert _size(tmp_path / "o" / "chelsea_bokeh.png") == (451, 300)
    assert (tmp_path / "o" / "chelsea_compare.png").is_file()
    assert main([photo, "--checkpoint", str(tmp_path / "nope.pth"), "--allow-random-depth",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.pth: no such checkpoint file" in _error_line(capsys)
