"""The trainer end to end on a tiny NAFNet: resume exactness, NaN guard, DDP, checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.nafnet import load_nafnet
from train import trainer

pytestmark = pytest.mark.slow  # trainer runs and torchrun

TINY = json.dumps(dict(width=4, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1]))
ROOT = Path(__file__).resolve().parents[1]


def tiny_args(out: Path, *extra: str) -> list[str]:
    """Synthetic 96 px scenes (the smallest the n_layers-5 critic takes), 4 stage-1 steps and
    2 stage-2 steps."""
    return ["--preset", "quick", "--out", str(out), "--nafnet-config", TINY,
            "--synthetic-train", "8", "--synthetic-val", "2", "--synthetic-size", "96",
            "--crop", "96", "--batch-size", "2", "--epochs1", "1", "--epochs2", "1",
            "--stage2-steps", "2", "--critic-width", "4", "--allow-random-vgg",
            "--no-tensorboard", "--no-progress", "--samples", "2", "--threads", "1", *extra]


def final_state(out: Path) -> dict:
    ck = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    return dict(model=ck["model"], critics=ck["critics"], step=ck["step"])


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    assert trainer.main(tiny_args(tmp_path / "a", "--ckpt-every", "100")) == 0
    # Stop in the middle of stage 2 (step 5 of 6), then resume in a new call.
    assert trainer.main(tiny_args(tmp_path / "b", "--max-steps", "5")) == 0
    assert final_state(tmp_path / "b")["step"] == 5
    assert trainer.main(tiny_args(tmp_path / "b", "--resume")) == 0
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["lpips"] == "LPIPS unavailable: no --lpips-weights given"
    for part in ("model", "critics"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"


def test_run_outputs_and_export_ready_checkpoint(tmp_path):
    from test_train_losses import write_lpips_files

    heads, alex = write_lpips_files(tmp_path)
    out = tmp_path / "run"
    assert trainer.main(tiny_args(out, "--keep", "2", "--ckpt-every", "1", "--lpips-weights",
                                  str(heads), "--alexnet-weights", str(alex))) == 0
    assert len(list((out / "checkpoints").glob("step_*.pt"))) == 2  # the last k only
    assert not list(out.rglob("*.tmp"))
    model = load_nafnet(out / "nafnet.pt")  # what `make export NAFNET_CKPT=...` loads
    assert model.config["width"] == 4
    load_nafnet(sorted((out / "checkpoints").glob("step_*.pt"))[-1])  # full checkpoints too
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["images_per_s"]) == {"1", "2"}
    assert {"psnr", "ssim", "lpips"} <= set(summary["trained"]) and "identity" in summary
    assert "lpips" in (out / "val_log.csv").read_text().splitlines()[0]
    assert (out / "samples" / "epoch_002.png").is_file()
    header = (out / "train_log.csv").read_text().splitlines()[0]
    assert "l1" in header and "images_per_s" in header


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = trainer.stage1_loss

    def poisoned(*args):
        calls["n"] += 1
        total, terms = real_loss(*args)
        return (total * float("nan"), terms) if calls["n"] == 3 else (total, terms)

    monkeypatch.setattr(trainer, "stage1_loss", poisoned)
    out = tmp_path / "run"
    before = None
    rc = trainer.main(tiny_args(out, "--ckpt-every", "1"))
    err = capsys.readouterr().err
    assert rc == 3
    assert "nan" in err and "step 3" in err and "step_00000002.pt" in err
    kept = sorted((out / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in kept][-1] == "step_00000002.pt"
    before = torch.load(kept[-1], weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in before.values())
    assert not (out / "nafnet.pt").exists()


def test_stage2_refuses_random_vgg(tmp_path, capsys):
    args = [a for a in tiny_args(tmp_path / "run") if a != "--allow-random-vgg"]
    assert trainer.main(args) == 2
    assert "--allow-random-vgg" in capsys.readouterr().err


def test_resume_refuses_a_different_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert trainer.main(tiny_args(out, "--max-steps", "1")) == 0
    assert trainer.main(tiny_args(out, "--resume", "--lr", "0.5")) == 2
    assert "lr" in capsys.readouterr().err


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    """`bokeh train --nproc-per-node 2`: two CPU processes under torch's launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tools.cli", "train", "--nproc-per-node", "2",
           *tiny_args(out, "--device", "cpu", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_process_ddp_on_cpu_stops_together_on_ctrl_c_and_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    args = ("--synthetic-train", "32", "--log-every", "1", "--ckpt-every", "100")
    run = torchrun(out, *args)
    log = out / "train_log.csv"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal: the launcher and both workers
    _, err = run.communicate(timeout=120)
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1, err[-3000:]  # the one written at the interrupt
    step = torch.load(saved[0], weights_only=True)["step"]
    assert 1 <= step < 10
    assert run.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        f"bokeh train: interrupted after step {step}; checkpoint {saved[0]} (continue with "
        "--resume)"], err[-3000:]

    run = torchrun(out, *args, "--resume")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 10  # 32 pairs / (2 x 2) = 8 + 2
    ck = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert len(ck["rng"]) == 2  # each rank's RNG state, for an exact resume
    # The trainer all-gathers a parameter checksum each epoch and fails on any difference.
    assert "replicas diverged" not in err


@pytest.mark.full
def test_quick_preset_learns_on_synthetic_data(tmp_path):
    """What `make train` reports: the trained NAFNet beats the identity by >= 3 dB."""
    out = tmp_path / "quick"
    assert trainer.main(["--preset", "quick", "--out", str(out), "--allow-random-vgg",
                         "--no-tensorboard", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained"]["psnr"] - summary["identity"]["psnr"] >= 3


def test_folders_written_by_the_synthetic_cli_train(tmp_path):
    from train.synthetic import main as synthetic_main

    assert synthetic_main(["--out", str(tmp_path / "d"), "--count", "6", "--height", "40",
                           "--width", "48"]) == 0
    d = tmp_path / "d"
    args = ["--data", "folders", "--input-dir", str(d / "input"), "--target-dir",
            str(d / "target"), "--depth-dir", str(d / "depth"), "--val-input-dir",
            str(d / "input"), "--val-target-dir", str(d / "target"), "--crop", "32",
            "--batch-size", "2", "--epochs1", "1", "--epochs2", "0", "--nafnet-config", TINY,
            "--out", str(tmp_path / "run"), "--no-tensorboard", "--no-progress", "--samples", "1"]
    assert trainer.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["images_per_s"]["2"] is None


def test_data_loader_workers_do_not_change_the_run(tmp_path):
    """Augmentation draws from (seed, epoch, index), not from a worker's RNG."""
    base = tiny_args(tmp_path / "w0", "--epochs2", "0", "--epochs1", "2")
    assert trainer.main(base) == 0
    assert trainer.main([*tiny_args(tmp_path / "w2", "--epochs2", "0", "--epochs1", "2"),
                         "--workers", "2"]) == 0
    a, b = final_state(tmp_path / "w0"), final_state(tmp_path / "w2")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
