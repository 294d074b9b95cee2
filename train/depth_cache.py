"""Precompute depth masks once: one 16-bit mask PNG per training image, made by the depth net the
phone model will fuse.

``bokeh depth-cache --depth midas-small --depth-weights midas_v21_small_256.pt --images DIR
--out DIR`` runs any net of models/depth.py exactly as the fused phone graph does
(``models.pipeline.depth_mask``): the photo resized keeping its aspect ratio to the net's input
(its own short side and multiple), normalised with the net's own mean and std, the disparity
resized back and min-max normalised per photo. NAFNet is conditioned on that mask, and masks of
different nets are not distributed alike, so the cache folder records which net and weights
filled it (``depth_cache.json``, ``models.depth.mask_source``); the trainer copies that record
into its checkpoints and refuses a cache of another net than ``--depth``, and the export fuses
the recorded net.

The core, ``build_cache``, takes any mask callable, so another depth source can fill a cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import read_json, write_json
from common.images import IMAGE_SUFFIXES, load_rgb, save_png
from train.data import DataError

RECORD = "depth_cache.json"
RECORD_FORMAT = "bokehlite-depth-cache/1"
Masker = Callable[[torch.Tensor], torch.Tensor]  # photo [1,3,H,W] in [0,1] -> mask [1,1,H,W]


def write_disparity_png(path: Path, disparity: np.ndarray) -> None:
    """Min-max scale to 16 bits and write atomically (temp file + rename)."""
    d = disparity.astype(np.float64)
    lo, hi = d.min(), d.max()
    d = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    save_png(path, (d * 65535 + 0.5).astype(np.uint16))


def net_masker(name: str, weights: str | Path | None, seed: int = 0,
               short_side: int | None = None, device: str = "cpu") -> Masker:
    """The mask of registered net ``name`` as the fused graph computes it, per photo size."""
    from models.depth import depth_input_size, depth_net, load_depth_model
    from models.pipeline import depth_mask

    entry = depth_net(name)
    model = load_depth_model(name, weights, seed).to(device)
    mean = torch.tensor(entry.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(entry.std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def masker(photo: torch.Tensor) -> torch.Tensor:
        size = depth_input_size(name, photo.shape[-2], photo.shape[-1], short_side)
        return depth_mask(model, photo.to(device), size, mean, std)

    return masker


def read_record(folder: Path) -> dict | None:
    """The mask source recorded in a cache folder (``None``: a cache made before records)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(
            record.get("depth"), dict) or "name" not in record["depth"]:
        raise DataError(f"{path}: not a depth-cache record ({RECORD_FORMAT} expected)")
    return record["depth"]


def check_cache_folder(out: Path, source: dict, overwrite: bool) -> None:
    """Refuse to add masks of one net to a cache holding another's (or unrecorded ones)."""
    from models.depth import describe_mask_source, same_masks

    if overwrite or not out.is_dir():
        return
    held = read_record(out)
    if held is None:
        if any(out.glob("*.png")):
            raise UserError(f"{out}: holds masks with no record of the depth net that made them; "
                            "give --overwrite to recompute them all, or another --out")
    elif not same_masks(held, source):
        raise UserError(f"{out}: holds masks of {describe_mask_source(held)}, not of "
                        f"{describe_mask_source(source)}; give --overwrite to recompute them "
                        "all, or another --out")


def build_cache(images: Path, out: Path, masker: Masker, overwrite: bool = False,
                progress: bool = True, source: dict | None = None) -> int:
    """Write ``out/{stem}.png`` for every image in ``images``, and ``source`` (the net that
    made them, ``models.depth.mask_source``) as the folder's record; existing files are kept
    unless ``overwrite``. Returns the number written."""
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images}: no images found")
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        write_json(out / RECORD, {"format": RECORD_FORMAT, "depth": source})
    todo = [f for f in files if overwrite or not (out / f"{f.stem}.png").exists()]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="depth cache", unit="img")
    for f in todo:
        photo = torch.from_numpy(np.ascontiguousarray(load_rgb(f).transpose(2, 0, 1)))[None]
        write_disparity_png(out / f"{f.stem}.png", masker(photo.float())[0, 0].cpu().numpy())
    return len(todo)


def build_parser(prog: str) -> argparse.ArgumentParser:
    from models.depth import depth_names

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a depth net over a folder of photos, as the fused phone model does, and "
                    "cache one 16-bit mask PNG each; the folder records the net and weights "
                    f"({RECORD}), which training and export then follow.",
        epilog=f"examples:\n  {prog} --depth midas-small --depth-weights "
               "midas_v21_small_256.pt --images EBB/Training/original --out EBB/depth-midas\n"
               f"  {prog} --depth-weights dpt_hybrid_384.pt --images DIR --out DIR\n"
               "then: bokeh train --data ebb --depth-dir EBB/depth-midas --depth midas-small ...")
    p.add_argument("--depth", metavar="NAME",
                   help=f"depth net: {', '.join(depth_names())}; default: the net "
                        "--depth-weights is, else dpt-hybrid")
    p.add_argument("--depth-weights", "--dpt-weights", dest="depth_weights", type=Path,
                   metavar="FILE", help="the net's file (e.g. midas_v21_small_256.pt); default: "
                   "random weights, meaningless masks (tests; --dpt-weights is the old name)")
    p.add_argument("--depth-short-side", type=positive_int, metavar="N",
                   help="input short side (default: the net's own)")
    p.add_argument("--images", type=Path, required=True,
                   help="folder of photos (EBB!: Training/original)")
    p.add_argument("--out", type=Path, required=True, help="cache folder ({stem}.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="recompute existing files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str = "bokeh depth-cache") -> int:
    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        from models.depth import depth_input_size, mask_source, resolve_depth_name

        if args.depth_weights is not None and not args.depth_weights.is_file():
            raise UserError(f"{args.depth_weights}: no such depth weights file")
        if not args.images.is_dir():
            raise UserError(f"{args.images}: no such folder of photos")
        name = resolve_depth_name(args.depth, args.depth_weights)
        depth_input_size(name, 1024, 1536, args.depth_short_side)  # a bad short side fails now
        source = mask_source(name, args.depth_weights, args.seed, args.depth_short_side)
        check_cache_folder(args.out, source, args.overwrite)
        masker = net_masker(name, args.depth_weights, args.seed, args.depth_short_side,
                            args.device)
        if args.depth_weights is None:
            print(f"WARNING: no --depth-weights: {name} has RANDOM weights (seed {args.seed}); "
                  "the masks are meaningless", file=sys.stderr)
        n = build_cache(args.images, args.out, masker, args.overwrite, not args.no_progress,
                        source)
        print(f"wrote {n} masks of {name} to {args.out} (record: {args.out / RECORD})")
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main(prog="python -m train.depth_cache"))
