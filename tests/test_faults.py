"""Bad input and faults: nothing of the user's overwritten, nothing crashes, no run lies about
success, every input bounded (issue 22, docs/design.md section 10).

Every command a user can reach with a bad value ends in one line `<command>: error: <what>` and
exit 2 (130 for Ctrl-C), never a traceback or a signal; the numbered tests (case 1 to 14) also
check that no file of the user's changed, by hashing the folders before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from tools.cli import main as bokeh


@pytest.fixture
def error_line(capsys):
    """The one line a refused command printed: ``read(prog)`` checks there is no traceback and
    that the last stderr line is ``<prog>: error: ...`` (any prog when None) and returns it;
    ``only=True`` also checks it is the only stderr line."""
    def read(prog: str | None = None, only: bool = False) -> str:
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines, "no error message"
        assert lines[-1].startswith(f"{prog}: error: " if prog else "") and " error: " in lines[-1]
        if only:
            assert len(lines) == 1, err
        return lines[-1]

    return read


def tree_hash(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (hidden ones too) by path, with its sha256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the atomic writer never deletes what it did not write -----------------------------------


@pytest.mark.slow
def test_parity_json_onto_a_folder_is_refused_and_the_folder_kept(nafnet_export, tmp_path,
                                                                   error_line):
    out, _ = nafnet_export
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--json", str(keep)])
    assert code == 2
    assert "is a folder" in error_line("bokeh parity")
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
def test_truncated_tflite_is_one_line_not_a_crash(truncated, photo_dir, tmp_path, error_line, verb,
                                                  argv):
    argv = [a.format(m=truncated, photo=photo_dir / "coffee.png", tmp=tmp_path) for a in argv]
    assert bokeh([verb, *argv]) == 2
    line = error_line(f"bokeh {verb}")
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
def test_a_manifest_that_does_not_fit_its_file_is_exit_2(nafnet_export, tmp_path, error_line, edit,
                                                         message):
    out, _ = nafnet_export
    shutil.copy(out / "nafnet_fp32.tflite", tmp_path / "nafnet_fp32.tflite")
    manifest = json.loads((out / "nafnet_fp32.manifest.json").read_text())
    edit(manifest)
    (tmp_path / "nafnet_fp32.manifest.json").write_text(json.dumps(manifest))
    assert bokeh(["parity", "--tflite", str(tmp_path / "nafnet_fp32.tflite")]) == 2
    assert message in error_line("bokeh parity")


# --- an export run owns its folder ---------------------------------------------------------


def test_export_refuses_sizes_it_cannot_take_up_front(tmp_path, error_line):
    assert bokeh(["export", "--export-dir", str(tmp_path / "o"), "--height", "1000",
                  "--width", "1500"]) == 2
    line = error_line("bokeh export")
    assert "multiples of 16" in line and "992x1504" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_used_or_foreign_folder_is_refused_and_left_as_is(nafnet_export, tmp_path, error_line):
    out, _ = nafnet_export
    before = sorted(p.name for p in out.iterdir())
    assert bokeh(["export", "--export-dir", str(out), "--no-fuse", "--height", "32",
                  "--width", "32"]) == 2
    assert "--overwrite" in error_line("bokeh export")
    assert sorted(p.name for p in out.iterdir()) == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert bokeh(["export", "--export-dir", str(foreign), "--no-fuse", "--height", "32",
                  "--width", "32", "--overwrite"]) == 2
    assert "holds no export" in error_line("bokeh export")
    assert (foreign / "holiday.jpg").read_bytes() == b"x"


def test_leftovers_of_killed_runs_are_cleaned_and_live_ones_kept(tmp_path):
    from export.folder import check

    dead = 2**22 + 12345  # above the default pid_max: no such process
    out = tmp_path / "e"
    out.mkdir()
    (out / f".staging-{dead}-abcdef").mkdir()  # inside: where runs staged before the swap
    (out / f".nafnet.onnx.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f".e.staging-{dead}-abcdef").mkdir()
    (tmp_path / f".e.staging-{dead}-abcdef.old").mkdir()
    (tmp_path / f".e.staging-{os.getpid()}-123456").mkdir()
    (tmp_path / f".other.staging-{dead}-abcdef").mkdir()  # another folder's: not ours to judge
    check(out, overwrite=False)
    assert not list(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".e.staging-{os.getpid()}-123456", f".other.staging-{dead}-abcdef", "e"]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_a_new_run_replaces_the_whole_folder_in_one_rename(tmp_path, monkeypatch, atomic):
    from export import folder

    out = tmp_path / "e"
    out.mkdir()
    for name, text in (("nafnet_fp16.tflite", "old"), ("nafnet_fp32.tflite", "old"),
                       ("runtime.png", "not listed: kept"), (".notes", "the user's: kept")):
        (out / name).write_text(text)
    (out / "report.json").write_text(json.dumps(
        {"run_id": "old", "files": ["nafnet_fp16.tflite", "nafnet_fp32.tflite", "report.json"]}))
    with pytest.raises(UserError, match="--overwrite"):
        folder.begin(out, overwrite=False)
    out, staging, run_id = folder.begin(out, overwrite=True)
    assert staging.parent == out.parent  # beside the folder: the swap renames a folder
    assert (out / "nafnet_fp16.tflite").read_text() == "old"  # untouched until the commit
    (staging / "nafnet_fp32.tflite").write_text("new")
    (staging / "report.json").write_text(json.dumps(
        {"run_id": run_id, "files": ["nafnet_fp32.tflite", "report.json"]}))
    staged_inode = staging.stat().st_ino
    if not atomic:  # a file system without RENAME_EXCHANGE
        def unsupported(a, b):
            raise OSError(errno.EINVAL, "Invalid argument")
        monkeypatch.setattr(folder, "exchange", unsupported)
    folder.commit(out, staging)
    assert out.stat().st_ino == staged_inode  # the staged folder itself is now the export
    assert sorted(p.name for p in out.iterdir()) == [".notes", "nafnet_fp32.tflite",
                                                     "report.json", "runtime.png"]
    assert (out / "nafnet_fp32.tflite").read_text() == "new"
    assert (out / ".notes").read_text() == "the user's: kept"
    assert json.loads((out / "report.json").read_text())["run_id"] == run_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # the old export is gone


def test_the_swap_is_atomic_for_a_reader(tmp_path):
    """While the folder is swapped, a reader sees the old report or the new one, never none."""
    import threading

    from export import folder

    out = tmp_path / "e"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"run_id": "0", "files": ["report.json"]}))
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.add(json.loads((out / "report.json").read_text())["run_id"])
            except FileNotFoundError:
                seen.add("missing")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 30):
            out, staging, _ = folder.begin(out, overwrite=True)
            (staging / "report.json").write_text(json.dumps({"run_id": str(n),
                                                              "files": ["report.json"]}))
            folder.commit(out, staging)
    finally:
        stop.set()
        reader.join()
    assert "missing" not in seen and len(seen) > 1


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
    ["runtime", "--tflite", "missing.tflite", "--xnnpack", "maybe"],
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
    ["train", "--nproc-per-node", "0"],
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


@pytest.mark.parametrize("flag", ["--nets", "--weights", "--files", "--policies"])
def test_the_fp16_bench_refuses_a_name_outside_its_choices_before_any_work(flag, tmp_path,
                                                                           error_line):
    from validate import fp16_bench

    assert fp16_bench.main([flag, "fp17", "--dir", str(tmp_path / "b")]) == 2
    line = error_line("python -m validate.fp16_bench", only=True)
    assert f"{flag} takes " in line and "fp17" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # a trainer run
def test_trainer_refuses_a_foreign_file_as_its_newest_checkpoint(tmp_path, error_line):

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, out / "checkpoints" / "step_00000009.pt")
    code = bokeh(["train", "--preset", "quick", "--device", "cpu", "--out", str(out),
                  "--resume", "--allow-random-vgg", "--no-tensorboard", "--no-progress"])
    assert code == 2
    line = error_line("bokeh train")
    assert "step_00000009.pt: not a checkpoint of this trainer" in line


def test_a_checkpoint_with_a_wrong_embedded_config_is_one_error(tmp_path):

    from common.errors import CheckpointError
    from models.nafnet import load_nafnet, random_nafnet

    model = random_nafnet({"width": 8, "enc_blocks": (1,), "middle_blocks": 1,
                           "dec_blocks": (1,), "in_channels": 4, "out_channels": 3})
    torch.save({"params": model.state_dict(), "nafnet_config": {"width": "wide"}},
               tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="g.pth: its NAFNet config"):
        load_nafnet(tmp_path / "g.pth")


def test_a_full_disk_mid_export_is_one_line_and_the_last_export_stays(tmp_path, monkeypatch,
                                                                       error_line):
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
    assert "No space left on device" in error_line("bokeh export")
    assert (out / "nafnet.onnx").read_bytes() == b"last good export"
    assert json.loads((out / "report.json").read_text())["run_id"] == "old"
    failed = json.loads((out / "failed-run" / "report.json").read_text())
    assert "No space left" in failed["failed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no staging folder beside


# --- bad input to export and parity (was tests/test_cli_errors.py) ---------------------------


def test_export_missing_checkpoint(tmp_path, error_line):
    code = bokeh(["export", "--export-dir", str(tmp_path / "o"), "--height", "32", "--width", "32",
                  "--checkpoint", str(tmp_path / "nope.pth")])
    assert code == 2
    assert "nope.pth: no such checkpoint file" in error_line("bokeh export")
    assert not (tmp_path / "o").exists()  # the run made the folder and left nothing in it


def test_export_checkpoint_with_wrong_keys(tmp_path, error_line):
    from models.nafnet import NAFNet

    torch.save(NAFNet(in_channels=3, out_channels=3, width=16).state_dict(), tmp_path / "w.pth")
    code = bokeh(["export", "--export-dir", str(tmp_path / "o"), "--height", "32", "--width", "32",
                  "--checkpoint", str(tmp_path / "w.pth")])
    assert code == 2
    assert "w.pth: shapes do not fit NAFNet" in error_line("bokeh export")


def test_export_unwritable_output_folder(tmp_path, error_line):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = bokeh(["export", "--export-dir", str(blocker / "sub"), "--height", "32",
                  "--width", "32"])
    assert code == 2
    assert "output folder is not writable" in error_line("bokeh export")


def test_export_rejects_unknown_variant_and_opset(tmp_path, error_line):
    assert bokeh(["export", "--export-dir", str(tmp_path), "--variants", "int3"]) == 2
    assert "unknown variant 'int3'" in error_line("bokeh export")
    assert bokeh(["export", "--export-dir", str(tmp_path), "--height", "32", "--width", "32",
                  "--opset", "9"]) == 2
    assert "opset 9" in error_line("bokeh export")


def test_parity_missing_tflite(tmp_path, error_line):
    assert bokeh(["parity", "--tflite", str(tmp_path / "x.tflite")]) == 2
    assert "x.tflite: no such TFLite file" in error_line("bokeh parity")


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable image"),
    ("gray", "is L, not a colour photo"),
    ("rgba", "has an alpha channel"),
])
def test_parity_bad_images(nafnet_export, tmp_path, error_line, kind, message):
    folder = tmp_path / kind
    folder.mkdir()
    path = folder / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    else:
        mode = {"gray": "L", "rgba": "RGBA"}[kind]
        Image.fromarray(np.zeros((40, 40, len(mode)), np.uint8).squeeze()).convert(mode).save(path)
    out, _ = nafnet_export
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--images", str(folder)])
    assert code == 2
    line = error_line("bokeh parity")
    assert f"{kind}.png" in line and message in line


@pytest.mark.slow
def test_parity_empty_image_folder(nafnet_export, tmp_path, error_line):
    out, _ = nafnet_export
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--images",
                  str(tmp_path)])
    assert code == 2
    assert "no images" in error_line("bokeh parity")


@pytest.mark.slow
def test_parity_wrong_checkpoint_exit_1_and_json(nafnet_export, tmp_path, capsys):
    from models.nafnet import PAPER_CONFIG, random_nafnet

    torch.save(random_nafnet(PAPER_CONFIG, seed=9).state_dict(), tmp_path / "other.pth")
    out, _ = nafnet_export
    code = bokeh(["parity", "--tflite", str(out / "nafnet_fp32.tflite"), "--checkpoint",
                  str(tmp_path / "other.pth"), "--num-random", "1",
                  "--json", str(tmp_path / "r.json")])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    assert (tmp_path / "r.json").is_file()


# --- issue 22: the fourteen cases, most severe first -----------------------------------------


def _tiny_depth_file(path: Path, edit=None) -> Path:
    """A dpt-tiny state dict, saved after ``edit(state)`` changed it."""
    from models.depth import load_depth_model

    state = load_depth_model("dpt-tiny", seed=3).state_dict()
    if edit:
        edit(state)
    torch.save(state, path)
    return path


def _export_tiny(out: Path, *extra: str) -> int:
    return bokeh(["export", "--export-dir", str(out), "--depth", "dpt-tiny", "--height", "64",
                  "--width", "96", "--variants", "fp32", "--quant-variants", "",
                  "--no-gpu-check", *extra])


@pytest.mark.slow
def test_case_01_ai_benchmark_never_replaces_the_users_files(fused_export, tmp_path, error_line):
    out, _ = fused_export
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("README.txt", "manifest.json", "model.tflite"):
        (user / name).write_text(f"the user's own {name}")
    before = tree_hash(user, out)
    assert bokeh(["ai-benchmark", "--export-dir", str(out), "--variant", "fp32",
                  "--out", str(user)]) == 2
    line = error_line("bokeh ai-benchmark", only=True)
    assert "model.tflite: exists and was not written by this tool (and 2 more)" in line
    assert bokeh(["ai-benchmark", "--export-dir", str(out), "--variant", "fp32",
                  "--out", str(out / "bundle")]) == 2
    assert "is inside the export folder" in error_line("bokeh ai-benchmark", only=True)
    assert tree_hash(user, out) == before
    bundle = tmp_path / "bundle"  # a bundle folder this tool wrote is its to rewrite
    for _ in range(2):
        assert bokeh(["ai-benchmark", "--export-dir", str(out), "--variant", "fp32",
                      "--out", str(bundle)]) == 0


@pytest.mark.slow
def test_case_02_render_never_overwrites_nor_renders_its_renders(fused_export, photo_dir,
                                                                 tmp_path, error_line):
    out, _ = fused_export
    model = ["--tflite", str(out / "bokeh_fp32.tflite")]
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(photo_dir / "coffee.png", photos / "x.png")
    (photos / "x_bokeh.png").write_bytes((photo_dir / "chelsea.png").read_bytes())  # the user's
    before = tree_hash(photos)
    for overwrite in ([], ["--overwrite"]):  # the user's x_bokeh.png is a photo to render too
        assert bokeh(["render", str(photos), "--out", str(photos), *overwrite, *model]) == 2
        assert "x_bokeh.png: is an input, and the render of" in error_line("bokeh render",
                                                                           only=True)
    assert bokeh(["render", str(photos / "x.png"), "--out", str(photos), *model]) == 2
    assert "x_bokeh.png: exists and was not written by this tool" in error_line(
        "bokeh render", only=True)
    assert bokeh(["render", str(photos), "--out", str(out), *model]) == 2
    assert "inside the export folder" in error_line("bokeh render", only=True)
    assert tree_hash(photos) == before
    (photos / "x_bokeh.png").unlink()
    for _ in range(2):  # the second run skips the render the first one wrote, and replaces it
        assert bokeh(["render", str(photos), "--out", str(photos), *model]) == 0
    assert sorted(p.name for p in photos.iterdir()) == [".bokehlite-written.json", "x.png",
                                                        "x_bokeh.png"]


def test_case_03_a_second_export_into_a_locked_folder_refuses(tmp_path, error_line):
    from common.ownership import folder_lock

    out = tmp_path / "e"
    with folder_lock(out, "export"):  # what a running export holds
        before = tree_hash(out)
        assert _export_tiny(out) == 2
        line = error_line("bokeh export", only=True)
        assert f"another export is writing into this folder (process {os.getpid()})" in line
        assert tree_hash(out) == before
    assert not out.exists()  # released: the folder the lock made is gone again


def test_case_04_non_finite_weights_and_outputs_are_never_a_result(tmp_path, error_line):
    from common.metrics import psnr
    from validate.parity import compare
    from validate.renderers import render

    def nan_all(state):
        for value in state.values():
            if value.is_floating_point():
                value.fill_(float("nan"))

    weights = _tiny_depth_file(tmp_path / "nan.pt", nan_all)
    before = tree_hash(tmp_path)
    assert _export_tiny(tmp_path / "e", "--depth-weights", str(weights)) == 2
    line = error_line("bokeh export", only=True)
    assert "nan.pt: tensor " in line and "non-finite values (NaN or inf)" in line
    assert tree_hash(tmp_path) == before and not (tmp_path / "e").exists()

    def nan_model(photo, **controls):
        return np.full_like(photo, np.nan), np.full(photo.shape[:2], np.nan, np.float32)

    nan_model.label = "nan.tflite"
    with pytest.raises(UserError, match="nan.tflite: its output holds .* non-finite"):
        render(nan_model, (32, 32), np.zeros((32, 32, 3), np.float32))
    row = compare(np.zeros((1, 4, 4, 3)), np.full((1, 4, 4, 3), np.nan))
    assert "non-finite" in row["error"] and "psnr_db" not in row
    assert np.isnan(psnr(np.zeros(4), np.full(4, np.nan)))


def test_case_05_a_depth_size_the_machine_cannot_hold_is_refused(tmp_path, error_line):
    assert _export_tiny(tmp_path / "e", "--depth-short-side", "100000") == 2
    line = error_line("bokeh export", only=True)
    assert "with dpt-tiny at 100000x150016 needs at least" in line
    assert "this machine has available" in line
    assert not (tmp_path / "e").exists()  # no staging folder, nothing


@pytest.mark.slow
def test_case_06_a_focus_sweep_the_machine_cannot_hold_is_refused(fused_export, photo_dir,
                                                                  tmp_path, error_line):
    out, _ = fused_export
    assert bokeh(["render", str(photo_dir / "coffee.png"), "--out", str(tmp_path / "r"),
                  "--tflite", str(out / "bokeh_controls_fp32.tflite"),
                  "--focus-sweep", "1000000"]) == 2
    line = error_line("bokeh render", only=True)
    assert "--focus-sweep 1000000 of coffee.png needs at least" in line
    assert not (tmp_path / "r").exists()
    before = tree_hash(out)
    assert bokeh(["parity", "--tflite", str(out / "bokeh_fp32.tflite"),
                  "--num-random", "1000000000"]) == 2  # every count has its bound
    assert "--num-random 1000000000 at 64x96 needs at least" in error_line("bokeh parity",
                                                                          only=True)
    assert tree_hash(out) == before


def test_case_07_a_tensor_of_the_wrong_dtype_is_named(tmp_path, error_line):
    key = "scratch.output_conv.4.weight"

    def to_int(state):
        state[key] = state[key].to(torch.int64)

    weights = _tiny_depth_file(tmp_path / "int.pt", to_int)
    before = tree_hash(tmp_path)
    assert _export_tiny(tmp_path / "e", "--depth-weights", str(weights)) == 2
    line = error_line("bokeh export", only=True)
    assert f"int.pt: tensor '{key}' is int64, where the model's is floating point" in line
    assert tree_hash(tmp_path) == before


@pytest.mark.slow  # a trainer run
def test_case_08_ctrl_c_in_train_saves_a_checkpoint_and_resume_continues(tmp_path, monkeypatch,
                                                                         capsys, error_line):
    import signal

    from train import trainer

    out = tmp_path / "run"
    args = ["--preset", "quick", "--out", str(out), "--nafnet-config",
            json.dumps(dict(width=4, enc_blocks=[1], middle_blocks=1, dec_blocks=[1])),
            "--synthetic-train", "8", "--synthetic-val", "2", "--synthetic-size", "32",
            "--crop", "32", "--batch-size", "2", "--epochs1", "1", "--epochs2", "0",
            "--no-tensorboard", "--no-progress", "--threads", "1", "--ckpt-every", "100"]
    real = trainer.stage1_loss
    calls = []

    def ctrl_c_in_step_2(*a, **k):  # the user presses Ctrl-C while step 2 computes
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "stage1_loss", ctrl_c_in_step_2)
    assert trainer.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bokeh train: interrupted after step 2; "
                                               "checkpoint ") and "Traceback" not in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pt"]
    monkeypatch.setattr(trainer, "stage1_loss", real)
    before = tree_hash(out)
    assert trainer.main([*args, "--resume", "--max-steps", "1"]) == 2  # below the resumed step
    assert "is already at step 2; nothing to train" in error_line("bokeh train")
    assert tree_hash(out) == before
    assert trainer.main([*args, "--resume", "--max-steps", "3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    step = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)["step"]
    assert step == 3


@pytest.mark.parametrize("verb, module, name, argv", [
    ("render", "tools.render", "_run", ["x.png", "--out", "o"]),
    ("train", "train.trainer", "train", ["--preset", "quick", "--out", "o"]),  # before a step
])
def test_case_08_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys, verb, module, name, argv):
    import importlib

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), name, ctrl_c)
    assert bokeh([verb, *argv]) == 130
    assert capsys.readouterr().err == f"bokeh {verb}: interrupted\n"


@pytest.mark.slow
def test_case_09_a_manifest_naming_the_wrong_kind_is_refused(nafnet_export, tmp_path,
                                                            error_line):
    out, _ = nafnet_export
    shutil.copy(out / "nafnet_fp32.tflite", tmp_path / "m.tflite")
    manifest = json.loads((out / "nafnet_fp32.manifest.json").read_text())
    manifest["model"] = "bokeh"  # a 4-channel input described as the fused model
    manifest["depth"] = json.loads((out / "bokeh_fp32.manifest.json").read_text())["depth"]
    (tmp_path / "m.manifest.json").write_text(json.dumps(manifest))
    before = tree_hash(tmp_path)
    assert bokeh(["parity", "--tflite", str(tmp_path / "m.tflite"), "--accelerator", "gpu"]) == 2
    line = error_line("bokeh parity", only=True)
    assert "says model 'bokeh', which takes photo [1,H,W,3]" in line
    assert "it does not describe this file" in line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("fault, named", [
    ("missing", "1 missing keys ['scratch.output_conv.4.bias']"),
    ("extra", "1 unexpected ['scratch.extra.weight']"),
    ("shape", "1 wrong shapes ['scratch.output_conv.4.weight (1, 8, 3, 3) != (1, 8, 1, 1)']"),
])
def test_case_10_a_near_miss_of_a_net_is_diagnosed_as_that_net(tmp_path, error_line, fault,
                                                              named):
    from models.depth import checkpoint_net

    def edit(state):
        key = "scratch.output_conv.4"
        if fault == "missing":
            del state[f"{key}.bias"]
        elif fault == "extra":
            state["scratch.extra.weight"] = torch.zeros(2)
        else:
            state[f"{key}.weight"] = torch.zeros(1, 8, 3, 3)

    weights = _tiny_depth_file(tmp_path / "tiny.pt", edit)
    assert checkpoint_net(weights) == "dpt-tiny"
    before = tree_hash(tmp_path)
    for depth in ([], ["--depth", "dpt-tiny"]):
        argv = ["export", "--export-dir", str(tmp_path / "e"), "--height", "64", "--width", "96",
                "--depth-weights", str(weights), *depth]
        assert bokeh(argv) == 2
        line = error_line("bokeh export", only=True)
        assert named in line and "dpt-hybrid" not in line
    assert tree_hash(tmp_path) == before


def test_case_11_parity_on_the_gpu_refuses_a_flex_model(tmp_path, error_line):
    from tools_models import flex_tflite

    model = flex_tflite(tmp_path)
    before = tree_hash(tmp_path)
    assert bokeh(["parity", "--tflite", str(model), "--accelerator", "gpu"]) == 2
    line = error_line("bokeh parity", only=True)
    assert "needs Flex ops" in line and "--accelerator gpu refuses it" in line
    assert tree_hash(tmp_path) == before


def test_case_12_render_refuses_a_model_that_is_not_ours(photo_dir, tmp_path, error_line):
    from tools_models import _convert

    from common.quiet import quiet_tensorflow

    tf = quiet_tensorflow()

    kernel = tf.constant(np.ones((4, 3), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 4], tf.float32, name="input")])
    def dense(x):  # a tiny Dense model, [1,H,W,4] in like NAFNet, but not one of ours
        return {"output": tf.tensordot(x, kernel, 1)}

    model = _convert(dense, tmp_path / "dense.tflite")
    before = tree_hash(tmp_path)
    assert bokeh(["render", str(photo_dir / "coffee.png"), "--tflite", str(model),
                  "--out", str(tmp_path / "r")]) == 2
    line = error_line("bokeh render", only=True)
    assert "dense.tflite: no manifest" in line and "NAFNet" not in line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("kind", ["random", "code"])
def test_case_13_unreadable_weights_get_our_words_not_torchs(tmp_path, capsys, kind):
    path = tmp_path / "w.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        class Code:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'ran'}",))

        torch.save({"weights": Code()}, path)
    before = tree_hash(tmp_path)
    for argv in (["--checkpoint", str(path)], ["--depth-weights", str(path)]):
        assert _export_tiny(tmp_path / "e", *argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Warning" not in err
        assert "weights_only" not in err and "Re-running" not in err
        assert ("not a readable PyTorch weights file" if kind == "random"
                else "holds Python code or objects (posix.system)") in err
    assert tree_hash(tmp_path) == before  # the code did not run


def test_case_14_messages_speak_bokeh_and_big_photos_read_quietly(tmp_path, monkeypatch, capsys,
                                                                  error_line):
    import warnings

    from common.images import load_rgb

    assert bokeh(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "bokeh train --preset quick" in text
    assert "python -m train.trainer" not in text
    assert bokeh(["train", "--data", "folders", "--input-dir", str(tmp_path), "--target-dir",
                  str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "fill it with bokeh depth-cache" in error_line("bokeh train")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 px: Pillow warns, does not fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(tmp_path / "big.png").shape == (64, 64, 3)
