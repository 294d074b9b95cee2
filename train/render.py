"""A physically based thin-lens bokeh renderer: ground truth for synthetic pairs, and a classical
baseline for any photo + disparity map.

Thin lens: an object at disparity ``d`` (inverse depth) seen through a lens focused at disparity
``d_f`` images to a circle of confusion whose radius is proportional to ``|d - d_f|`` (the
aperture and focal length fold into one constant, ``max_radius``, the radius in pixels at a
disparity difference of 1). The scene is cut into depth layers, each blurred with a disc kernel of
its own radius, and composited back to front with the "over" operator, so a near layer's blur
spreads over what is behind it but a far layer never bleeds over a near one. Where the hidden
background behind an object is unknown (a real photo), the accumulated coverage is divided out,
which extends the visible background into the hole instead of darkening it.

Run ``python -m train.render --image PHOTO --disparity DISP.png --out OUT.png`` for the baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

from common.images import load_rgb, save_png


def disc_kernel(radius: float) -> np.ndarray:
    """An anti-aliased, normalised disc of the given radius in pixels (radius 0: identity)."""
    r = max(float(radius), 0.0)
    half = int(math.ceil(r + 0.5)) - 1  # farthest pixel with non-zero weight
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    k = np.clip(r + 0.5 - np.hypot(yy, xx), 0.0, 1.0)
    return k / k.sum()


def blur(x: np.ndarray, radius: float) -> np.ndarray:
    """Disc blur of an ``HxW`` or ``HxWxC`` array, borders reflected."""
    k = disc_kernel(radius)
    if k.shape[0] == 1:
        return x.copy()
    half = k.shape[0] // 2
    pad = [(half, half), (half, half)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad, mode="reflect")
    kk = k.reshape(k.shape + (1,) * (x.ndim - 2))
    return fftconvolve(xp, kk, mode="valid", axes=(0, 1))


def coc_radius(disparity: float | np.ndarray, focus: float, max_radius: float):
    """Circle-of-confusion radius in pixels: ``max_radius * |d - d_focus|``."""
    return max_radius * np.abs(np.asarray(disparity) - focus)


def composite(layers: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Blur and composite ``(rgb HxWx3, alpha HxW, radius)`` layers given back to front."""
    h, w = layers[0][1].shape
    color = np.zeros((h, w, 3))
    cover = np.zeros((h, w))
    for rgb, alpha, radius in layers:
        a = blur(alpha.astype(np.float64), radius)
        c = blur(rgb * alpha[..., None], radius)
        color = c + (1 - a)[..., None] * color
        cover = a + (1 - a) * cover
    return np.clip(color / np.maximum(cover, 1e-6)[..., None], 0.0, 1.0)


def render_bokeh(image: np.ndarray, disparity: np.ndarray, focus: float | None = None,
                 max_radius: float = 12.0, n_layers: int = 24) -> np.ndarray:
    """Render bokeh for an all-in-focus photo ``HxWx3`` in [0,1] and its disparity ``HxW``.

    The disparity is min-max normalised (1 = nearest). ``focus`` defaults to the 99th percentile
    (the subject is usually the nearest thing); it is in normalised units.
    """
    if image.shape[:2] != disparity.shape:
        raise ValueError(f"image {image.shape[:2]} and disparity {disparity.shape} sizes differ")
    d = disparity.astype(np.float64)
    d = (d - d.min()) / max(d.max() - d.min(), 1e-12)
    if focus is None:
        focus = float(np.percentile(d, 99))
    edges = np.linspace(0, 1, n_layers + 1)
    index = np.clip(np.digitize(d, edges[1:-1]), 0, n_layers - 1)
    layers = []
    for i in range(n_layers):  # far (small disparity) to near
        alpha = (index == i).astype(np.float64)
        if alpha.any():
            centre = d[index == i].mean()
            layers.append((image, alpha, float(coc_radius(centre, focus, max_radius))))
    return composite(layers)


def _read_disparity(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im if im.mode.startswith("I") else im.convert("L"), dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.render",
        description="Classical thin-lens bokeh: blur a photo by its disparity map, layer by layer.")
    p.add_argument("--image", type=Path, required=True, help="all-in-focus photo")
    p.add_argument("--disparity", type=Path, required=True,
                   help="disparity map (8- or 16-bit PNG, bright = near), same size as the photo")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.add_argument("--focus", type=float, default=None,
                   help="focus disparity in [0,1] after min-max normalisation (default: 99th pct)")
    p.add_argument("--max-radius", type=float, default=12.0,
                   help="blur radius in pixels at a normalised disparity difference of 1")
    p.add_argument("--layers", type=int, default=24, help="number of depth layers")
    args = p.parse_args(argv)

    try:
        image = load_rgb(args.image).astype(np.float64)
    except Exception as exc:
        print(f"error: {args.image}: cannot read image ({exc})", file=sys.stderr)
        return 2
    try:
        disparity = _read_disparity(args.disparity)
    except Exception as exc:
        print(f"error: {args.disparity}: cannot read disparity ({exc})", file=sys.stderr)
        return 2
    if image.shape[:2] != disparity.shape:
        print(f"error: {args.disparity}: size {disparity.shape[::-1]} differs from the photo's "
              f"{image.shape[1::-1]}", file=sys.stderr)
        return 2
    out = render_bokeh(image, disparity, args.focus, args.max_radius, args.layers)
    save_png(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
