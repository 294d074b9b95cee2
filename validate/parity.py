"""Parity: does every exported stage compute what the PyTorch model computes?

The manifest beside a .tflite names the model, its weights and every earlier artifact, so one
command checks the whole lane: for each stage whose artifact is still on disk, it runs the same
inputs through that engine and the PyTorch reference and reports, per input, the largest and mean
absolute difference and the PSNR. Checks go in the order names -> shapes -> values (like Hugging
Face Optimum's validate_model_outputs), and a failure names the stage and the largest difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.io import UserError, fit_to_size, list_images, load_rgb, read_json
from models.nafnet import load_nafnet, random_nafnet

FP32_ATOL = 1e-4
PSNR_CAP = 200.0  # reported when outputs are identical (infinite PSNR does not fit in JSON)

Runner = Callable[[np.ndarray], np.ndarray]  # NHWC [1,H,W,C] in, NHWC out


@dataclass
class ParityInput:
    label: str
    value: np.ndarray  # NHWC float32 [1, H, W, C]


def read_manifest(tflite: str | Path) -> tuple[dict, Path]:
    """The manifest written next to a .tflite by the export, and the folder it lives in."""
    tflite = Path(tflite)
    if not tflite.is_file():
        raise UserError(f"{tflite}: no such TFLite file")
    manifest_path = tflite.with_suffix(".manifest.json")
    if not manifest_path.is_file() and tflite.stem.endswith("_flex"):
        manifest_path = tflite.with_name(tflite.stem.removesuffix("_flex") + ".manifest.json")
    if not manifest_path.is_file():
        raise UserError(f"{tflite}: no manifest ({manifest_path.name}) beside it; "
                        "was it written by bokeh-export?")
    manifest = read_json(manifest_path)
    for key in ("model", "inputs", "outputs", "stages"):
        if key not in manifest:
            raise UserError(f"{manifest_path}: manifest has no '{key}' entry")
    return manifest, manifest_path.parent


def reference_model(manifest: dict, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """The PyTorch model the export came from: --checkpoint, else the manifest's weights."""
    if manifest["model"] != "nafnet":
        raise UserError(f"no PyTorch reference for model kind {manifest['model']!r}")
    weights = manifest.get("weights", {})
    path = checkpoint or weights.get("checkpoint")
    if path:
        return load_nafnet(path, manifest.get("nafnet_config"))
    return random_nafnet(manifest["nafnet_config"], weights.get("random_seed") or 0)


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        return y.numpy().transpose(0, 2, 3, 1)

    return run


def stage_runner(stage: dict, folder: Path) -> Runner:
    """Wrap one artifact's engine so it takes and returns NHWC whatever its own layout."""
    path = folder / stage["path"]
    engine = stage["engine"]
    if engine == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        run = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    elif engine == "saved_model":
        from export.tf_stages import load_saved_model_fn

        fn, in_name, out_name = load_saved_model_fn(path)
        run = lambda x: fn(**{in_name: x})[out_name].numpy()  # noqa: E731
    elif engine == "frozen_graph":
        from export.tf_stages import run_frozen_graph

        run = lambda x: run_frozen_graph(path, {"input": x}, ("output",))[0]  # noqa: E731
    elif engine == "tflite":
        from export.tflite_stage import make_interpreter

        interpreter = make_interpreter(path)
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

        def run(x):
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"]).copy()
    else:
        raise UserError(f"unknown engine {engine!r} for stage {stage['name']}")
    if stage.get("layout", "NHWC") == "NCHW":
        return lambda x: run(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1)
    return run


def stand_in_mask(rgb: np.ndarray) -> np.ndarray:
    """Min-max normalised luminance: a deterministic mask for models that take one as input."""
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    span = lum.max() - lum.min()
    return ((lum - lum.min()) / span if span > 0 else np.zeros_like(lum))[..., None]


def parity_inputs(manifest: dict, images: str | Path | None, num_random: int = 2,
                  seed: int = 0, echo: Callable[[str], None] = print) -> list[ParityInput]:
    """Photos from a folder fitted to the model's static size, else seeded random inputs."""
    _, height, width, channels = manifest["inputs"][0]["shape"]
    if images is None:
        rng = np.random.default_rng(seed)
        return [ParityInput(f"random-{i}", rng.random((1, height, width, channels),
                                                      dtype=np.float32))
                for i in range(num_random)]
    result = []
    for path in list_images(images):
        rgb, how = fit_to_size(load_rgb(path), height, width)
        echo(f"  {path.name}: {how}")
        if channels == 4:
            rgb = np.concatenate([rgb, stand_in_mask(rgb)], axis=-1)
        elif channels != 3:
            raise UserError(f"model input has {channels} channels; photos give 3 (or 3 + mask)")
        result.append(ParityInput(path.name, rgb[None].astype(np.float32)))
    return result


def compare(reference: np.ndarray, output: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.float64) - output.astype(np.float64))
    mse = float(np.mean(diff**2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "psnr_db": round(psnr, 2)}


def stage_tolerance(stage: dict, manifest: dict, atol: float | None) -> dict:
    """--atol wins; else TFLite uses its variant's manifest tolerance and fp32 stages 1e-4."""
    if atol is not None:
        return {"atol": atol}
    if stage["engine"] == "tflite":
        return dict(manifest.get("tolerance", {"atol": FP32_ATOL}))
    return {"atol": FP32_ATOL}


def run_parity(
    tflite: str | Path,
    checkpoint: str | Path | None = None,
    images: str | Path | None = None,
    atol: float | None = None,
    num_random: int = 2,
    echo: Callable[[str], None] = print,
) -> dict:
    """Diff every stage present against PyTorch; the result says per stage whether it passed."""
    tflite = Path(tflite)
    manifest, folder = read_manifest(tflite)
    reference = torch_runner(reference_model(manifest, checkpoint))
    inputs = parity_inputs(manifest, images, num_random, echo=echo)
    stages = [s for s in manifest["stages"] if (folder / s["path"]).exists()]
    stages.append({"name": f"tflite-{manifest.get('variant', '')}".rstrip("-"),
                   "engine": "tflite", "path": tflite.name, "layout": "NHWC"})
    expected = [o["shape"] for o in manifest["outputs"]]
    references = [reference(i.value) for i in inputs]
    if [list(r.shape) for r in references[:1]] != expected[:1]:
        raise UserError(f"PyTorch reference gives {references[0].shape}, manifest says "
                        f"{expected[0]}: the checkpoint does not match this export")
    results = []
    for stage in stages:
        tol = stage_tolerance(stage, manifest, atol)
        run = stage_runner(stage, folder)
        rows = []
        for inp, ref in zip(inputs, references, strict=True):
            out = run(inp.value)
            if out.shape != ref.shape:
                rows.append({"input": inp.label, "error": f"shape {list(out.shape)} != "
                                                          f"{list(ref.shape)}"})
                continue
            rows.append({"input": inp.label, **compare(ref, out)})
        passed = all("error" not in r and r["max_abs_diff"] <= tol["atol"]
                     and r["psnr_db"] >= tol.get("min_psnr", 0.0) for r in rows)
        worst = max((r.get("max_abs_diff", math.inf) for r in rows), default=0.0)
        results.append({"stage": stage["name"], "artifact": stage["path"], "tolerance": tol,
                        "passed": passed, "max_abs_diff": worst, "inputs": rows})
    return {
        "tflite": tflite.name, "model": manifest["model"], "variant": manifest.get("variant"),
        "inputs": [i.label for i in inputs], "stages": results,
        "passed": all(r["passed"] for r in results),
        "max_abs_diff": results[-1]["max_abs_diff"],
    }


def format_table(result: dict) -> str:
    """One row per stage and input: what a person reads in the terminal."""
    lines = [f"{'stage':<16} {'input':<22} {'max abs':>10} {'mean abs':>10} {'PSNR dB':>8}  "
             f"{'verdict'}"]
    for stage in result["stages"]:
        verdict = "ok" if stage["passed"] else f"FAIL (atol {stage['tolerance']['atol']:g})"
        for row in stage["inputs"]:
            if "error" in row:
                lines.append(f"{stage['stage']:<16} {row['input']:<22} {row['error']}")
                continue
            lines.append(f"{stage['stage']:<16} {row['input'][:22]:<22} "
                         f"{row['max_abs_diff']:>10.2e} {row['mean_abs_diff']:>10.2e} "
                         f"{row['psnr_db']:>8.1f}  {verdict}")
    lines.append("PASS: every stage within tolerance" if result["passed"]
                 else "FAIL: " + ", ".join(s["stage"] for s in result["stages"]
                                           if not s["passed"]) + " outside tolerance")
    return "\n".join(lines)
