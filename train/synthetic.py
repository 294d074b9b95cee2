"""Synthetic bokeh pairs with exact ground truth, for tests, demos and a learnable benchmark.

A scene is a stack of flat layers at known disparities: a background (disparity 0), a few
mid-ground objects and one subject at disparity 1, each filled with a crop of one of
scikit-image's bundled photos or a generated texture (checkerboard, stripes, noise, dots with
point lights). The all-in-focus input composites the layers sharply; the target renders the same
layers through the thin-lens model of ``train.render`` focused on the subject, with each layer's
full content (also what the input hides), so occlusion is exact. The mask is the disparity of the
front-most layer at each pixel, which is already in [0,1] with 1 = subject.

``python -m train.synthetic --out DIR --count N`` writes ``input/``, ``target/`` and ``depth/``
folders that the trainer reads with ``--data folders``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw

from common.images import save_png
from train.render import coc_radius, composite

_COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "colorwheel", "cat", "retina")
_GRAY_PHOTOS = ("camera", "brick", "grass", "gravel", "text", "coins", "moon", "page", "clock")


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as float RGB (gray ones tinted later)."""
    out = []
    for name in _COLOR_PHOTOS + _GRAY_PHOTOS:
        im = np.asarray(getattr(skdata, name)(), dtype=np.float64) / 255.0
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out.append(im[..., :3])
    return tuple(out)


def _photo_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    photos = _photos()
    idx = int(rng.integers(len(photos)))
    im = photos[idx]
    ph, pw = im.shape[:2]
    scale = rng.uniform(0.35, 1.0) * min(ph / h, pw / w)
    ch, cw = max(int(h * scale), 8), max(int(w * scale), 8)
    y, x = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = (im[y:y + ch, x:x + cw] * 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), np.float64) / 255
    if idx >= len(_COLOR_PHOTOS):  # tint gray photos
        out = out * rng.uniform(0.4, 1.0, size=3)
    return out


def _generated_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(4)
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == 0:  # checkerboard
        period = rng.uniform(3, 16)
        t = ((np.floor(yy / period) + np.floor(xx / period)) % 2)[..., None]
    elif kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 14)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)[..., None]
    elif kind == 2:  # smooth value noise plus fine grain
        coarse = rng.uniform(0, 1, (max(h // 12, 2), max(w // 12, 2)))
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h),
                       Image.BICUBIC), np.float64)[..., None] / 255
        t = np.clip(t + rng.normal(0, 0.12, (h, w, 1)), 0, 1)
    else:  # dark field with small bright dots: point lights turn into bokeh discs
        t = np.zeros((h, w, 1))
        for _ in range(int(rng.integers(15, 40))):
            y, x = rng.integers(h), rng.integers(w)
            rr, cc = draw.disk((y, x), rng.uniform(0.8, 2.2), shape=(h, w))
            t[rr, cc] = 1.0
        c1 = c1 * 0.3
        c2 = np.clip(c2 + 0.5, 0, 1)
    return c1 * (1 - t) + c2 * t


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return _photo_texture(rng, h, w) if rng.uniform() < 0.6 else _generated_texture(rng, h, w)


def _shape_mask(rng: np.random.Generator, h: int, w: int, size: float) -> np.ndarray:
    """A filled ellipse, rectangle or polygon of roughly ``size`` pixels across."""
    m = np.zeros((h, w), dtype=bool)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    kind = rng.integers(3)
    if kind == 0:
        rr, cc = draw.ellipse(cy, cx, size * rng.uniform(0.3, 0.6), size * rng.uniform(0.3, 0.6),
                              shape=(h, w), rotation=rng.uniform(0, np.pi))
    elif kind == 1:
        hh, ww = size * rng.uniform(0.4, 1.0), size * rng.uniform(0.4, 1.0)
        rr, cc = draw.rectangle((max(cy - hh / 2, 0), max(cx - ww / 2, 0)),
                                (min(cy + hh / 2, h - 1), min(cx + ww / 2, w - 1)), shape=(h, w))
    else:
        n = int(rng.integers(3, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = size * rng.uniform(0.25, 0.6, n)
        rr, cc = draw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=(h, w))
    m[rr, cc] = True
    return m


def make_scene(seed: int, height: int = 160, width: int = 160, max_radius: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic pair: ``(input HxWx3, target HxWx3, mask HxW)`` float32 in [0,1].

    ``max_radius`` (default 6% of the short side) is the blur radius at disparity difference 1.
    """
    rng = np.random.default_rng(seed)
    h, w = height, width
    if max_radius is None:
        max_radius = 0.06 * min(h, w)
    short = min(h, w)
    layers = [(_texture(rng, h, w), np.ones((h, w), dtype=bool), 0.0)]
    for _ in range(int(rng.integers(1, 4))):
        layers.append((_texture(rng, h, w), _shape_mask(rng, h, w, short * rng.uniform(0.2, 0.5)),
                       float(rng.uniform(0.15, 0.7))))
    layers.append((_texture(rng, h, w), _shape_mask(rng, h, w, short * rng.uniform(0.35, 0.7)),
                   1.0))
    layers.sort(key=lambda layer: layer[2])
    focus = 1.0
    mask = np.zeros((h, w))
    for _, alpha, disp in layers:
        mask[alpha] = disp
    sharp = composite([(rgb, a.astype(np.float64), 0.0) for rgb, a, _ in layers])
    bokeh = composite([(rgb, a.astype(np.float64), float(coc_radius(d, focus, max_radius)))
                       for rgb, a, d in layers])
    return sharp.astype(np.float32), bokeh.astype(np.float32), mask.astype(np.float32)


def write_dataset(out: Path, count: int, seed: int = 0, height: int = 160, width: int = 160
                  ) -> None:
    """Write ``count`` pairs as ``input/``, ``target/`` (8-bit PNG) and ``depth/`` (16-bit PNG)."""
    for sub in ("input", "target", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sharp, bokeh, mask = make_scene(seed * 1_000_003 + i, height, width)
        name = f"{i:05d}.png"
        for sub, arr in (("input", sharp), ("target", bokeh)):
            save_png(out / sub / name, (arr * 255 + 0.5).astype(np.uint8))
        save_png(out / "depth" / name, (mask * 65535 + 0.5).astype(np.uint16))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.synthetic",
                                description="Write synthetic all-in-focus/bokeh/depth triplets.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--count", type=int, default=64, help="number of pairs")
    p.add_argument("--seed", type=int, default=0, help="scene seed (pairs differ per seed)")
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=160)
    args = p.parse_args(argv)
    write_dataset(args.out, args.count, args.seed, args.height, args.width)
    print(f"wrote {args.count} pairs to {args.out}/{{input,target,depth}}; train with "
          f"python -m train.trainer --data folders --input-dir {args.out}/input "
          f"--target-dir {args.out}/target --depth-dir {args.out}/depth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
