"""Bad input gets one clear line naming the file and exit 2, never a traceback or a half-file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.nafnet import NAFNet
from tools.cli import export_main
from validate.cli import main as validate_main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_export_missing_checkpoint(tmp_path, capsys):
    code = export_main(["--export-dir", str(tmp_path / "o"), "--height", "32", "--width", "32",
                        "--checkpoint", str(tmp_path / "nope.pth")])
    assert code == 2
    assert "nope.pth: no such checkpoint file" in _error_line(capsys)
    assert not list((tmp_path / "o").iterdir())


def test_export_checkpoint_with_wrong_keys(tmp_path, capsys):
    sd = NAFNet(in_channels=3, out_channels=3, width=16).state_dict()
    torch.save(sd, tmp_path / "wide.pth")
    code = export_main(["--export-dir", str(tmp_path / "o"), "--height", "32", "--width", "32",
                        "--checkpoint", str(tmp_path / "wide.pth")])
    assert code == 2
    assert "wide.pth: shapes do not fit NAFNet" in _error_line(capsys)


def test_export_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = export_main(["--export-dir", str(blocker / "sub"), "--height", "32", "--width", "32"])
    assert code == 2
    assert "output folder is not writable" in _error_line(capsys)


def test_export_rejects_unknown_variant_and_opset(tmp_path, capsys):
    assert export_main(["--export-dir", str(tmp_path), "--variants", "int3"]) == 2
    assert "unknown variant 'int3'" in _error_line(capsys)
    assert export_main(["--export-dir", str(tmp_path), "--height", "32", "--width", "32",
                        "--opset", "9"]) == 2
    assert "opset 9" in _error_line(capsys)


def test_parity_missing_tflite(tmp_path, capsys):
    assert validate_main(["parity", "--tflite", str(tmp_path / "x.tflite")]) == 2
    assert "x.tflite: no such TFLite file" in _error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable image"),
    ("gray", "is L, not a colour photo"),
    ("rgba", "has an alpha channel"),
])
def test_parity_bad_images(nafnet_export, tmp_path, capsys, kind, message):
    folder = tmp_path / kind
    folder.mkdir()
    path = folder / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    else:
        mode = {"gray": "L", "rgba": "RGBA"}[kind]
        Image.fromarray(np.zeros((40, 40, len(mode)), np.uint8).squeeze()).convert(mode).save(path)
    out, _ = nafnet_export
    code = validate_main(["parity", "--tflite", str(out / "nafnet_fp32.tflite"),
                          "--images", str(folder)])
    assert code == 2
    line = _error_line(capsys)
    assert f"{kind}.png" in line and message in line


@pytest.mark.slow
def test_parity_empty_image_folder(nafnet_export, tmp_path, capsys):
    out, _ = nafnet_export
    code = validate_main(["parity", "--tflite", str(out / "nafnet_fp32.tflite"),
                          "--images", str(tmp_path)])
    assert code == 2
    assert "no images" in _error_line(capsys)


@pytest.mark.slow
def test_parity_wrong_checkpoint_exit_1_and_json(nafnet_export, tmp_path, capsys):
    from models.nafnet import PAPER_CONFIG, random_nafnet

    torch.save(random_nafnet(PAPER_CONFIG, seed=9).state_dict(), tmp_path / "other.pth")
    out, _ = nafnet_export
    code = validate_main(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--checkpoint",
                          str(tmp_path / "other.pth"), "--num-random", "1",
                          "--json", str(tmp_path / "r.json")])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    assert (tmp_path / "r.json").is_file()
