"""Calibration data: deterministic, shaped like the fused model's input, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calibration.dataset import (
    CALIBRATION_PHOTOS,
    HELD_OUT_PHOTOS,
    calibration_samples,
    calibration_set,
    held_out_images,
    representative_dataset,
)
from common.errors import UserError


def test_embedded_samples_are_deterministic_photo_inputs():
    first = calibration_samples(32, 48, 9)
    again = calibration_samples(32, 48, 9)
    assert [label for label, _ in first] == [label for label, _ in again]
    for (_, x), (_, y) in zip(first, again, strict=True):
        assert x.shape == (1, 32, 48, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_array_equal(x, y)
    labels = [label for label, _ in first]
    assert any(lb.startswith("skimage:") for lb in labels)
    assert any(lb.startswith("synthetic:") for lb in labels)
    assert len({x.tobytes() for _, x in first}) == 9  # crops and flips, not repeats


def test_representative_dataset_yields_fresh_generators():
    dataset = representative_dataset(16, 24, 3)
    a, b = list(dataset()), list(dataset())
    assert len(a) == 3 and all(len(item) == 1 for item in a)
    np.testing.assert_array_equal(a[2][0], b[2][0])


def test_held_out_photos_never_calibrate():
    scenes = {name.split(":")[0] for name in CALIBRATION_PHOTOS}
    assert scenes.isdisjoint(HELD_OUT_PHOTOS)
    record = calibration_set(16, 24, 8).record
    assert not any(h in s for s in record["sources"] for h in HELD_OUT_PHOTOS)
    held = held_out_images(16, 24)
    assert [label for label, _ in held] == [f"skimage:{n}" for n in HELD_OUT_PHOTOS]
    assert all(x.shape == (1, 16, 24, 3) for _, x in held)


def test_folder_samples_in_sorted_order_fill_up_with_crops(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / name)
    samples = calibration_samples(16, 24, 5, calib_dir=tmp_path)
    assert [label for label, _ in samples] == ["a.jpg#0", "b.png#0", "a.jpg#1", "b.png#1",
                                               "a.jpg#2"]
    assert calibration_set(16, 24, 5, tmp_path).record["source"] == str(tmp_path)


def test_empty_calibration_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    with pytest.raises(UserError, match=f"{tmp_path}.*no images"):
        calibration_samples(16, 24, 4, calib_dir=tmp_path)


def test_folder_without_readable_images_is_a_clear_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(UserError, match=f"{tmp_path}: none of its 2 image files"):
        calibration_samples(16, 24, 4, calib_dir=tmp_path)


def test_unreadable_files_are_skipped_when_others_load(tmp_path):
    (tmp_path / "a_broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(tmp_path / "b.png")
    labels = [label for label, _ in calibration_samples(16, 24, 2, calib_dir=tmp_path)]
    assert labels == ["b.png#0", "b.png#1"]


def test_export_cli_rejects_empty_calibration_folder_before_exporting(tmp_path, capsys):
    from tools.cli import export_main as main

    empty = tmp_path / "calib"
    empty.mkdir()
    code = main(["--export-dir", str(tmp_path / "out"), "--height", "64", "--width", "96",
                 "--depth", "dpt-tiny", "--depth-short-side", "64", "--calib-dir", str(empty)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no images" in err
    assert not list((tmp_path / "out").glob("*.onnx"))


def test_export_rejects_unknown_quantized_variant(tmp_path, capsys):
    from tools.cli import export_main as main

    assert main(["--export-dir", str(tmp_path), "--quant-variants", "int4"]) == 2
    assert "int4" in capsys.readouterr().err
