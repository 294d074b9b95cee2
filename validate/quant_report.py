"""`validate quant-report`: what each TFLite variant costs in quality and gains in speed.

On held-out photos (never calibration ones) it measures, per variant of a fused export: PSNR and
SSIM of the bokeh output against the fp32 TFLite and against the PyTorch reference, the mask's
PSNR against fp32, file size and CPU latency (interleaved medians, one thread count). For int8 it
ranks layers by the QuantizationDebugger's error and tries selective configurations built from
that ranking; a configuration is kept (``bokeh_int8-selective.tflite``) only when it measurably
beats full int8. The table goes into docs/benchmarks.md between the ``bench:quant`` markers.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import read_json, write_bytes, write_json
from common.metrics import psnr, ssim_images
from export.manifest import write_manifest
from export.report import write_report
from export.runner import run_tflite
from export.variants import VARIANTS
from models.depth import DEPTH_SCOPES, depth_record_of

VARIANT_ORDER = tuple(v.name for v in VARIANTS)  # export/variants.py, the one table
LAYERNORM_STATS = ("MEAN", "SQUARED_DIFFERENCE", "RSQRT")
# bokeh PSNR floors against the fp32 TFLite: the manifests' (export/variants.py)
TARGETS_DB = {v.name: v.tolerance["bokeh"]["bokeh"]["min_psnr"] for v in VARIANTS
              if v.name != "fp32" and "min_psnr" in v.tolerance["bokeh"]["bokeh"]}
MIN_GAIN_DB = 1.0  # a selective configuration must beat full int8 by this much to be kept


@dataclass
class HeldOut:
    label: str
    photo: np.ndarray  # [1, H, W, 3]
    reference: dict[str, np.ndarray]  # PyTorch: bokeh, mask (NHWC)
    fp32: dict[str, np.ndarray]  # the fp32 TFLite's outputs


def run_outputs(path: Path, photo: np.ndarray) -> dict[str, np.ndarray]:
    return run_tflite(path, photo, threads=2)


def held_out_set(export_dir: Path, manifest: dict) -> list[HeldOut]:
    from calibration.dataset import held_out_images
    from models.reference import Reference

    reference = Reference(manifest)
    fp32 = export_dir / "bokeh_fp32.tflite"
    return [HeldOut(label, x, reference.run(x)["bokeh"], run_outputs(fp32, x))
            for label, x in held_out_images(manifest["height"], manifest["width"])]


def accuracy(path: Path, held: list[HeldOut]) -> dict:
    """Worst case over the held-out photos (a variant is as good as its worst photo)."""
    rows = []
    for h in held:
        got = run_outputs(path, h.photo)
        rows.append({"psnr_fp32": psnr(h.fp32["bokeh"][0], got["bokeh"][0]),
                     "ssim_fp32": ssim_images(h.fp32["bokeh"][0], got["bokeh"][0]),
                     "psnr_torch": psnr(h.reference["bokeh"][0], got["bokeh"][0]),
                     "ssim_torch": ssim_images(h.reference["bokeh"][0], got["bokeh"][0]),
                     "mask_psnr_fp32": psnr(h.fp32["mask"][0], got["mask"][0])})
    return {key: round(min(r[key] for r in rows), 4 if "ssim" in key else 2) for key in rows[0]}


def latency(paths: dict[str, Path], photo: np.ndarray, threads: int, runs: int) -> dict:
    from validate.runtime import tflite_engine, time_interleaved

    engines = {name: tflite_engine(path, threads) for name, path in paths.items()}
    stats = time_interleaved(engines, photo, runs=runs)
    return {name: {"median_s": round(s["median_s"], 4), "min_s": round(s["min_s"], 4)}
            for name, s in stats.items()}


def selective_search(export_dir: Path, manifest: dict, held: list[HeldOut], worst: int,
                     debug_samples: int = 8, echo=print) -> dict:
    """Per-layer int8 error, then full int8 against configurations that keep in float: the
    worst layers, LayerNorm statistics, the whole depth net. Measured on held-out photos."""
    from calibration.dataset import calibration_set
    from calibration.debug import ROUNDING_ONLY, layer_errors, selective_model
    from export.quantize import CALIBRATED

    int8 = read_json(export_dir / "bokeh_int8.manifest.json")
    record = int8["quantization"]["calibration"]
    folder = record["source"] if not record["source"].startswith("embedded") else None
    calib = calibration_set(manifest["height"], manifest["width"], debug_samples, folder,
                            record["seed"])  # the first samples of the calibration set
    if not (export_dir / CALIBRATED).is_file():
        raise UserError(f"{export_dir}: no {CALIBRATED}; export the int8 variant again")
    calibrated = (export_dir / CALIBRATED).read_bytes()
    echo(f"  per-layer error (QuantizationDebugger, {debug_samples} calibration samples) ...")
    errors = layer_errors(calibrated, calib.dataset)
    finite = [e for e in errors if np.isfinite(e.rmse_over_scale)]
    depth = [e.tensor for e in errors if _in_depth_net(e.tensor)]
    glue = [e.tensor for e in errors if _is_mask_glue(e.tensor)]
    decoder = [t for t in depth if "scratch." in t]
    head = [t for t in decoder if "scratch.output_conv" in t or "scratch.refinenet1" in t]
    candidates = {
        f"worst {worst // 4} layers float": {"denylisted_nodes": [e.tensor for e in
                                                                  errors[: worst // 4]]},
        f"worst {worst} layers float": {"denylisted_nodes": [e.tensor for e in errors[:worst]]},
        "LayerNorm statistics float": {"denylisted_ops": list(LAYERNORM_STATS)},
        "DPT head + mask normalisation float": {"denylisted_nodes": head + glue},
        "DPT decoder + mask normalisation float": {"denylisted_nodes": decoder + glue},
        "depth net (DPT) float": {"denylisted_nodes": depth},
    }
    tried = {"full int8": {"size": (export_dir / "bokeh_int8.tflite").stat().st_size,
                           **accuracy(export_dir / "bokeh_int8.tflite", held)}}
    scratch = export_dir / ".selective.tflite"
    for name, options in candidates.items():
        echo(f"  selective: {name} ...")
        write_bytes(scratch, selective_model(calibrated, **options))
        tried[name] = {"size": scratch.stat().st_size, **accuracy(scratch, held),
                       "kept_float": sum(len(v) for v in options.values())}
        if name == max(tried, key=lambda k: tried[k]["psnr_fp32"]):
            write_bytes(export_dir / ".selective-best.tflite", scratch.read_bytes())
    scratch.unlink(missing_ok=True)
    best = max(tried, key=lambda k: tried[k]["psnr_fp32"])
    gain = tried[best]["psnr_fp32"] - tried["full int8"]["psnr_fp32"]
    return {
        "layers_verified": len(errors),
        "layers_above_rounding": sum(e.rmse_over_scale > 2 * ROUNDING_ONLY for e in errors),
        "depth_share_of_error": round(
            sum(e.rmse_over_scale for e in finite if _in_depth_net(e.tensor))
            / max(1e-12, sum(e.rmse_over_scale for e in finite)), 3),
        "worst_layers": [{"tensor": e.tensor[-90:], "op": e.op,
                          "rmse_over_scale": round(e.rmse_over_scale, 3)} for e in errors[:10]],
        "configurations": tried, "best": best, "gain_db": round(gain, 2),
        "options": candidates.get(best, {}),
    }


def _is_mask_glue(tensor: str) -> bool:
    """Ops of the fused graph itself (resize, per-image min-max, concat, clip), outside the
    Keras depth net scope and the nested onnx-tf NAFNet call."""
    inner = tensor.split(";")[0].removeprefix("StatefulPartitionedCall/")
    return not _in_depth_net(tensor) and not inner.startswith("PartitionedCall")


def _in_depth_net(tensor: str) -> bool:
    """Whether a tensor of the fused graph is inside the Keras depth net (its model's name
    scope: models/depth.py)."""
    return any(scope in tensor for scope in DEPTH_SCOPES)


def keep_selective(export_dir: Path, search: dict, echo=print) -> Path | None:
    """Write ``bokeh_int8-selective.tflite`` with its manifest when it beats full int8."""
    best = export_dir / ".selective-best.tflite"
    if search["best"] == "full int8" or search["gain_db"] < MIN_GAIN_DB:
        best.unlink(missing_ok=True)
        return None
    dest = export_dir / "bokeh_int8-selective.tflite"
    os.replace(best, dest)
    base = read_json(export_dir / "bokeh_int8.manifest.json")
    options = {k: len(v) for k, v in search["options"].items()}
    report = read_json(export_dir / "report.json")
    report["variants"][dest.name] = write_manifest(dest, "int8-selective", base, {
        "quantization": {**base["quantization"],
                         "selective": {"configuration": search["best"], **options}}})
    write_report(export_dir, report)
    echo(f"  kept {dest.name}: {search['best']} (+{search['gain_db']} dB over full int8)")
    return dest


def measure(export_dir: Path, threads: int = 2, runs: int = 5, worst: int = 40,
            selective: bool = True, echo=print) -> dict:
    """Every variant's accuracy, size and latency; the int8 per-layer analysis."""
    manifest = read_json(export_dir / "bokeh_fp32.manifest.json")
    echo("Held-out photos through PyTorch and the fp32 TFLite ...")
    held = held_out_set(export_dir, manifest)
    search = None
    if selective and (export_dir / "bokeh_int8.tflite").is_file():
        search = selective_search(export_dir, manifest, held, worst, echo=echo)
        keep_selective(export_dir, search, echo)
    paths = {v: export_dir / f"bokeh_{v}.tflite" for v in VARIANT_ORDER
             if (export_dir / f"bokeh_{v}.tflite").is_file()}
    rows = {}
    for variant, path in paths.items():
        echo(f"  accuracy {path.name} ...")
        rows[variant] = {"size": path.stat().st_size, **accuracy(path, held)}
    echo(f"  latency, {threads} threads, {runs} interleaved rounds ...")
    load = os.getloadavg()[0]
    for variant, seconds in latency(paths, held[0].photo, threads, runs).items():
        rows[variant].update(seconds)
    report = read_json(export_dir / "report.json")
    unsupported = {name.removeprefix("bokeh_").removesuffix(".tflite"): v["unsupported"]
                   for name, v in report["variants"].items() if "unsupported" in v}
    return {"height": manifest["height"], "width": manifest["width"], "threads": threads,
            "load_before_timing": round(load, 1),
            "runs": runs, "held_out": [h.label for h in held], "variants": rows,
            "unsupported": unsupported, "selective": search, "manifest": manifest}


def markdown(result: dict, command: str) -> str:
    """The docs/benchmarks.md section: the table, then the int8 per-layer story."""
    from validate.doc import cpu_name

    m = result["manifest"]
    dpt = depth_record_of(m)
    small = " (the tiny test config)" if dpt["name"].endswith("-tiny") else ""
    weights = ("random NAFNet (seed {s}) and random {v}{t} (seed {s})".format(
        s=m["weights"]["random_seed"], v=dpt["name"], t=small)
        if m["weights"]["checkpoint"] is None and dpt["checkpoint"] is None
        else f"NAFNet {m['weights']['checkpoint']}, {dpt['name']} {dpt['checkpoint']}")
    lines = [
        f"## Quantized variants of the fused model, {result['height']}x{result['width']}",
        "",
        f"Command: `{command}`. Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{result['threads']} threads, TFLite with XNNPACK. Weights: {weights}; DPT input "
        f"{dpt['input_size'][0]}x{dpt['input_size'][1]}. Held-out photos (never calibrated on): "
        f"{', '.join(result['held_out'])}; each figure is the worst of them. Latency: median "
        f"and fastest of {result['runs']} interleaved runs; load average "
        f"{result['load_before_timing']} when timing began (a shared machine: the fastest run "
        "is the least disturbed).",
        "",
        "| variant | size MB | PSNR vs fp32 dB | SSIM vs fp32 | PSNR vs PyTorch dB | "
        "SSIM vs PyTorch | mask PSNR vs fp32 dB | median s | min s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["variants"]
    for variant, r in rows.items():
        vs32 = ("-", "-", "-") if variant == "fp32" else (
            f"{r['psnr_fp32']:.1f}", f"{r['ssim_fp32']:.4f}", f"{r['mask_psnr_fp32']:.1f}")
        lines.append(f"| {variant} | {r['size'] / 2**20:.2f} | {vs32[0]} | {vs32[1]} | "
                     f"{r['psnr_torch']:.1f} | {r['ssim_torch']:.4f} | {vs32[2]} | "
                     f"{r['median_s']:.3f} | {r['min_s']:.3f} |")
    for variant, why in result["unsupported"].items():
        lines.append(f"| {variant} | - | {why} | | | | | | |")
    lines += ["", "Targets: " + "; ".join(
        f"{v} >= {floor:g} dB vs fp32: "
        + (f"{'met' if rows[v]['psnr_fp32'] >= floor else 'NOT met'} "
           f"({rows[v]['psnr_fp32']:.1f} dB)" if v in rows else "no file")
        for v, floor in TARGETS_DB.items()) + "."]
    search = result["selective"]
    if search:
        lines += ["", "### int8: per-layer error and selective quantization", "",
                  f"QuantizationDebugger on the calibration set: {search['layers_verified']} "
                  f"quantized tensors, {search['layers_above_rounding']} with rmse/scale above "
                  f"twice the rounding-only 0.29; the depth net holds "
                  f"{100 * search['depth_share_of_error']:.0f}% of the summed rmse/scale. "
                  "Worst tensors:", "",
                  "| rmse/scale | op | tensor |", "|---|---|---|"]
        lines += [f"| {w['rmse_over_scale']} | {w['op']} | `...{w['tensor'][-60:]}` |"
                  for w in search["worst_layers"]]
        lines += ["", "| configuration (kept in float) | size MB | PSNR vs fp32 dB | "
                  "SSIM vs fp32 | mask PSNR vs fp32 dB |", "|---|---|---|---|---|"]
        for name, r in search["configurations"].items():
            lines.append(f"| {name} | {r['size'] / 2**20:.2f} | {r['psnr_fp32']:.1f} | "
                         f"{r['ssim_fp32']:.4f} | {r['mask_psnr_fp32']:.1f} |")
        kept = ("kept as `bokeh_int8-selective.tflite`" if search["gain_db"] >= MIN_GAIN_DB
                and search["best"] != "full int8" else
                f"not kept (gain below {MIN_GAIN_DB} dB)")
        lines += ["", f"Best: {search['best']} ({search['gain_db']:+.1f} dB over full int8), "
                  f"{kept}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "bokeh quant-report") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"example:\n  {prog} --export-dir build/export")
    p.add_argument("--export-dir", default="build/export", help="a fused export (%(default)s)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--worst", type=positive_int, default=40, help="layers kept float in the "
                   "largest worst-layers configuration (%(default)s)")
    p.add_argument("--no-selective", action="store_true", help="skip the int8 layer analysis")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update")
    args = p.parse_args(argv)
    from validate.doc import publish_section

    export_dir = Path(args.export_dir)

    def body() -> int:
        if not (export_dir / "bokeh_fp32.manifest.json").is_file():
            raise UserError(f"{export_dir}: no fused export (bokeh_fp32.manifest.json) here")
        result = measure(export_dir, args.threads, args.runs, args.worst,
                         not args.no_selective)
        command = "bokeh quant-report " + " ".join(argv if argv is not None else sys.argv[1:])
        section = markdown(result, command.strip())
        write_json(export_dir / "quant_report.json", {k: v for k, v in result.items()
                                                      if k != "manifest"})
        publish_section(args.doc, "quant", section)
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
