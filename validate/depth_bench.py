"""The depth-net table of `make bench` (`bokeh bench --depth-table` alone): every official depth
net of models/depth.py fused with NAFNet at the export size, side by side.

Per net, one export (fp32, fp16; NAFNet is converted once and reused by the others), then:
- the depth net's work: GFLOP of the fused .tflite's convs and matmuls minus NAFNet alone's
  (validate/profile.py), its parameters, the fused fp32 and fp16 file sizes;
- latency, one interleaved group per net at ``threads`` threads: NAFNet alone's TFLite, the fused
  TFLite in both interpreters (TF 2.15's and LiteRT) and the PyTorch reference pipeline with the
  same net, on the same photo;
- the verdict against issue #11's targets (LiteRT: fused midas-small <= 1.25x NAFNet alone,
  fused depth-anything-v2-small <= 1.8x; every fused model <= 0.5x its PyTorch reference);
- parity of the fp32 and fp16 files on real photos against the PyTorch reference pipeline.
Every run uses random weights (the latency does not depend on them; the export says so).
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.files import read_json
from export.runner import RUNTIMES, runtime_label

NETS = ("dpt-hybrid", "midas-small", "depth-anything-v2-small")
TARGET_VS_NAFNET = {"midas-small": 1.25, "depth-anything-v2-small": 1.8}  # LiteRT
TARGET_VS_TORCH = 0.5
VERDICT_RUNTIME = "litert"
PAUSE_S = 0.5  # idle gap before each timed call (validate.runtime.time_interleaved)


def ensure_depth_exports(root: Path, height: int, width: int, nets: tuple[str, ...] = NETS,
                         echo: Callable[[str], None] = print) -> dict[str, Path]:
    """``root/NAME`` holding a fused export of each net at this size (fp32, fp16), exporting
    what is missing; NAFNet's conversion is done once and reused."""
    from export.pipeline import NAFNET_ARTIFACTS, ExportOptions, export
    from models.depth import depth_record_of

    folders: dict[str, Path] = {}
    source = None
    for name in nets:
        out = root / name
        path = out / "bokeh_fp32.manifest.json"
        manifest = read_json(path) if path.is_file() else None
        done = (manifest is not None and (manifest["height"], manifest["width"]) == (height, width)
                and depth_record_of(manifest)["name"] == name
                and all((out / f).is_file() for f in ("bokeh_fp16.tflite", "nafnet_fp32.tflite")))
        if done:
            echo(f"{name}: reusing the {height}x{width} export in {out}")
        else:
            echo(f"{name}: exporting at {height}x{width} to {out}"
                 + (f" (NAFNet reused from {source})" if source else ""))
            export(ExportOptions(out, height, width, depth=name, overwrite=True,
                                 reuse_nafnet=source), echo=echo)
        folders[name] = out
        if source is None and all((out / a).exists() for a in NAFNET_ARTIFACTS):
            source = out
    return folders


def conv_gflop(path: Path) -> float:
    """GFLOP (2 x multiply-adds) of a .tflite's convs, matmuls and fully connected ops."""
    from validate.profile import op_costs

    return 2 * sum(row["macs"] for row in op_costs(path)) / 1e9


def time_net(folder: Path, name: str, threads: int, runs: int,
             echo: Callable[[str], None] = print) -> dict[str, dict]:
    """One interleaved group: NAFNet alone and the fused fp32 file in each interpreter, and the
    PyTorch reference pipeline with the same net, on one seeded photo."""
    from models.reference import BokehOutput, reference_pipeline
    from validate.runtime import tflite_engine, time_interleaved, torch_engine

    manifest = read_json(folder / "bokeh_fp32.manifest.json")
    height, width = manifest["height"], manifest["width"]
    rng = np.random.default_rng(0)
    photo = rng.random((1, height, width, 3), dtype=np.float32)
    with_mask = np.concatenate([photo, rng.random((1, height, width, 1), dtype=np.float32)], -1)

    def on_mask_input(run):
        return lambda _photo: run(with_mask)

    engines = {}
    for runtime in RUNTIMES:
        engines[f"nafnet/{runtime}"] = on_mask_input(
            tflite_engine(folder / "nafnet_fp32.tflite", threads, runtime=runtime))
    for runtime in RUNTIMES:
        engines[f"fused/{runtime}"] = tflite_engine(folder / "bokeh_fp32.tflite", threads,
                                                    runtime=runtime)
    engines["torch"] = torch_engine(BokehOutput(reference_pipeline(manifest)), threads)
    echo(f"{name}: {len(engines)} engines, {runs} interleaved round(s) after one warm-up, "
         f"{threads} threads ...")
    load = os.getloadavg()[0]
    stats = time_interleaved(engines, photo, runs=runs, pause_s=PAUSE_S,
                             progress=lambda s: echo(f"  {s}"))
    del engines
    gc.collect()
    return stats, round(max(load, os.getloadavg()[0]), 1)


def parity_rows(folder: Path, photos: Path, echo: Callable[[str], None] = print) -> list[dict]:
    """Worst mask and bokeh figures of the fp32 and fp16 files on the photos (TFLite only)."""
    from validate.parity import run_parity

    rows = []
    for variant in ("fp32", "fp16"):
        echo(f"  parity of {folder.name}/bokeh_{variant}.tflite on {photos} ...")
        result = run_parity(folder / f"bokeh_{variant}.tflite", images=photos, tflite_only=True,
                            echo=lambda s: None)
        for stage in result["stages"]:
            by_output = {name: [r for r in stage["inputs"] if r["output"] == name]
                         for name in stage["tolerance"]}
            rows.append({
                "variant": stage["stage"].replace("tflite-", ""), "passed": stage["passed"],
                "mask_max_abs": max(r["max_abs_diff"] for r in by_output["mask"]),
                "mask_psnr": min(r["psnr_db"] for r in by_output["mask"]),
                "bokeh_max_abs": max(r["max_abs_diff"] for r in by_output["bokeh"]),
                "bokeh_psnr": min(r["psnr_db"] for r in by_output["bokeh"]),
                "tolerance": "; ".join(f"{o} " + ", ".join(f"{k} {v:g}" for k, v in t.items())
                                       for o, t in stage["tolerance"].items())})
    return rows


def measure(root: Path, height: int, width: int, threads: int = 2, runs: int = 1,
            photos: Path | None = None, nets: tuple[str, ...] = NETS,
            echo: Callable[[str], None] = print) -> dict:
    """Export (if needed), count, time and check every net; the data of the table."""
    from models.depth import depth_record_of

    folders = ensure_depth_exports(root, height, width, nets, echo)
    first = folders[nets[0]]
    result = {"height": height, "width": width, "threads": threads, "runs": runs, "nets": {},
              "nafnet": {"gflop": conv_gflop(first / "nafnet_fp32.tflite"),
                         "params": _nafnet_params(first),
                         "fp32_bytes": (first / "nafnet_fp32.tflite").stat().st_size,
                         "fp16_bytes": (first / "nafnet_fp16.tflite").stat().st_size}}
    for name, folder in folders.items():
        manifest = read_json(folder / "bokeh_fp32.manifest.json")
        depth = depth_record_of(manifest)
        stats, load = time_net(folder, name, threads, runs, echo)
        entry = {
            "folder": str(folder), "input_size": depth["input_size"], "params": depth["params"],
            "normalisation": depth["normalisation"], "weights": depth["checkpoint"]
            or f"random (seed {depth['random_seed']})",
            "gflop": conv_gflop(folder / "bokeh_fp32.tflite") - result["nafnet"]["gflop"],
            "fp32_bytes": (folder / "bokeh_fp32.tflite").stat().st_size,
            "fp16_bytes": (folder / "bokeh_fp16.tflite").stat().st_size,
            "median_s": {k: v["median_s"] for k, v in stats.items()}, "load_average": load,
            "interpreters_max_abs": float(np.abs(stats["fused/tensorflow"]["output"]
                                                 - stats["fused/litert"]["output"]).max()),
        }
        if photos is not None:
            entry["parity"] = parity_rows(folder, photos, echo)
        result["nets"][name] = entry
    return result


def _nafnet_params(folder: Path) -> int:
    """NAFNet's parameter count, from its PyTorch model (the manifest's config and weights)."""
    from models.reference import reference_model

    model = reference_model(read_json(folder / "nafnet_fp32.manifest.json"))
    return sum(p.numel() for p in model.parameters())


def verdicts(result: dict) -> list[str]:
    """One line per target: met or MISSED, with the numbers."""
    label = runtime_label(VERDICT_RUNTIME)
    lines = []
    for name, e in result["nets"].items():
        t = e["median_s"]
        fused, nafnet = t[f"fused/{VERDICT_RUNTIME}"], t[f"nafnet/{VERDICT_RUNTIME}"]
        if name in TARGET_VS_NAFNET:
            target = TARGET_VS_NAFNET[name]
            ratio = fused / nafnet
            lines.append(f"- {name}: fused {ratio:.2f}x NAFNet alone in {label} ({fused:.3f} s "
                         f"vs {nafnet:.3f} s), target <= {target}x: "
                         f"{'met' if ratio <= target else '**MISSED**'}")
        for runtime in RUNTIMES:
            ratio = t[f"fused/{runtime}"] / t["torch"]
            lines.append(f"- {name}: fused {ratio:.2f}x its PyTorch reference pipeline in "
                         f"{runtime_label(runtime)} ({t[f'fused/{runtime}']:.3f} s vs "
                         f"{t['torch']:.3f} s), target <= {TARGET_VS_TORCH}x: "
                         f"{'met' if ratio <= TARGET_VS_TORCH else '**MISSED**'}")
    return lines


def markdown(result: dict, command: str) -> str:
    from validate.doc import cpu_name

    h, w, threads = result["height"], result["width"], result["threads"]
    tf_label, lite_label = (runtime_label(r) for r in RUNTIMES)
    n = result["nafnet"]
    lines = [
        f"## Depth nets fused with NAFNet, {h}x{w}, {threads} threads", "",
        f"Command: `{command}`. Machine: {cpu_name()}, {_cores()} cores. Random weights "
        "(NAFNet and depth nets, seed 0; the latency does not depend on them). Per net one "
        f"interleaved group ({result['runs']} timed round after one warm-up, {PAUSE_S} s idle "
        "before each call): NAFNet alone's TFLite and the fused TFLite (fp32, XNNPACK) in "
        f"both interpreters ({tf_label}; {lite_label}), and the PyTorch reference pipeline "
        "with the same net (eager, fp32). GFLOP: 2 x the multiply-adds of the convs and "
        "matmuls in the fused .tflite minus NAFNet alone's (`validate/profile.py`). Sizes: "
        "the whole fused file. Load average (1 min) around each group: "
        + ", ".join(f"{n} {e['load_average']}" for n, e in result["nets"].items())
        + f" (on {_cores()} cores: other jobs shared the machine when it is above that).", "",
        "| model | depth input | params M | GFLOP | fp32 MB | fp16 MB | TF 2.15 s | LiteRT s "
        "| PyTorch ref s | LiteRT vs NAFNet alone | LiteRT vs PyTorch ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nafnet_t = {r: statistics.median(e["median_s"][f"nafnet/{r}"]
                                     for e in result["nets"].values()) for r in RUNTIMES}
    lines.append(f"| NAFNet alone (median over the groups) | - | {n['params'] / 1e6:.2f} | "
                 f"{n['gflop']:.1f} | {n['fp32_bytes'] / 1e6:.1f} | {n['fp16_bytes'] / 1e6:.1f} "
                 f"| {nafnet_t['tensorflow']:.3f} | {nafnet_t['litert']:.3f} | - | 1.00x | - |")
    for name, e in result["nets"].items():
        t = e["median_s"]
        ih, iw = e["input_size"]
        lines.append(
            f"| fused {name} | {ih}x{iw} | {e['params'] / 1e6:.2f} | {e['gflop']:.1f} | "
            f"{e['fp32_bytes'] / 1e6:.1f} | {e['fp16_bytes'] / 1e6:.1f} | "
            f"{t['fused/tensorflow']:.3f} | {t['fused/litert']:.3f} | {t['torch']:.3f} | "
            f"{t['fused/litert'] / t['nafnet/litert']:.2f}x | "
            f"{t['fused/litert'] / t['torch']:.2f}x |")
    lines += ["", "NAFNet alone (`nafnet_fp32.tflite`, photo + mask in) in each net's group, "
              "the denominator of that net's ratio:", "",
              "| group | NAFNet alone, TF 2.15 s | NAFNet alone, LiteRT s |", "|---|---|---|"]
    for name, e in result["nets"].items():
        t = e["median_s"]
        lines.append(f"| {name} | {t['nafnet/tensorflow']:.3f} | {t['nafnet/litert']:.3f} |")
    worst = max(e["interpreters_max_abs"] for e in result["nets"].values())
    lines += ["", f"The two interpreters on the same fused file and photo: max abs diff "
              f"{worst:.1e} (bokeh).", "", "Verdict (issue #11 targets):", "", *verdicts(result)]
    if any("parity" in e for e in result["nets"].values()):
        lines += ["", "Parity on real photos (astronaut, chelsea, coffee, motorcycle_left, "
                  "rocket; scikit-image, fitted to the export size), TFLite against the PyTorch "
                  "reference pipeline with the same net (worst over the photos):", "",
                  "| net | file | mask max abs | mask PSNR dB | bokeh max abs | bokeh PSNR dB | "
                  "tolerance | verdict |", "|---|---|---|---|---|---|---|---|"]
        for name, e in result["nets"].items():
            for r in e.get("parity", []):
                lines.append(f"| {name} | {r['variant']} | {r['mask_max_abs']:.1e} | "
                             f"{r['mask_psnr']:.1f} | {r['bokeh_max_abs']:.1e} | "
                             f"{r['bokeh_psnr']:.1f} | {r['tolerance']} | "
                             f"{'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def _cores() -> int:
    return os.cpu_count() or 0
