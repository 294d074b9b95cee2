"""Two-stage trainer for Bokeh-Loss GAN (paper sections 3.3-3.5, 4.1; docs/design.md, section 5).

Stage 1 (eq. 4): 0.5 L1 + 0.05 L_SSIM + 0.005 L_edgediff + 0.1 L_backblur + 0.005 L_foreedge.
Stage 2 (eq. 5): 0.5 L1 + 0.1 L_VGG + 0.05 L_SSIM + L_adv, with two PatchGAN critics (n_layers 3
and 5) trained by WGAN-GP (lambda 1). Adam lr 1e-4, betas (0, 0.9) for generator and critics.

One file, read top to bottom: configuration, distributed setup, data, models, resume, then one
loop that trains, logs, validates and checkpoints. Examples:

    bokeh train --preset quick --allow-random-vgg                          # CPU smoke run
    bokeh train --data ebb --data-root EBB --depth-dir EBB/depth \\
        --vgg-weights vgg19-dcbb9e9d.pth --out runs/paper                   # the paper's run
    bokeh train --nproc-per-node 8 ...                                       # 8 GPUs (DDP)
    bokeh train ... --resume                                                 # continue exactly
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from common.cli import non_negative_int, positive_float, positive_int
from common.errors import CheckpointError, UserError
from common.files import atomic_path, write_bytes
from common.images import save_png
from common.interrupt import StopRequest
from common.metrics import psnr
from models.checkpoint import load_weights_only
from models.discriminator import NLayerDiscriminator, dual_scale_critics
from models.lpips import LPIPS, load_lpips
from models.nafnet import PAPER_CONFIG, NAFNet
from train.data import (
    EBB_VAL294,
    DataError,
    EpochSampler,
    PairDataset,
    SyntheticDataset,
    batches_per_epoch,
    check_pairs,
    ebb_pairs,
    folder_pairs,
)
from train.losses import (
    VGGWeightsError,
    critic_loss,
    load_vgg19_features,
    ssim,
    stage1_loss,
    stage2_loss,
)

# -----------------------------------------------------------------------------------------------
# Configuration. A preset fills the defaults; any flag given on the command line wins.

PRESETS = {
    # The paper's run (section 4.1): 1024x1024 crops, batch 2 per GPU, 60 + 60 epochs.
    "paper": dict(data="ebb", crop=1024, batch_size=2, epochs1=60, epochs2=60, lr=1e-4,
                  critic_width=64, ckpt_every=1000, log_every=10, samples=4),
    # A CPU smoke run on synthetic scenes that still learns in a few minutes: small images, a
    # 10x learning rate in stage 1, the paper's 1e-4 in stage 2, a short capped stage 2. One
    # thread: on a busy shared machine two OpenMP threads wait for each other at every op
    # (measured 25x slower at load 10 on 2 cores); on an idle machine --threads 2 is faster.
    "quick": dict(data="synthetic", synthetic_train=256, synthetic_val=24, synthetic_size=128,
                  crop=96, batch_size=4, epochs1=6, epochs2=1, lr=1e-3, lr2=1e-4, critic_width=16,
                  ckpt_every=100, log_every=5, samples=4, stage2_steps=20, threads=1),
}


class ConfigError(UserError, ValueError):
    """A flag combination or resume state that cannot work."""


class NonFiniteLoss(RuntimeError):
    """A NaN or Inf loss: the run stops before the bad step touches any weights."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped after a whole step and saved it (``args[0]``: the checkpoint)."""


def parse_args(argv: list[str] | None = None, prog: str = "bokeh train"
               ) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                        for name, values in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help=f"defaults for the flags below, which override it (default: paper). "
                        f"{presets}")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["ebb", "folders", "synthetic"],
                   help="EBB! layout, generic paired folders, or synthetic scenes in memory")
    g.add_argument("--data-root", type=Path, help="EBB! root (holds Training/original, bokeh)")
    g.add_argument("--val-range", default=f"{EBB_VAL294[0]}-{EBB_VAL294[1]}",
                   help="EBB! ids held out for validation, inclusive (default: Val294)")
    g.add_argument("--prune-list", type=Path, help="EBB! ids to leave out, one a line")
    g.add_argument("--input-dir", type=Path, help="folders: all-in-focus images")
    g.add_argument("--target-dir", type=Path, help="folders: bokeh images, same stems")
    g.add_argument("--val-input-dir", type=Path, help="folders: validation inputs")
    g.add_argument("--val-target-dir", type=Path, help="folders: validation targets")
    g.add_argument("--depth-dir", type=Path,
                   help="depth cache, {stem}.png (bokeh depth-cache); for folders "
                        "validation too")
    g.add_argument("--depth", metavar="NAME",
                   help="the depth net the phone model will fuse (models/depth.py): the cache "
                        "must have been made by it (its depth_cache.json), else the run is "
                        "refused; default: the cache's net. The checkpoint records it and "
                        "bokeh export fuses it")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip pairs with a missing, unreadable or mis-sized file (counted in a "
                        "warning) instead of stopping")
    g.add_argument("--synthetic-train", type=positive_int, help="synthetic: training scenes")
    g.add_argument("--synthetic-val", type=positive_int, help="synthetic: held-out scenes")
    g.add_argument("--synthetic-size", type=positive_int, help="synthetic: scene size in pixels")
    g.add_argument("--crop", type=positive_int, help="random square crop for training")
    g.add_argument("--val-crop", type=positive_int, default=None,
                   help="centre crop for validation (default: whole images)")
    g.add_argument("--val-limit", type=positive_int, default=None,
                   help="validate on the first N held-out pairs only (full EBB! images are slow "
                        "on a CPU)")
    g.add_argument("--workers", type=non_negative_int, default=0,
                   help="data loader processes per rank")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, help="images per step per process")
    g.add_argument("--epochs1", type=non_negative_int, help="stage-1 (bokeh losses) epochs")
    g.add_argument("--epochs2", type=non_negative_int, help="stage-2 (VGG + adversarial) epochs")
    g.add_argument("--stage2-steps", type=positive_int, default=None,
                   help="cap the steps of each stage-2 epoch (a CPU run: stage 2 is slow)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate, generator and critics")
    g.add_argument("--lr2", type=positive_float, default=None,
                   help="learning rate in stage 2 (default: --lr, as in the paper)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.0, 0.9), help="Adam betas")
    g.add_argument("--gp-weight", type=positive_float, default=1.0, help="WGAN-GP lambda")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in total (with a checkpoint); --resume goes on")
    g = p.add_argument_group("models")
    g.add_argument("--nafnet-config", default=None,
                   help="NAFNet kwargs as JSON (default: the paper's width-8, 36-block net)")
    g.add_argument("--no-identity-init", action="store_true",
                   help="keep NAFNet's random last conv (default: zero it, so training starts "
                        "from output = input)")
    g.add_argument("--critic-width", type=positive_int,
                   help="base channels of the PatchGAN critics")
    g.add_argument("--vgg-weights", type=Path, help="torchvision vgg19 weights (stage 2)")
    g.add_argument("--allow-random-vgg", action="store_true",
                   help="let stage 2 run on random VGG19 weights (smoke runs only)")
    g.add_argument("--lpips-weights", type=Path,
                   help="LPIPS heads (lpips package weights/v0.1/alex.pth) for validation LPIPS")
    g.add_argument("--alexnet-weights", type=Path,
                   help="torchvision alexnet weights (alexnet-owt-7be5be79.pth) for LPIPS")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=Path("build/train"), help="run folder")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run (deletes its "
                        "checkpoints and logs)")
    g.add_argument("--ckpt-every", type=positive_int,
                   help="checkpoint every N steps (and each epoch)")
    g.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    g.add_argument("--log-every", type=positive_int, help="CSV/TensorBoard row every N steps")
    g.add_argument("--samples", type=positive_int, help="validation images in each PNG sample grid")
    g.add_argument("--nproc-per-node", type=positive_int, default=1,
                   help="train with N processes on this machine (DDP, through torch's own "
                        "launcher, as torchrun would; Ctrl-C stops every process after the same "
                        "step and ends in one line)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g.add_argument("--no-tensorboard", action="store_true", help="CSV logs only")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[first.preset])
    return p.parse_args(argv)


# Settings a resumed run must share with the checkpoint, or it is not the same run.
RUN_IDENTITY = ("data", "data_root", "input_dir", "target_dir", "depth_dir", "depth",
                "prune_list",
                "val_range", "synthetic_train", "synthetic_size", "crop", "batch_size", "epochs1",
                "stage2_steps", "lr", "lr2", "betas", "gp_weight", "seed", "nafnet_config",
                "critic_width", "no_identity_init")


def config_dict(cfg: argparse.Namespace) -> dict:
    """The configuration as plain values (a checkpoint must load with ``weights_only=True``)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in vars(cfg).items()}


# -----------------------------------------------------------------------------------------------
# Helpers: data, checkpoints, RNG, evaluation, logging. The loop in train() is the story.


def build_datasets(cfg: argparse.Namespace) -> tuple[torch.utils.data.Dataset, ...]:
    """(train, validation) datasets for ``cfg.data``."""
    if cfg.data == "synthetic":
        return (SyntheticDataset(cfg.synthetic_train, cfg.synthetic_size, cfg.crop, cfg.seed),
                SyntheticDataset(min(cfg.synthetic_val, cfg.val_limit or cfg.synthetic_val),
                                 cfg.synthetic_size, cfg.val_crop, cfg.seed + 10_000))
    if cfg.depth_dir is None:
        raise ConfigError("--depth-dir is required for real data (fill it with "
                          "bokeh depth-cache)")
    if cfg.data == "ebb":
        if cfg.data_root is None:
            raise ConfigError("--data ebb needs --data-root")
        try:
            lo, hi = (int(v) for v in cfg.val_range.split("-"))
        except ValueError:
            raise ConfigError(f"--val-range {cfg.val_range!r}: expected FIRST-LAST") from None
        train = ebb_pairs(cfg.data_root, cfg.depth_dir, "train", (lo, hi), cfg.prune_list)
        val = ebb_pairs(cfg.data_root, cfg.depth_dir, "val", (lo, hi), cfg.prune_list)
    else:
        if cfg.input_dir is None or cfg.target_dir is None:
            raise ConfigError("--data folders needs --input-dir and --target-dir")
        train = folder_pairs(cfg.input_dir, cfg.target_dir, cfg.depth_dir)
        val = (folder_pairs(cfg.val_input_dir, cfg.val_target_dir, cfg.depth_dir)
               if cfg.val_input_dir and cfg.val_target_dir else [])
    train_set = PairDataset(check_pairs(train, cfg.skip_bad), cfg.crop, cfg.seed, cfg.skip_bad)
    val_set = (PairDataset(check_pairs(val[:cfg.val_limit], cfg.skip_bad), cfg.val_crop, cfg.seed,
                           cfg.skip_bad) if val else None)
    return train_set, val_set


def mask_source(cfg: argparse.Namespace) -> dict | None:
    """The depth net whose masks the run trains on (``models.depth.mask_source``), from the
    cache's record; ``ConfigError`` when ``--depth`` names another net than the one that filled
    the cache. ``None``: synthetic scenes (the renderer's true depth) or a cache made before
    records, without ``--depth``."""
    from models.depth import depth_net, describe_mask_source
    from train.depth_cache import RECORD, read_record

    wanted = depth_net(cfg.depth).name if cfg.depth else None
    if cfg.data == "synthetic":
        if wanted:
            raise ConfigError(f"--depth {wanted}: synthetic scenes carry the renderer's true "
                              "depth, not a net's masks; train on a depth cache (--data ebb or "
                              "folders, --depth-dir) made by bokeh depth-cache --depth " + wanted)
        return None
    held = read_record(cfg.depth_dir) if cfg.depth_dir else None
    if held is None:
        if wanted:
            raise ConfigError(f"{cfg.depth_dir}: no {RECORD}: the cache does not say which depth "
                              f"net made its masks; refill it with bokeh depth-cache --depth "
                              f"{wanted} --overwrite")
        return None
    if wanted and held["name"] != wanted:
        raise ConfigError(f"{cfg.depth_dir}: holds masks of {describe_mask_source(held)}, not "
                          f"of {wanted} (--depth); fill a cache with bokeh depth-cache --depth "
                          f"{wanted}, or drop --depth")
    return held


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos,
                            has_gauss=has_gauss, gauss=gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoints oldest first."""
    return sorted(folder.glob("step_*.pt"))


RESUME_KEYS = ("config", "model", "critics", "opt_g", "opt_d", "step", "epoch", "batch_in_epoch",
               "timing", "rng")


def nafnet_config(text: str | None) -> dict:
    """``--nafnet-config`` JSON as NAFNet keyword arguments (the paper's net without it)."""
    if not text:
        return dict(PAPER_CONFIG)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--nafnet-config is not valid JSON ({exc})") from None
    unknown = sorted(set(config) - set(PAPER_CONFIG)) if isinstance(config, dict) else None
    if unknown is None or unknown:
        raise ConfigError(f"--nafnet-config takes a JSON object with keys of "
                          f"{sorted(PAPER_CONFIG)}; got {text!r}")
    config = {**PAPER_CONFIG, **config}
    try:
        NAFNet(**config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--nafnet-config {text!r} does not make a NAFNet ({exc})") from None
    return config


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def gather_rng(ddp: bool, world: int) -> list[dict]:
    """Every rank's RNG state (the checkpoint restores each rank's own)."""
    if not ddp:
        return [rng_state()]
    states: list = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def lpips_metric(cfg: argparse.Namespace, device: torch.device) -> tuple[LPIPS | None, str]:
    """LPIPS needs local LPIPS + AlexNet weights; without them it is reported unavailable."""
    if cfg.lpips_weights is None or cfg.alexnet_weights is None:
        missing = "--lpips-weights" if cfg.lpips_weights is None else "--alexnet-weights"
        return None, f"LPIPS unavailable: no {missing} given"
    lpips = load_lpips([cfg.alexnet_weights, cfg.lpips_weights]).requires_grad_(False)
    return lpips.to(device), "LPIPS (AlexNet)"


@torch.no_grad()
def evaluate(model: torch.nn.Module | None, dataset, device: torch.device,
             lpips: LPIPS | None = None) -> dict[str, float]:
    """Mean PSNR, SSIM (and LPIPS) over a dataset; ``model=None`` scores output = input."""
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []} | ({"lpips": []} if lpips else {})
    for i in range(len(dataset)):
        image, mask, target = (t[None].to(device) for t in dataset[i])
        if model is None:
            output = image
        else:
            output = model(torch.cat([image, mask], 1)).clamp(0, 1)
        scores["psnr"].append(psnr(output, target))
        scores["ssim"].append(ssim(output, target).item())
        if lpips:
            scores["lpips"].append(lpips(output, target).item())
    return {k: float(np.mean(v)) for k, v in scores.items()}


@torch.no_grad()
def sample_grid(model: torch.nn.Module, dataset, count: int, device: torch.device) -> np.ndarray:
    """Rows of input | mask | output | target for the first validation images, HxWx3 uint8."""
    rows = []
    for i in range(min(count, len(dataset))):
        image, mask, target = (t[None].to(device) for t in dataset[i])
        output = model(torch.cat([image, mask], 1)).clamp(0, 1)
        row = torch.cat([image, mask.expand_as(image), output, target], 3)[0]
        rows.append(row.permute(1, 2, 0).cpu().numpy())
    widest = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, widest - r.shape[1]), (0, 0))) for r in rows]
    return (np.concatenate(rows, 0) * 255 + 0.5).astype(np.uint8)


class CsvLog:
    """Append-only CSV; a row with new columns (stage 2 logs other loss terms than stage 1)
    widens the header, so every value stays under its own column name (resumes append)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run logs them again)."""
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            keep = lines[:1] + [r for r in lines[1:] if int(r.split(",", 1)[0]) <= step]
            atomic_text(self.path, "".join(keep))

    def write(self, row: dict) -> None:
        header: list[str] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
        columns = header + [k for k in row if k not in header]
        if header and columns != header:  # rewrite once with the wider header
            with self.path.open(newline="") as f:
                old = list(csv.DictReader(f))
            buffer = io.StringIO()
            w = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
            w.writeheader()
            w.writerows(old)
            atomic_text(self.path, buffer.getvalue())
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="", lineterminator="\n")
            if not header:
                w.writeheader()
            w.writerow(row)


def stop_agreed(stop: StopRequest | None, ddp: bool) -> bool:
    """Whether to stop after this step. Under DDP every rank must stop at the same step (a rank
    that left the loop alone would wait for the others forever), so one rank's request is
    everyone's."""
    wanted = torch.tensor([float(stop is not None and stop.requested)])
    if ddp:
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    return bool(wanted.item())


def check_finite(value: torch.Tensor, what: str, terms: dict, ddp: bool) -> None:
    """Stop every rank together if any rank's loss is NaN/Inf."""
    ok = torch.isfinite(value.detach()).float().reshape(1)
    if ddp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        raise NonFiniteLoss(f"{what} is {value.item()} ({parts})")


def one_line(exc: BaseException) -> str:
    """The last meaningful line (a DataLoader worker wraps errors in a traceback)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("Error: ", 1)[1] if last.startswith(("train.", "models.")) else last


# -----------------------------------------------------------------------------------------------


def train(cfg: argparse.Namespace, stop: StopRequest | None = None) -> dict:
    """Run (or resume) training; returns the summary also written to ``out/summary.json``.
    When ``stop`` is requested (Ctrl-C) the run finishes its step, saves a checkpoint and
    raises ``Interrupted``."""
    # -- distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK -------------------------------
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = cfg.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(cfg.device)
    master = rank == 0
    if cfg.keep < 1:
        raise ConfigError("--keep must be at least 1")
    depth = mask_source(cfg)  # before an --overwrite deletes anything
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    if not cfg.resume and checkpoints(ckpt_dir):
        if not cfg.overwrite:
            raise ConfigError(f"{out} holds an earlier run: pass --resume to continue it, "
                              "--overwrite to start afresh, or another --out")
        if master:
            for old in [*checkpoints(ckpt_dir), out / "train_log.csv", out / "val_log.csv",
                        out / "summary.json", out / "nafnet.pt"]:
                old.unlink(missing_ok=True)
            for folder in ("tensorboard", "samples"):
                shutil.rmtree(out / folder, ignore_errors=True)
    if ddp:
        dist.barrier()
    if master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)

    # -- data -----------------------------------------------------------------------------------
    train_set, val_set = build_datasets(cfg)
    steps_per_epoch = batches_per_epoch(len(train_set), cfg.batch_size, world)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training pairs make no full batch of "
                          f"{cfg.batch_size} x {world} processes")
    total_epochs = cfg.epochs1 + cfg.epochs2

    def steps_in_epoch(e: int) -> int:
        if e >= cfg.epochs1 and cfg.stage2_steps:
            return min(steps_per_epoch, cfg.stage2_steps)
        return steps_per_epoch

    # -- models and optimisers (the same seed on every rank: identical replicas) ----------------
    torch.manual_seed(cfg.seed)
    net_config = nafnet_config(cfg.nafnet_config)
    model = NAFNet(**net_config).to(device)
    if not cfg.no_identity_init:  # blocks start as identities (beta = gamma = 0); zeroing the
        torch.nn.init.zeros_(model.ending.weight)  # last conv makes the whole net output = input
        torch.nn.init.zeros_(model.ending.bias)
    critics = dual_scale_critics(3, cfg.critic_width).to(device)
    vgg = None
    if cfg.epochs2 > 0:
        if cfg.crop < NLayerDiscriminator.min_size(5):
            raise ConfigError(f"--crop {cfg.crop} is too small for the n_layers-5 critic "
                              f"(stage 2 needs >= {NLayerDiscriminator.min_size(5)})")
        vgg = load_vgg19_features(cfg.vgg_weights, cfg.allow_random_vgg).to(device)
        if master and cfg.vgg_weights is None:
            print("warning: stage 2 uses random VGG19 weights (--allow-random-vgg): the "
                  "perceptual term is not the paper's", file=sys.stderr)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam(critics.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    torch.manual_seed(cfg.seed + rank)  # per-rank stream for the WGAN-GP interpolation
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # -- resume ---------------------------------------------------------------------------------
    step = epoch = batch_in_epoch = 0
    timing = {"1": [0.0, 0], "2": [0.0, 0]}  # stage -> [seconds, images]
    if cfg.resume:
        found = checkpoints(ckpt_dir)
        if not found:
            raise ConfigError(f"{ckpt_dir}: no checkpoint to resume from")
        path = found[-1]
        try:
            ck = load_weights_only(path)
        except CheckpointError as exc:  # a truncated file: atomic writes make this rare
            raise CheckpointError(f"{path}: {exc}") from None
        missing = [k for k in RESUME_KEYS if not isinstance(ck, dict) or k not in ck]
        if missing:
            raise CheckpointError(f"{path}: not a checkpoint of this trainer (no "
                                  f"{', '.join(missing)}); move it out of {ckpt_dir}")
        mine, theirs = config_dict(cfg), ck["config"]
        for key in RUN_IDENTITY:
            if mine.get(key) != theirs.get(key):
                raise ConfigError(f"--resume: {key} is {mine.get(key)!r} but {path} was trained "
                                  f"with {theirs.get(key)!r}")
        try:
            model.load_state_dict(ck["model"])
            critics.load_state_dict(ck["critics"])
            opt_g.load_state_dict(ck["opt_g"])
            opt_d.load_state_dict(ck["opt_d"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's models "
                                  f"({one_line(exc)[:200]})") from None
        step, epoch, batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        timing = ck["timing"]
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank])
        elif master:
            print(f"warning: {path} was written by {len(ck['rng'])} processes, this run has "
                  f"{world}: data order and RNG streams differ from an uninterrupted run",
                  file=sys.stderr)
        if master:
            print(f"resumed from {path} (step {step}, epoch {epoch}, batch {batch_in_epoch})")
        if cfg.max_steps and step >= cfg.max_steps:
            raise ConfigError(f"--max-steps {cfg.max_steps}: {path} is already at step {step}; "
                              "nothing to train (give a larger --max-steps, or none)")

    def save_checkpoint() -> Path | None:
        """Everything needed to continue exactly; every rank joins (RNG gather), rank 0 writes."""
        states = gather_rng(ddp, world)
        if not master:
            return None
        path = ckpt_dir / f"step_{step:08d}.pt"
        atomic_torch_save(dict(
            model=model_raw.state_dict(), nafnet_config=net_config, depth=depth,
            critics=critics.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
            step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, rng=states, timing=timing,
            config=config_dict(cfg), world_size=world), path)
        for old in checkpoints(ckpt_dir)[:-cfg.keep]:
            old.unlink()
        return path

    model_raw = model
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
        critics_ddp = [DDP(c, device_ids=ids) for c in critics]
    else:
        critics_ddp = list(critics)

    # -- logging --------------------------------------------------------------------------------
    train_log, val_log, tb, lpips, lpips_note = None, None, None, None, None
    if master:
        train_log, val_log = CsvLog(out / "train_log.csv"), CsvLog(out / "val_log.csv")
        train_log.truncate_after(step)
        val_log.truncate_after(step)
        if not cfg.no_tensorboard:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        lpips, lpips_note = lpips_metric(cfg, device)
        n_params = sum(p.numel() for p in model_raw.parameters())
        print(f"{len(train_set)} training pairs, {len(val_set) if val_set else 0} validation; "
              f"{world} process(es) on {device}; NAFNet {n_params:,} parameters; {lpips_note}")

    # -- the loop -------------------------------------------------------------------------------
    stopped_early = False
    while epoch < total_epochs and not stopped_early:
        stage = 1 if epoch < cfg.epochs1 else 2
        n_steps = steps_in_epoch(epoch)
        for group in [*opt_g.param_groups, *opt_d.param_groups]:
            group["lr"] = cfg.lr if stage == 1 or cfg.lr2 is None else cfg.lr2
        sampler = EpochSampler(len(train_set), cfg.batch_size, epoch, cfg.seed, rank, world,
                               batch_in_epoch)
        sampler.keys = sampler.keys[:max(n_steps - batch_in_epoch, 0) * cfg.batch_size]
        loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator())  # keep the global RNG untouched
        bar = None
        if master and not cfg.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=n_steps, initial=batch_in_epoch, unit="step", dynamic_ncols=True,
                       desc=f"stage {stage} epoch {epoch + 1}/{total_epochs}")
        tick = time.perf_counter()
        for image, mask, target in loader:
            image, mask, target = (t.to(device, non_blocking=True) for t in (image, mask, target))
            output = model(torch.cat([image, mask], 1))
            extra = {}
            if stage == 1:
                loss, terms = stage1_loss(image, output, target, mask)
            else:
                critics.requires_grad_(True)
                d_loss, extra = critic_loss(critics_ddp, target, output, cfg.gp_weight)
                check_finite(d_loss, f"critic loss at step {step + 1}", extra, ddp)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                critics.requires_grad_(False)  # the generator step must not train the critics
                loss, terms = stage2_loss(output, target, vgg, critics)
                extra["d_loss"] = d_loss.detach()
            check_finite(loss, f"stage-{stage} loss at step {step + 1}", terms, ddp)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            step += 1
            batch_in_epoch += 1

            now = time.perf_counter()
            timing[str(stage)][0] += now - tick
            timing[str(stage)][1] += cfg.batch_size * world
            images_per_s = cfg.batch_size * world / max(now - tick, 1e-9)
            tick = now
            if master and step % cfg.log_every == 0:  # .item() syncs a GPU: not every step
                row = dict(step=step, epoch=epoch, stage=stage, loss=loss.item(),
                           **{k: v.item() for k, v in {**terms, **extra}.items()},
                           images_per_s=images_per_s)
                train_log.write(row)
                if tb:
                    for k, v in row.items():
                        if k not in ("step", "epoch", "stage"):
                            tb.add_scalar(f"stage{stage}/{k}", v, step)
                if bar:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}",
                                    img_s=f"{images_per_s:.1f}")
            if bar:
                bar.update(1)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_checkpoint()
            interrupted = stop_agreed(stop, ddp)
            if cfg.max_steps and step >= cfg.max_steps or interrupted:
                stopped_early = True
                break
        if bar:
            bar.close()
        if stopped_early:
            path = save_checkpoint()
            if interrupted:
                raise Interrupted(path)
            if master:
                print(f"stopped at --max-steps {cfg.max_steps}: {path}; continue with --resume")
            break

        # -- end of epoch: validation, samples, checkpoint, replica check ----------------------
        epoch += 1
        batch_in_epoch = 0
        if master and val_set is not None:
            model_raw.eval()
            metrics = evaluate(model_raw, val_set, device, lpips)
            grid = sample_grid(model_raw, val_set, cfg.samples, device)
            model_raw.train()
            val_log.write(dict(step=step, epoch=epoch, stage=stage, **metrics))
            grid_path = out / "samples" / f"epoch_{epoch:03d}.png"
            save_png(grid_path, grid)
            if tb:
                for k, v in metrics.items():
                    tb.add_scalar(f"val/{k}", v, step)
                tb.add_image("val/input|mask|output|target", grid, step, dataformats="HWC")
            print(f"epoch {epoch}/{total_epochs} (stage {stage}) step {step}: val PSNR "
                  f"{metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}"
                  + (f", LPIPS {metrics['lpips']:.4f}" if "lpips" in metrics else ""))
        save_checkpoint()
        if ddp:
            check_replicas([model_raw, critics])

    # -- wrap up: export-ready generator, summary, identity-vs-trained table --------------------
    summary: dict = dict(step=step, epoch=epoch, world_size=world, stopped_early=stopped_early,
                         images_per_s={s: (n / t if t else None) for s, (t, n) in timing.items()})
    if master and not stopped_early:
        final = out / "nafnet.pt"
        atomic_torch_save(dict(model=model_raw.state_dict(), nafnet_config=net_config,
                               depth=depth), final)
        summary["checkpoint"] = str(final)
        if val_set is not None:
            model_raw.eval()
            summary["identity"] = evaluate(None, val_set, device, lpips)
            summary["trained"] = evaluate(model_raw, val_set, device, lpips)
            summary["lpips"] = lpips_note
        atomic_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    if tb:
        tb.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def check_replicas(modules: list[torch.nn.Module]) -> None:
    """DDP keeps replicas identical by construction; verify it cheaply each epoch."""
    flat = torch.cat([p.detach().double().flatten().cpu() for m in modules
                      for p in m.parameters()])
    local = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
    local = local.to(next(modules[0].parameters()).device)  # NCCL gathers GPU tensors only
    everyone = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError("DDP replicas diverged: parameters differ between ranks")


def print_summary(summary: dict) -> None:
    ips = summary["images_per_s"]
    print("images/s: " + ", ".join(f"stage {s} {v:.2f}" for s, v in ips.items() if v))
    if "trained" in summary:
        ident, trained = summary["identity"], summary["trained"]
        lp = "lpips" in trained
        print("\n| held-out pairs | PSNR (dB) | SSIM |" + (" LPIPS |" if lp else "")
              + "\n|---|---|---|" + ("---|" if lp else ""))
        for name, m in (("identity (output = input)", ident), ("trained NAFNet", trained)):
            print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} |"
                  + (f" {m['lpips']:.4f} |" if lp else ""))
        print(f"\nPSNR gain: {trained['psnr'] - ident['psnr']:+.2f} dB; {summary['lpips']}")
    if "checkpoint" in summary:
        print(f"\nnext: make export NAFNET_CKPT={summary['checkpoint']}")


def launch(argv: list[str], processes: int, prog: str) -> int:
    """``torchrun --standalone --nproc_per_node N -m train.trainer ARGV``, run in this process by
    torch's own launcher, so that a Ctrl-C ends with rank 0's one line rather than the
    launcher's SignalException traceback or log. A refused run keeps each process's own error
    line (every rank checks the same configuration); any other failure adds one line naming
    the process."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for name in list(logging.Logger.manager.loggerDict):  # each sets its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun(["--standalone", "--nproc_per_node", str(processes), "-m", "train.trainer",
                  *argv])
    except SignalException:
        return 130  # rank 0 said where it stopped
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        if failure.exitcode in (2, 3):  # the processes said what was wrong, above
            return failure.exitcode
        print(f"{prog}: error: training process {rank} of {processes} exited with "
              f"{failure.exitcode} (its message is above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "bokeh train") -> int:
    cfg = parse_args(argv, prog)
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    if cfg.nproc_per_node > 1 and not launched:
        return launch(list(sys.argv[1:] if argv is None else argv), cfg.nproc_per_node, prog)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        # Under torchrun Ctrl-C reaches each worker twice (from the terminal, then forwarded by
        # the launcher, which kills the workers after its grace period): neither may cut the
        # step that saves the checkpoint.
        with StopRequest(launched=launched) as stop:
            train(cfg, stop)
    except KeyboardInterrupt as exc:
        if launched and os.environ.get("RANK", "0") != "0":
            return 130  # one line for the run: rank 0's
        saved = (f" after step {int(exc.args[0].stem.split('_')[-1])}; checkpoint {exc.args[0]} "
                 "(continue with --resume)") if isinstance(exc, Interrupted) and exc.args[0] \
            else ""
        print(f"{prog}: interrupted{saved}", file=sys.stderr)
        return 130
    except NonFiniteLoss as exc:
        found = checkpoints(Path(cfg.out) / "checkpoints")  # nothing is written after a bad step
        print(f"{prog}: error: {exc}: stopped before this step changed any weights; last good "
              f"checkpoint: {found[-1] if found else 'none yet'} (continue with --resume, e.g. "
              f"with a lower --lr)", file=sys.stderr)
        return 3
    except (DataError, VGGWeightsError, UserError, ConfigError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
