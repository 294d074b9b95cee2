"""`python -m tools.render PHOTO... --out DIR`: bokeh PNGs from the phone model or from PyTorch.

With ``--tflite`` (default ``build/export/bokeh_fp32.tflite``) the fused model computes the depth
mask itself; with ``--checkpoint`` the PyTorch reference pipeline (DPT + NAFNet) does, and then a
real depth net (``--dpt-weights``) is required, since a random one makes a meaningless render.
Photos of any size go in: each is fitted into the model's static size (scaled, reflect-padded) and
the output is mapped back to the photo's own size. ``--compare`` also writes one side-by-side PNG
per photo: input | disparity as a colour map | bokeh.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import ensure_writable_dir
from common.images import IMAGE_SUFFIXES, list_images, load_rgb
from export.tflite_stage import RUNTIMES
from tools.images import colorize, labelled_row, letterbox, save_png, unletterbox

DEFAULT_TFLITE = "build/export/bokeh_fp32.tflite"
# A photo -> (bokeh HxWx3, mask HxW), both in [0, 1], at the size the renderer was given.
RenderFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class TFLiteRenderer:
    """The fused phone model (photo in; bokeh and mask out) through the TFLite interpreter."""

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "litert"):
        from export.tflite_stage import make_interpreter
        from tools.inspect import dynamic_dims, open_tflite

        path = Path(path)
        probe = open_tflite(path)
        inputs, outputs = probe.get_input_details(), probe.get_output_details()
        names = {d["name"] for d in outputs}
        if len(inputs) == 1 and int(inputs[0]["shape"][-1]) == 4:
            raise UserError(f"{path}: is NAFNet alone (photo + depth mask in); render needs the "
                            "fused model that computes its own mask, e.g. bokeh_fp32.tflite")
        if len(inputs) != 1 or int(inputs[0]["shape"][-1]) != 3 or not {"bokeh",
                                                                       "mask"} <= names:
            raise UserError(f"{path}: not a fused bokeh model (expected one [1,H,W,3] input and "
                            f"outputs 'bokeh' and 'mask', found {sorted(names)})")
        dynamic = dynamic_dims(path)
        if dynamic:
            raise UserError(f"{path}: has a dynamic shape ({'; '.join(dynamic)}); render needs "
                            "the static size of an exported phone model")
        self.interpreter = make_interpreter(path, threads, runtime=runtime)
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        self.size = tuple(int(d) for d in self.input["shape"][1:3])
        self.label = path.name
        self.warnings = _manifest_warnings(path)

    def __call__(self, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.interpreter.set_tensor(self.input["index"], photo[None].astype(np.float32))
        self.interpreter.invoke()
        bokeh = self.interpreter.get_tensor(self.outputs["bokeh"])[0]
        mask = self.interpreter.get_tensor(self.outputs["mask"])[0, ..., 0]
        return np.clip(bokeh, 0.0, 1.0), mask


def _manifest_warnings(path: Path) -> list[str]:
    manifest = path.with_suffix(".manifest.json")
    if not manifest.is_file():
        return []
    from common.files import read_json

    return list(read_json(manifest).get("warnings", []))


class TorchRenderer:
    """The PyTorch reference pipeline: a NAFNet checkpoint and a MiDaS DPT file."""

    def __init__(self, checkpoint: str | Path, dpt_weights: str | Path | None = None,
                 allow_random_dpt: bool = False, size: tuple[int, int] | None = None,
                 dpt_short_side: int = 384):
        from models.dpt import DPT, random_dpt, tiny_dpt_config
        from models.nafnet import load_nafnet

        if dpt_weights is None and not allow_random_dpt:
            raise UserError("--checkpoint needs --dpt-weights (a MiDaS file such as "
                            "dpt_hybrid_384.pt): with a random depth net the render is "
                            "meaningless; --allow-random-dpt to render anyway")
        if dpt_short_side < 32 or dpt_short_side % 32:
            raise UserError(f"--dpt-short-side {dpt_short_side} must be a positive multiple of 32")
        self.nafnet = load_nafnet(checkpoint)
        if self.nafnet.config["in_channels"] != 4:
            raise UserError(f"{checkpoint}: NAFNet takes {self.nafnet.config['in_channels']} "
                            "channels; the bokeh pipeline feeds it photo + mask (4)")
        self.warnings = []
        if dpt_weights is not None:
            self.dpt = DPT.from_midas_checkpoint(dpt_weights)
        else:
            self.dpt = random_dpt(tiny_dpt_config("hybrid"), 0)
            self.warnings.append("RANDOM depth net (--allow-random-dpt): the mask and the "
                                 "render are meaningless")
        self.size = size  # None: each photo at its own size
        self.dpt_short_side = dpt_short_side
        self.label = f"PyTorch {Path(checkpoint).name}"

    def __call__(self, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from models.dpt import dpt_input_size
        from models.pipeline import BokehPipeline

        h, w = photo.shape[:2]
        pipeline = BokehPipeline(self.dpt, self.nafnet,
                                 dpt_input_size(h, w, self.dpt_short_side)).eval()
        x = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            bokeh, mask = pipeline(x)
        return bokeh[0].numpy().transpose(1, 2, 0), mask[0, 0].numpy()


def render(renderer: RenderFn, size: tuple[int, int] | None,
           rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Bokeh and mask of one photo at its own size, and how it was fitted to the model."""
    size = size or rgb.shape[:2]
    fitted, where = letterbox(rgb, *size)
    bokeh, mask = renderer(fitted)
    return unletterbox(bokeh, where), unletterbox(mask, where), where.describe(size)


def compare_image(rgb: np.ndarray, mask: np.ndarray, bokeh: np.ndarray, label: str,
                  height: int | None = None) -> np.ndarray:
    """input | disparity (inferno) | output, labelled."""
    return labelled_row([("input", rgb), ("disparity (DPT mask, inferno)", colorize(mask)),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.render",
        description="Render bokeh PNGs from the fused TFLite model or the PyTorch pipeline. "
                    "Photos of any size are fitted to the model's static size (scaled, "
                    "reflect-padded) and mapped back to their own size.")
    p.add_argument("photos", nargs="+", metavar="PHOTO",
                   help=f"photo files or folders ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--out", required=True, help="output folder: NAME_bokeh.png per photo")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tflite", help=f"fused bokeh_*.tflite (default {DEFAULT_TFLITE})")
    src.add_argument("--checkpoint", help="NAFNet checkpoint: render with PyTorch instead")
    p.add_argument("--dpt-weights", help="MiDaS DPT file for --checkpoint (dpt_hybrid_384.pt)")
    p.add_argument("--allow-random-dpt", action="store_true",
                   help="with --checkpoint and no --dpt-weights: random depth (meaningless)")
    p.add_argument("--size", help="PyTorch only: render at HEIGHTxWIDTH (default: each "
                                  "photo's own size)")
    p.add_argument("--compare", action="store_true",
                   help="also write NAME_compare.png: input | disparity | bokeh")
    p.add_argument("--panel-height", type=int, default=480,
                   help="height of each panel in the compare PNG (default %(default)s)")
    p.add_argument("--threads", type=int, help="TFLite threads (default: all cores)")
    p.add_argument("--runtime", choices=RUNTIMES, default="litert",
                   help="TFLite interpreter: litert (faster, newer XNNPACK) or tensorflow "
                        "(TF 2.15's own); the outputs agree (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tqdm import tqdm

    from common.errors import CheckpointError

    try:
        photos = collect_photos(args.photos)
        if args.checkpoint:
            renderer = TorchRenderer(args.checkpoint, args.dpt_weights, args.allow_random_dpt,
                                     parse_size(args.size))
        else:
            if args.size or args.dpt_weights or args.allow_random_dpt:
                raise UserError("--size, --dpt-weights and --allow-random-dpt go with "
                                "--checkpoint; a TFLite model has its own size and depth net")
            if not args.tflite and not Path(DEFAULT_TFLITE).is_file():
                raise UserError(f"{DEFAULT_TFLITE}: no such TFLite file; run `make export` "
                                "or give --tflite / --checkpoint")
            renderer = TFLiteRenderer(args.tflite or DEFAULT_TFLITE, args.threads, args.runtime)
        out = ensure_writable_dir(args.out)
    except (UserError, CheckpointError) as exc:
        print(f"render: error: {exc}", file=sys.stderr)
        return 2
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
