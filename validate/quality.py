"""`validate quality`: PSNR, SSIM (and the LPIPS column) on a paired folder, as in the paper.

A paired folder has the EBB! layout: ``DIR/original/NAME.jpg`` (all-in-focus) and
``DIR/bokeh/NAME.jpg`` (the lens's bokeh), paired by file stem. Every row renders each original,
maps the result back to the original's size, and scores it against the bokeh photo there:
- "Identity (input)": the original itself (what doing nothing scores);
- "Classical (thin-lens)": the trainer's physically based renderer (train/render.py) driven by
  the PyTorch depth net's mask: a non-learned baseline;
- "PyTorch": the reference pipeline (DPT + NAFNet);
- one row per TFLite variant given.
SSIM follows docs/design.md, section 5 (11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2);
LPIPS (AlexNet, v0.1) is computed only from local weight files (models/lpips.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.images import IMAGE_SUFFIXES, load_rgb, resize
from common.metrics import psnr, ssim_images

LPIPS_UNAVAILABLE = "LPIPS: unavailable (no --lpips-weights)"


def list_pairs(data: str | Path, limit: int | None = None) -> list[tuple[str, Path, Path]]:
    """(stem, original, bokeh) for every stem present in both ``original/`` and ``bokeh/``."""
    data = Path(data)
    folders = {}
    for name in ("original", "bokeh"):
        folder = data / name
        if not folder.is_dir():
            raise UserError(f"{data}: no '{name}/' folder (expected the EBB! layout "
                            "DIR/original/*.jpg and DIR/bokeh/*.jpg)")
        files = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                if p.stem in files:
                    raise UserError(f"{p}: two files named {p.stem} in {folder}")
                files[p.stem] = p
        folders[name] = files
    stems = sorted(set(folders["original"]) & set(folders["bokeh"]), key=_natural)
    if not stems:
        raise UserError(f"{data}: no pairs (no file stem in both original/ and bokeh/)")
    stems = stems[:limit] if limit else stems
    return [(s, folders["original"][s], folders["bokeh"][s]) for s in stems]


def _natural(stem: str) -> tuple:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def classical_render(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The trainer's thin-lens layered renderer, with the depth mask as disparity."""
    from train.render import render_bokeh

    return np.clip(render_bokeh(rgb, mask), 0.0, 1.0).astype(np.float32)


def evaluate(
    data: str | Path,
    tflites: Sequence[str | Path] = (),
    checkpoint: str | Path | None = None,
    depth_weights: str | Path | None = None,
    allow_random_depth: bool = False,
    limit: int | None = None,
    lpips_weights: Sequence[str | Path] | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Score every row on every pair; the result holds per-row means and per-pair numbers."""
    from tqdm import tqdm

    from validate.renderers import ReferenceRenderer, TFLiteRenderer, TorchRenderer, render

    pairs = list_pairs(data, limit)
    lpips = None
    if lpips_weights:
        from models.lpips import load_lpips

        lpips = load_lpips(lpips_weights)
    for _, original, bokeh in pairs:  # every file checked before the long work
        load_rgb(original), load_rgb(bokeh)
    if tflites:
        reference = ReferenceRenderer(tflites[0], checkpoint)
    elif checkpoint:
        reference = TorchRenderer(checkpoint, depth_weights, allow_random_depth)
    else:
        raise UserError("nothing to score: give --checkpoint and/or --tflite")
    engines = [TFLiteRenderer(t) for t in tflites]
    for w in reference.warnings:
        echo(f"WARNING: {w}")
    rows = ["Identity (input)", "Classical (thin-lens)", reference.label,
            *[f"TFLite {e.label}" for e in engines]]
    scores: dict[str, list[tuple[float, float, float]]] = {r: [] for r in rows}
    resized = 0
    for _, original_path, bokeh_path in tqdm(pairs, unit="pair", disable=not progress):
        rgb, target = load_rgb(original_path), load_rgb(bokeh_path)
        if rgb.shape != target.shape:
            resized += 1
            rgb = resize(rgb, *target.shape[:2])
        ref_bokeh, mask, _ = render(reference, reference.size, rgb)
        outputs = [rgb, classical_render(rgb, mask), ref_bokeh]
        outputs += [render(e, e.size, rgb)[0] for e in engines]
        for row, out in zip(rows, outputs, strict=True):
            scores[row].append((psnr(target, out), ssim_images(target, out),
                                lpips.distance(target, out) if lpips else math.nan))
    result = {"data": str(data), "pairs": len(pairs), "resized_originals": resized,
              "lpips": (f"LPIPS: AlexNet v0.1 from {', '.join(map(str, lpips_weights))}"
                        if lpips else LPIPS_UNAVAILABLE), "rows": []}
    for row in rows:
        values = np.array(scores[row])
        result["rows"].append({
            "model": row, "psnr": float(values[:, 0].mean()), "ssim": float(values[:, 1].mean()),
            "lpips": float(values[:, 2].mean()) if lpips else None,
            "per_pair": [{"psnr": float(p), "ssim": float(s)} | (
                {"lpips": float(d)} if lpips else {}) for p, s, d in values]})
    return result


def format_table(result: dict) -> str:
    """Markdown table in the paper's layout: Model | PSNR | SSIM | LPIPS."""
    lines = [f"Quality on {result['data']} ({result['pairs']} pairs, scored at the bokeh "
             "photos' size)", "",
             "| Model | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        lpips = "n/a" if row["lpips"] is None else f"{row['lpips']:.4f}"
        lines.append(f"| {row['model']} | {row['psnr']:.2f} | {row['ssim']:.4f} | {lpips} |")
    lines += ["", result["lpips"]]
    if result["resized_originals"]:
        lines.append(f"{result['resized_originals']} originals differed in size from their "
                     "bokeh photo and were resized to it")
    return "\n".join(lines)
