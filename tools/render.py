"""`python -m tools.render PHOTO... --out DIR`: bokeh PNGs from the phone model or from PyTorch.

With ``--tflite`` (default ``build/export/bokeh_fp32.tflite``) the fused model computes the depth
mask itself; with ``--checkpoint`` the PyTorch reference pipeline (depth net + NAFNet) does, and
then a real depth net (``--depth-weights``, ``--depth`` to name it) is required, since a random one
makes a meaningless render.
Photos of any size go in: each is fitted into the model's static size (scaled, reflect-padded) and
the output is mapped back to the photo's own size. ``--compare`` also writes one side-by-side PNG
per photo: input | disparity as a colour map | bokeh.

The controls (issue #14) need the controls model (``bokeh export --controls``; default
``build/export/bokeh_controls_fp32.tflite`` when one is asked for): ``--focus-at X,Y`` runs the
model once, reads its mask at photo pixel (X, Y) (through the letterbox placement) and renders
with that ``focus``, as an app does with a tap; ``--strength S`` sets the blur strength;
``--focus-sweep N`` writes a strip of N renders from far (focus 0) to near (focus 1) focus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.cli import positive_int, run_command, unit_float
from common.errors import UserError
from common.files import ensure_writable_dir
from common.images import IMAGE_SUFFIXES, image_size, list_images, load_rgb, save_png, to_uint8
from common.limits import check_memory
from common.ownership import claim, record, written_here
from export.runner import RUNTIMES
from tools.images import colorize, labelled_row
from validate.renderers import TFLiteRenderer, TorchRenderer, focus_at, render

DEFAULT_TFLITE = "build/export/bokeh_fp32.tflite"
DEFAULT_CONTROLS_TFLITE = "build/export/bokeh_controls_fp32.tflite"


def compare_image(rgb: np.ndarray, mask: np.ndarray, bokeh: np.ndarray, label: str,
                  height: int | None = None, mask_label: str = "disparity (depth mask, inferno)",
                  ) -> np.ndarray:
    """input | disparity (inferno; an HxWx3 ``mask`` is a picture already) | output, labelled."""
    return labelled_row([("input", rgb), (mask_label, mask if mask.ndim == 3 else colorize(mask)),
                         (f"bokeh: {label}", bokeh)], height=height)


def mark_point(image: np.ndarray, x: int, y: int) -> np.ndarray:
    """``image`` (HxWx3 in [0, 1]) with a ring around pixel (x, y): white inside black, so it
    shows on any colour."""
    h, w = image.shape[:2]
    radius = max(4, min(h, w) // 30)
    pil = Image.fromarray(to_uint8(image))
    draw = ImageDraw.Draw(pil)
    for r, colour, width in ((radius + 2, (0, 0, 0), 3), (radius, (255, 255, 255), 2)):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
    draw.point((x, y), fill=(255, 255, 255))
    return np.asarray(pil, dtype=np.float32) / 255.0


def sweep_focuses(count: int) -> list[float]:
    """``count`` focus values from far (0) to near (1), evenly spaced."""
    return [i / (count - 1) for i in range(count)]


def sweep_image(mask: np.ndarray, panels: list[tuple[float, np.ndarray]],
                height: int | None = None) -> np.ndarray:
    """One labelled strip: the depth mask, then the renders, far focus first, near last."""
    last = len(panels) - 1
    return labelled_row([("mask (bright = near)", colorize(mask))] + [
        (f"focus {f:.2f}" + (" (far)" if i == 0 else " (near)" if i == last else ""), bokeh)
        for i, (f, bokeh) in enumerate(panels)], height=height)


def pixel_xy(text: str) -> tuple[int, int]:
    """argparse type: ``X,Y``, two integers >= 0 (a pixel, x from the left, y from the top)."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not X,Y (two integers: pixel column and row, e.g. 120,80)") from None
    if x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: X and Y must be >= 0")
    return x, y


def sweep_count(text: str) -> int:
    """argparse type: how many renders a focus sweep has, an integer >= 2."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a sweep needs at least 2 renders")
    return value


def check_focus_point(point: tuple[int, int], photos: list[Path]) -> None:
    """Refuse up front an X,Y outside any of the photos."""
    x, y = point
    for path in photos:
        h, w = load_rgb(path).shape[:2]
        if x >= w or y >= h:
            raise UserError(f"--focus-at {x},{y} is outside {path.name} ({w}x{h}: X in "
                            f"0..{w - 1}, Y in 0..{h - 1})")


def collect_photos(items: list[str]) -> list[Path]:
    """Files as given, folders expanded (without the renders this tool wrote into them); every
    photo is checked before any rendering."""
    photos: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            ours = written_here(path)
            kept = [p for p in list_images(path) if p.name not in ours]
            if not kept:
                raise UserError(f"{path}: holds only renders this tool wrote; give the photos")
            photos.extend(kept)
        else:
            photos.append(path)
    stems: dict[str, Path] = {}
    for path in photos:
        load_rgb(path)  # missing, grayscale, RGBA, corrupt: UserError naming the file
        if path.stem in stems:
            raise UserError(f"{path}: same name as {stems[path.stem]}; outputs would collide")
        stems[path.stem] = path
    return photos


def output_names(photo: Path, args: argparse.Namespace) -> list[str]:
    """The files a render of ``photo`` writes into ``--out``."""
    return [f"{photo.stem}_{kind}.png" for kind, wanted in (
        ("bokeh", True), ("compare", args.compare), ("sweep", args.focus_sweep)) if wanted]


def check_outputs(photos: list[Path], out: Path, args: argparse.Namespace) -> None:
    """Before any work: the render writes only names it owns, never among an export's files,
    and never over one of its own inputs."""
    from export.folder import export_around

    inside = export_around(out)
    if inside is not None:
        raise UserError(f"{out}: is inside the export folder {inside}; render into a folder of "
                        "its own (e.g. renders)")
    outputs = {(out / name).resolve(): photo for photo in photos
               for name in output_names(photo, args)}
    for photo in photos:
        if photo.resolve() in outputs:
            raise UserError(f"{photo}: is an input, and the render of {outputs[photo.resolve()]} "
                            "would overwrite it; choose another --out")
    claim(out, [p.name for p in outputs], args.overwrite)


def check_render_memory(renderer, photos: list[Path], args: argparse.Namespace) -> None:
    """Before any rendering: the largest photo's arrays fit in memory (a sweep keeps its N
    renders until the strip is drawn), and so does a PyTorch pipeline at the size it runs."""
    h, w = max(map(image_size, photos), key=lambda s: s[0] * s[1])
    sweep = args.focus_sweep or 0
    # photo, bokeh, mask, compare panels (float32, 3 channels), plus the sweep's renders
    estimate = 12 * h * w * (4 + 2 * sweep)
    if isinstance(renderer, TorchRenderer):
        from models.depth import activation_bytes, depth_input_size
        from models.nafnet import activation_bytes as nafnet_bytes

        h, w = renderer.size or (h, w)
        estimate += nafnet_bytes(renderer.nafnet.config, h, w) + activation_bytes(
            renderer.net.name, *depth_input_size(renderer.net.name, h, w, renderer.short_side))
    what = (f"--focus-sweep {sweep} of {photos[0].name if len(photos) == 1 else 'a photo'}"
            if sweep else f"rendering at {h}x{w}")
    check_memory(what, estimate, "choose a smaller --focus-sweep" if sweep
                 else "choose a smaller --size or photo")


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
               f"  {prog} photos/ --tflite build/export/bokeh_fp16.tflite --out renders\n"
               f"  {prog} photo.jpg --focus-at 320,200 --strength 0.7 --compare --out renders\n"
               f"  {prog} photo.jpg --focus-sweep 5 --out renders")
    p.add_argument("photos", nargs="+", metavar="PHOTO",
                   help=f"photo files or folders ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--out", required=True, help="output folder: NAME_bokeh.png per photo")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the output names in --out even if this tool did not "
                        "write them")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tflite", help=f"fused bokeh_*.tflite (default {DEFAULT_TFLITE}; with "
                                      f"the controls {DEFAULT_CONTROLS_TFLITE})")
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
                   help="also write NAME_compare.png: input | disparity | bokeh (with "
                        "--focus-at: the focus point marked on the disparity)")
    ctl = p.add_argument_group(
        "controls", "focus and blur strength, chosen at run time: need the controls model "
                    f"(bokeh export --controls); default --tflite {DEFAULT_CONTROLS_TFLITE}")
    ctl.add_argument("--focus-at", type=pixel_xy, metavar="X,Y",
                     help="keep the depth at photo pixel X,Y sharp: its mask value becomes "
                          "focus (x from the left, y from the top, in the photo's own pixels)")
    ctl.add_argument("--strength", type=unit_float, metavar="S",
                     help="blur strength in [0, 1]: 0 the photo, 1 the full bokeh (default 1)")
    ctl.add_argument("--focus-sweep", type=sweep_count, metavar="N",
                     help="also write NAME_sweep.png: the mask, then N renders, focus 0 (far) "
                          "... 1 (near)")
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
    check_outputs(photos, Path(args.out), args)
    controlled = any(v is not None for v in (args.focus_at, args.strength, args.focus_sweep))
    if args.focus_at is not None:
        check_focus_point(args.focus_at, photos)
    if args.checkpoint:
        renderer = TorchRenderer(args.checkpoint, args.depth_weights, args.allow_random_depth,
                                 parse_size(args.size), depth=args.depth)
    else:
        if args.size or args.depth or args.depth_weights or args.allow_random_depth:
            raise UserError("--size, --depth, --depth-weights and --allow-random-depth go with "
                            "--checkpoint; a TFLite model has its own size and depth net")
        default = DEFAULT_CONTROLS_TFLITE if controlled else DEFAULT_TFLITE
        if not args.tflite and not Path(default).is_file():
            how = "bokeh export --controls" if controlled else "make export"
            raise UserError(f"{default}: no such TFLite file; run `{how}` or give --tflite / "
                            "--checkpoint")
        renderer = TFLiteRenderer(args.tflite or default, args.threads, args.runtime)
        if controlled and not renderer.has_controls:
            raise UserError(f"{renderer.label}: takes no focus or strength (a plain model); "
                            "--focus-at, --strength and --focus-sweep need the controls model, "
                            "e.g. bokeh_controls_fp32.tflite (bokeh export --controls)")
    check_render_memory(renderer, photos, args)
    out = ensure_writable_dir(args.out)
    for w in renderer.warnings:
        print(f"WARNING: {w}")
    print(f"Rendering {len(photos)} photo(s) with {renderer.label} to {out}/")
    for path in tqdm(photos, unit="photo", disable=len(photos) < 2):
        rgb = load_rgb(path)
        height = min(args.panel_height, rgb.shape[0])
        focus = (None if args.focus_at is None
                 else focus_at(renderer, renderer.size, rgb, *args.focus_at))
        controls = {"focus": focus, "strength": args.strength} if controlled else {}
        bokeh, mask, how = render(renderer, renderer.size, rgb, **controls)
        written = [save_png(out / f"{path.stem}_bokeh.png", bokeh)]
        if args.compare:
            label, mask_label, mask_panel = renderer.label, "disparity (DPT mask, inferno)", mask
            if controlled:
                shown = {k: 1.0 if v is None else v for k, v in controls.items()}
                label = f"focus {shown['focus']:.2f}, strength {shown['strength']:g}"
            if args.focus_at is not None:
                mask_panel = mark_point(colorize(mask), *args.focus_at)
                mask_label = f"mask {focus:.2f} at ({args.focus_at[0]},{args.focus_at[1]})"
            written.append(save_png(out / f"{path.stem}_compare.png", compare_image(
                rgb, mask_panel, bokeh, label, height, mask_label)))
        if args.focus_sweep:
            panels = [(f, render(renderer, renderer.size, rgb, focus=f,
                                 strength=args.strength)[0])
                      for f in sweep_focuses(args.focus_sweep)]
            written.append(save_png(out / f"{path.stem}_sweep.png",
                                    sweep_image(mask, panels, height)))
        record(out, written)
        text = "" if focus is None else f", focus {focus:.3f} at {args.focus_at}"
        tqdm.write(f"  {path.name} ({how}{text}) -> {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
