"""Precompute depth masks once: one 16-bit disparity PNG per training image.

``bokeh depth-cache --dpt-weights dpt_hybrid_384.pt --images DIR --out DIR`` runs the
project's DPT (``models/dpt.py``) the way the fused phone graph does: resize keeping the aspect
ratio to a multiple of 32 with the short side 384, normalise with mean 0.5 / std 0.5, predict
disparity, resize it back to the photo's size. The PNG holds the disparity min-max scaled to
0..65535 (DPT's scale and shift are arbitrary anyway); training normalises it again.

The core, ``build_cache``, takes any disparity callable, so another depth source can fill the cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.images import IMAGE_SUFFIXES, load_rgb, save_png
from models.dpt import dpt_input_size
from models.pipeline import resize_bilinear
from train.data import DataError

Predictor = Callable[[torch.Tensor], torch.Tensor]  # [1,3,h,w] normalised -> [1,h,w] disparity


@torch.no_grad()
def predict_disparity(image: np.ndarray, predict: Predictor, short_side: int = 384
                      ) -> np.ndarray:
    """Disparity ``HxW`` float32 for an ``HxWx3`` image in [0,1], at the image's own size."""
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
    x = resize_bilinear(x, dpt_input_size(h, w, short_side))
    d = predict((x - 0.5) / 0.5)
    if d.ndim == 3:
        d = d[:, None]
    d = resize_bilinear(d.float(), (h, w))
    return d[0, 0].cpu().numpy()


def write_disparity_png(path: Path, disparity: np.ndarray) -> None:
    """Min-max scale to 16 bits and write atomically (temp file + rename)."""
    d = disparity.astype(np.float64)
    lo, hi = d.min(), d.max()
    d = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    save_png(path, (d * 65535 + 0.5).astype(np.uint16))


def build_cache(images: Path, out: Path, predict: Predictor, overwrite: bool = False,
                progress: bool = True) -> int:
    """Write ``out/{stem}.png`` for every image in ``images``; existing files are kept unless
    ``overwrite``. Returns the number written."""
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images}: no images found")
    out.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if overwrite or not (out / f"{f.stem}.png").exists()]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="depth cache", unit="img")
    for f in todo:
        write_disparity_png(out / f"{f.stem}.png", predict_disparity(load_rgb(f), predict))
    return len(todo)


def main(argv: list[str] | None = None, prog: str = "bokeh depth-cache") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run DPT over a folder of photos and cache one 16-bit disparity PNG each.")
    p.add_argument("--dpt-weights", type=Path, required=True,
                   help="local MiDaS DPT checkpoint (e.g. dpt_hybrid_384.pt)")
    p.add_argument("--images", type=Path, required=True,
                   help="folder of photos (EBB!: Training/original)")
    p.add_argument("--out", type=Path, required=True, help="cache folder ({stem}.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute existing files")
    args = p.parse_args(argv)
    if not args.dpt_weights.is_file():
        print(f"error: {args.dpt_weights}: no such DPT weights file", file=sys.stderr)
        return 2
    try:
        from models.dpt import DPT
    except ImportError:
        print("error: models/dpt.py is not available yet; fill the cache from another disparity "
              "source with train.depth_cache.build_cache", file=sys.stderr)
        return 2
    try:
        model = DPT.from_midas_checkpoint(args.dpt_weights).to(args.device).eval()
    except Exception as exc:  # a foreign or corrupt checkpoint
        print(f"error: {args.dpt_weights}: cannot load DPT ({exc})", file=sys.stderr)
        return 2

    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(args.device))

    try:
        n = build_cache(args.images, args.out, predict)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} depth maps to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
