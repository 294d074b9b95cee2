"""Bad input and faults: nothing deleted, nothing crashes, no false PASS, no mixed export folder.

Every command a user can reach with a bad value ends in one line `<command>: error: <what>` and
exit 2, never a traceback or a signal.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from tools.cli import main as bokeh


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    return lines[-1]


# --- the atomic writer never deletes what it did not write -----------------------------------


@pytest.mark.slow
def test_parity_json_onto_a_folder_is_refused_and_the_folder_kept(nafnet_export, tmp_path,
                                                                   capsys):
    out, _ = nafnet_export
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--json", str(keep)])
    assert code == 2
    assert "is a folder" in _one_error_line(capsys, "bokeh parity")
    assert (keep / "precious.txt").read_text() == "mine"


def test_atomic_path_replaces_only_folders_it_wrote(tmp_path):
    from common.files import atomic_path, write_bytes

    user = tmp_path / "user_folder"
    user.mkdir()
    with pytest.raises(UserError, match="did not write"), atomic_path(user) as tmp:
        tmp.mkdir()
    with pytest.raises(UserError, match="is a folder"):
        write_bytes(user, b"x")
    ours = tmp_path / "ours"
    for content in (b"1", b"2"):  # a folder we published twice: replaced
        with atomic_path(ours) as tmp:
            tmp.mkdir()
            (tmp / "f").write_bytes(content)
    assert (ours / "f").read_bytes() == b"2" and user.is_dir()


# --- corrupt models are refused before an interpreter touches them ---------------------------


@pytest.fixture(scope="module")
def truncated(nafnet_export, tmp_path_factory):
    """A copy of the export whose fp32 files are cut in half (manifests intact)."""
    out, _ = nafnet_export
    folder = tmp_path_factory.mktemp("truncated")
    for name in ("bokeh_fp32.tflite", "bokeh_fp32.manifest.json"):
        shutil.copy(out / name, folder / name)
    data = (out / "bokeh_fp32.tflite").read_bytes()
    (folder / "bokeh_fp32.tflite").write_bytes(data[: len(data) // 2])
    return folder / "bokeh_fp32.tflite"


@pytest.mark.slow
@pytest.mark.parametrize("verb, argv", [
    ("inspect", ["{m}"]),
    ("parity", ["--tflite", "{m}", "--tflite-only"]),
    ("render", ["{photo}", "--tflite", "{m}", "--out", "{tmp}/r"]),
    ("ai-benchmark", ["--tflite", "{m}", "--variant", "fp32", "--out", "{tmp}/b"]),
    ("profile", ["--tflite", "{m}"]),
])
def test_truncated_tflite_is_one_line_not_a_crash(truncated, photo_dir, tmp_path, capsys, verb,
                                                  argv):
    argv = [a.format(m=truncated, photo=photo_dir / "coffee.png", tmp=tmp_path) for a in argv]
    assert bokeh([verb, *argv]) == 2
    line = _one_error_line(capsys, f"bokeh {verb}")
    assert "bokeh_fp32.tflite" in line and "not a readable TFLite model" in line


# --- parity: nothing compared is never a PASS; a bad manifest is bad input (2), not a FAIL ---


@pytest.mark.slow
@pytest.mark.parametrize("count", ["0", "-3"])
def test_parity_with_nothing_to_compare_is_exit_2(nafnet_export, capsys, count):
    out, _ = nafnet_export
    report = json.loads((out / "report.json").read_text())
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--num-random", count])
    assert code == 2
    assert "--num-random" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text()) == report  # nothing recorded


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    (lambda m: m["inputs"][0].update(shape=[1, 8, 8, 4]), "do not match"),
    (lambda m: m.pop("tolerance"), "no 'tolerance'"),
    (lambda m: m.update(tolerance=None), "no 'tolerance'"),
    (lambda m: m.update(tolerance={"output": {"atol": "tiny"}}), "finite"),
    (lambda m: m.update(tolerance={"bokeh": {"atol": 1e-3}}), "not an output"),
])
def test_a_manifest_that_does_not_fit_its_file_is_exit_2(nafnet_export, tmp_path, capsys, edit,
                                                         message):
    out, _ = nafnet_export
    shutil.copy(out / "nafnet_fp32.tflite", tmp_path / "nafnet_fp32.tflite")
    manifest = json.loads((out / "nafnet_fp32.manifest.json").read_text())
    edit(manifest)
    (tmp_path / "nafnet_fp32.manifest.json").write_text(json.dumps(manifest))
    assert bokeh(["parity", "--tflite", str(tmp_path / "nafnet_fp32.tflite")]) == 2
    assert message in _one_error_line(capsys, "bokeh parity")


# --- an export run owns its folder ---------------------------------------------------------


def test_export_refuses_sizes_it_cannot_take_up_front(tmp_path, capsys):
    assert bokeh(["export", "--export-dir", str(tmp_path / "o"), "--height", "1000",
                  "--width", "1500"]) == 2
    line = _one_error_line(capsys, "bokeh export")
    assert "multiples of 16" in line and "992x1504" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_used_or_foreign_folder_is_refused_and_left_as_is(nafnet_export, tmp_path, capsys):
    out, _ = nafnet_export
    before = sorted(p.name for p in out.iterdir())
    assert bokeh(["export", "--export-dir", str(out), "--no-fuse", "--height", "32",
                  "--width", "32"]) == 2
    assert "--overwrite" in _one_error_line(capsys, "bokeh export")
    assert sorted(p.name for p in out.iterdir()) == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert bokeh(["export", "--export-dir", str(foreign), "--no-fuse", "--height", "32",
                  "--width", "32", "--overwrite"]) == 2
    assert "holds no export" in _one_error_line(capsys, "bokeh export")
    assert (foreign / "holiday.jpg").read_bytes() == b"x"


def test_leftovers_of_killed_runs_are_cleaned_and_live_ones_kept(tmp_path):
    from export.folder import check

    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".staging-{dead}-abcdef").mkdir()
    (tmp_path / f".nafnet.onnx.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f".staging-{os.getpid()}-123456").mkdir()
    check(tmp_path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".staging-{os.getpid()}-123456"]


def test_a_new_run_replaces_the_whole_set_at_the_end(tmp_path):
    from export import folder

    out = tmp_path / "e"
    out.mkdir()
    for name, text in (("nafnet_fp16.tflite", "old"), ("nafnet_fp32.tflite", "old"),
                       ("runtime.png", "not listed: kept")):
        (out / name).write_text(text)
    (out / "report.json").write_text(json.dumps(
        {"run_id": "old", "files": ["nafnet_fp16.tflite", "nafnet_fp32.tflite", "report.json"]}))
    with pytest.raises(UserError, match="--overwrite"):
        folder.begin(out, overwrite=False)
    out, staging, run_id = folder.begin(out, overwrite=True)
    assert (out / "nafnet_fp16.tflite").read_text() == "old"  # untouched until the commit
    (staging / "nafnet_fp32.tflite").write_text("new")
    (staging / "report.json").write_text(json.dumps(
        {"run_id": run_id, "files": ["nafnet_fp32.tflite", "report.json"]}))
    folder.commit(out, staging)
    assert sorted(p.name for p in out.iterdir()) == ["nafnet_fp32.tflite", "report.json",
                                                     "runtime.png"]
    assert (out / "nafnet_fp32.tflite").read_text() == "new"
    assert json.loads((out / "report.json").read_text())["run_id"] == run_id


@pytest.mark.slow
def test_every_manifest_of_an_export_names_its_run(nafnet_export):
    out, report = nafnet_export
    manifests = list(out.glob("*.manifest.json"))
    assert manifests and report["run_id"]
    assert {json.loads(m.read_text())["run_id"] for m in manifests} == {report["run_id"]}
    assert set(report["files"]) <= {p.name for p in out.iterdir()}  # all there, none missing


# --- photos and logs ------------------------------------------------------------------------


def test_photos_are_read_upright(tmp_path):
    from common.images import load_rgb

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    img.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "portrait.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 0.9 and upright[25:].mean() < 0.1  # white on top


def test_an_image_over_the_size_limit_is_one_error(tmp_path, monkeypatch):
    from common.images import load_rgb

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="big.png: too large"):
        load_rgb(tmp_path / "big.png")


def test_csv_log_keeps_each_row_under_its_own_header(tmp_path):
    import csv

    from train.trainer import CsvLog

    log = CsvLog(tmp_path / "train_log.csv")
    log.write({"step": 1, "stage": 1, "loss": 0.5, "l_foreedge": -0.1})
    log.write({"step": 2, "stage": 2, "loss": 0.4, "l_vgg": 0.2, "d_loss": -1.0})
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert rows[0]["l_foreedge"] == "-0.1" and rows[0]["l_vgg"] == ""
    assert rows[1]["l_vgg"] == "0.2" and rows[1]["d_loss"] == "-1.0"
    assert rows[1]["l_foreedge"] == ""


# --- every command refuses bad values in one line --------------------------------------------


BAD_VALUES = [
    ["export", "--height", "0"], ["export", "--width", "-16"],
    ["export", "--calib-samples", "0"], ["export", "--seed", "-1"],
    ["export", "--variants", "int3", "--height", "32", "--width", "32"],
    ["parity", "--tflite", "m.tflite", "--num-random", "0"],
    ["parity", "--tflite", "m.tflite", "--atol", "-1"],
    ["runtime", "--tflite", "m.tflite", "--runs", "0"],
    ["runtime", "--tflite", "m.tflite", "--warmup", "-1"],
    ["runtime", "--tflite", "missing.tflite", "--threads", "0,2"],
    ["quality", "--data", "nowhere", "--limit", "0"],
    ["bench", "--runs", "0"], ["bench", "--threads", "-2"],
    ["peers", "--threads", "0"], ["passes", "--runs", "0"],
    ["profile", "--tflite", "m.tflite", "--threads", "0"],
    ["quant-report", "--worst", "0"],
    ["render", "p.png", "--out", "o", "--threads", "0"],
    ["render", "p.png", "--out", "o", "--panel-height", "-5"],
    ["inspect", "m.tflite", "--top", "0"],
    ["ai-benchmark", "--variant", "int3", "--out", "b"],
    ["train", "--batch-size", "0"], ["train", "--lr", "-1"], ["train", "--keep", "0"],
    ["train", "--nafnet-config", "{not json"],
    ["nonsense-verb"],
]


@pytest.mark.parametrize("argv", BAD_VALUES, ids=" ".join)
def test_every_command_refuses_bad_values_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # argparse: usage + one error line, exit 2
        raise SystemExit(bokeh(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and " error: " in err.strip().splitlines()[-1]


@pytest.mark.slow  # a trainer run
def test_trainer_refuses_a_foreign_file_as_its_newest_checkpoint(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, out / "checkpoints" / "step_00000009.pt")
    code = bokeh(["train", "--preset", "quick", "--device", "cpu", "--out", str(out),
                  "--resume", "--allow-random-vgg", "--no-tensorboard", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys, "bokeh train")
    assert "step_00000009.pt: not a checkpoint of this trainer" in line


def test_a_checkpoint_with_a_wrong_embedded_config_is_one_error(tmp_path):
    import torch

    from common.errors import CheckpointError
    from models.nafnet import load_nafnet, random_nafnet

    model = random_nafnet({"width": 8, "enc_blocks": (1,), "middle_blocks": 1,
                           "dec_blocks": (1,), "in_channels": 4, "out_channels": 3})
    torch.save({"params": model.state_dict(), "nafnet_config": {"width": "wide"}},
               tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="g.pth: its NAFNet config"):
        load_nafnet(tmp_path / "g.pth")


def test_a_full_disk_mid_export_is_one_line_and_the_last_export_stays(tmp_path, monkeypatch,
                                                                       capsys):
    import errno

    from export import onnx_stages

    out = tmp_path / "e"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"run_id": "old", "files": ["nafnet.onnx"]}))
    (out / "nafnet.onnx").write_bytes(b"last good export")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "nafnet.onnx"))

    monkeypatch.setattr(onnx_stages, "to_onnx", disk_full)
    code = bokeh(["export", "--export-dir", str(out), "--overwrite", "--no-fuse",
                  "--height", "32", "--width", "32"])
    assert code == 2
    assert "No space left on device" in _one_error_line(capsys, "bokeh export")
    assert (out / "nafnet.onnx").read_bytes() == b"last good export"
    assert json.loads((out / "report.json").read_text())["run_id"] == "old"
    failed = json.loads((out / "failed-run" / "report.json").read_text())
    assert "No space left" in failed["failed"]
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
