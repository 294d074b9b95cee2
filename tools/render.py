"""`python -m tools.render PHOTO... --out DIR`: bokeh PNGs from the phone model or from PyTorch.

With ``--tflite`` (default ``build/export/bokeh_fp32.tflite``) the fused model computes the depth
mask itself; with ``--checkpoint`` the PyTorch reference pipeline (depth net + NAFNet) does, and
then a real depth net (``--depth-weights``, ``--depth`` to name it) is required, since a random one
makes a meaningless render.
Photos of any size go in: each is fitted into the model's static size (scaled, reflect-padded) and
the output is mapped back to the photo's own size. ``--compare`` also writes one side-by-side PNG
per photo: input | disparity as a colour map | bokeh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import ensure_writable_dir
from common.images import IMAGE_SUFFIXES, list_images, load_rgb, save_png
from export.runner import RUNTIMES
from tools.images import colorize, labelled_row
from validate.renderers import TFLiteRenderer, TorchRenderer, render

DEFAULT_TFLITE = "build/export/bokeh_fp32.tflite"
def compare_image(rgb: np.ndarray, mask: np.ndarray, bokeh: np.ndarray, label: str,
                  height: int | None = None) -> np.ndarray:
    """input | disparity (inferno) | output, labelled."""
    return labelled_row([("input", rgb), ("disparity (depth mask, inferno)", colorize(mask)),
                         (f"bokeh: {label}", bokeh)], height=height)


def collect_photos(items: list[str]) -> list[Path]:
    """Files as given, folders expanded; every photo is checked before any rendering."""
    photos: list[Path] = []
    for item in items:
        path = Path(item)
        photos.extend(list_images(path) if path.is_dir() else [path])
    stems: dict[str, Path] = {}
    for path in photos:
        load_rgb(path)  # missing, grayscale, RGBA, corrupt: UserError naming the file
        if path.stem in stems:
            raise UserError(f"{path}: same name as {stems[path.stem]}; outputs would collide")
        stems[path.stem] = path
    return photos


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 1024x1536") from None
    if h < 32 or w < 32:
        raise UserError(f"--size {text}: too small (at least 32x32)")
    return h, w


def build_parser(prog: str = "bokeh render") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render bokeh PNGs from the fused TFLite model or the PyTorch pipeline. "
                    "Photos of any size are fitted to the model's static size (scaled, "
                    "reflect-padded) and mapped back to their own size.",
        epilog=f"examples:\n  {prog} photo.jpg --compare --out renders\n"
               f"  {prog} photos/ --tflite build/export/bokeh_fp16.tflite --out renders")
    p.add_argument("photos", nargs="+", metavar="PHOTO",
                   help=f"photo files or folders ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--out", required=True, help="output folder: NAME_bokeh.png per photo")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tflite", help=f"fused bokeh_*.tflite (default {DEFAULT_TFLITE})")
    src.add_argument("--checkpoint", help="NAFNet checkpoint: render with PyTorch instead")
    p.add_argument("--depth", metavar="NAME",
                   help="depth net for --checkpoint (models/depth.py: dpt-hybrid, dpt-large, "
                        "midas-small, depth-anything-v2-small); default: the net "
                        "--depth-weights is")
    p.add_argument("--depth-weights", "--dpt-weights", dest="depth_weights", metavar="FILE",
                   help="the depth net's file for --checkpoint (dpt_hybrid_384.pt, "
                        "midas_v21_small_256.pt, ...; --dpt-weights is the old name)")
    p.add_argument("--allow-random-depth", "--allow-random-dpt", dest="allow_random_depth",
                   action="store_true",
                   help="with --checkpoint and no --depth-weights: random depth (meaningless)")
    p.add_argument("--size", help="PyTorch only: render at HEIGHTxWIDTH (default: each "
                                  "photo's own size)")
    p.add_argument("--compare", action="store_true",
                   help="also write NAME_compare.png: input | disparity | bokeh")
    p.add_argument("--panel-height", type=positive_int, default=480,
                   help="height of each panel in the compare PNG (default %(default)s)")
    p.add_argument("--threads", type=positive_int, help="TFLite threads (default: all cores)")
    p.add_argument("--runtime", choices=RUNTIMES, default="litert",
                   help="TFLite interpreter: litert (faster, newer XNNPACK) or tensorflow "
                        "(TF 2.15's own); the outputs agree (default %(default)s)")
    return p


def main(argv: list[str] | None = None, prog: str = "bokeh render") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(prog, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    photos = collect_photos(args.photos)
    if args.checkpoint:
        renderer = TorchRenderer(args.checkpoint, args.depth_weights, args.allow_random_depth,
                                 parse_size(args.size), depth=args.depth)
    else:
        if args.size or args.depth or args.depth_weights or args.allow_random_depth:
            raise UserError("--size, --depth, --depth-weights and --allow-random-depth go with "
                            "--checkpoint; a TFLite model has its own size and depth net")
        if not args.tflite and not Path(DEFAULT_TFLITE).is_file():
            raise UserError(f"{DEFAULT_TFLITE}: no such TFLite file; run `make export` "
                            "or give --tflite / --checkpoint")
        renderer = TFLiteRenderer(args.tflite or DEFAULT_TFLITE, args.threads, args.runtime)
    out = ensure_writable_dir(args.out)
    for w in renderer.warnings:
        print(f"WARNING: {w}")
    print(f"Rendering {len(photos)} photo(s) with {renderer.label} to {out}/")
    for path in tqdm(photos, unit="photo", disable=len(photos) < 2):
        rgb = load_rgb(path)
        bokeh, mask, how = render(renderer, renderer.size, rgb)
        written = [save_png(out / f"{path.stem}_bokeh.png", bokeh)]
        if args.compare:
            written.append(save_png(out / f"{path.stem}_compare.png", compare_image(
                rgb, mask, bokeh, renderer.label, min(args.panel_height, rgb.shape[0]))))
        tqdm.write(f"  {path.name} ({how}) -> {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
