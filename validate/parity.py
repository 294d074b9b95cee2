"""Parity: does every exported stage compute what the PyTorch model computes?

The manifest beside a .tflite names the model, its weights and every earlier artifact, so one
command checks the whole lane: for each stage whose artifact is still on disk, it runs the same
inputs through that engine and the PyTorch reference and reports, per input, the largest and mean
absolute difference and the PSNR. Checks go in the order names -> shapes -> values (like Hugging
Face Optimum's validate_model_outputs), and a failure names the stage and the largest difference.

A controls model (``bokeh export --controls``: photo, focus, strength in) is checked at several
(focus, strength) pairs, the defaults (1, 1) among them; at the defaults it is also compared with
the plain model beside it (``bokeh_controls_X`` with ``bokeh_X``), which it must equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.images import fit_to_size, list_images, load_rgb
from common.limits import check_memory
from common.metrics import psnr
from export.manifest import TOLERANCE, control_inputs, read_manifest
from export.runner import TFLiteRunner
from models.reference import Reference, reference_key

# (focus, strength) pairs a controls model is checked at: the defaults (the plain model's
# output), far focus, and two in-between settings.
CONTROL_PAIRS = ((1.0, 1.0), (0.0, 1.0), (0.5, 0.5), (0.25, 0.75))
# GPU accelerator vs the same file on the CPU: SwiftShader computes in fp32 like XNNPACK, so the
# two agree to float rounding (measured <= 1.5e-6 up to 1024x1536); a phone GPU computes in fp16,
# which the manifest's fp16 tolerance against PyTorch covers.
GPU_VS_CPU = 1e-4
# where a tflite-arith stage's outputs carry the whole run (export/arith.py's ArithmeticRun)
ARITH_RUN = "arithmetic run"


@dataclass
class ParityInput:
    label: str
    value: np.ndarray  # NHWC float32 [1, H, W, C]
    controls: dict[str, float] | None = None  # focus, strength of a controls model


# Floats per pixel kept for one parity input: the photo (3), NAFNet's input and output (4 + 3),
# the bokeh and the mask (3 + 1), and the file's own outputs (4): a lower bound.
REFERENCE_FLOATS = 18


def with_controls(inputs: list[ParityInput], pairs) -> list[ParityInput]:
    """Each input at each (focus, strength) pair, labelled ``NAME f=F s=S``."""
    return [ParityInput(f"{i.label} f={f:g} s={s:g}", i.value,
                        {"focus": float(f), "strength": float(s)})
            for i in inputs for f, s in pairs]


def _named(x: np.ndarray | dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """A stage input by name: a dict as it is, one array as the stage's only input."""
    if isinstance(x, dict):
        if set(x) != set(names):
            raise UserError(f"stage takes inputs {names}, given {sorted(x)}")
        return x
    if len(names) != 1:
        raise UserError(f"stage takes inputs {names}, given one array")
    return {names[0]: x}


def stage_runner(stage: dict, folder: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Wrap one artifact's engine: NHWC array (or named NHWC arrays: photo and controls) in,
    named NHWC arrays out, whatever its layout."""
    path = folder / stage["path"]
    engine = stage["engine"]
    nchw = stage.get("layout", "NHWC") == "NCHW"
    if engine == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]

        def run(x):
            return dict(zip(names, session.run(None, {name: x}), strict=True))
    elif engine == "saved_model":
        from common.quiet import quiet_tensorflow

        fn = quiet_tensorflow().saved_model.load(str(path)).signatures["serving_default"]
        in_names = list(fn.structured_input_signature[1].keys())

        def run(x):
            return {k: v.numpy() for k, v in fn(**_named(x, in_names)).items()}
    elif engine == "frozen_graph":
        from export.tf_stages import run_frozen_graph

        outs = tuple(stage.get("outputs", ["output"]))
        in_names = list(stage.get("inputs", ["input"]))

        def run(x):
            named = _named(x, in_names)
            inputs = {n: named[n] for n in in_names}
            return dict(zip(outs, run_frozen_graph(path, inputs, outs), strict=True))
    elif engine == "tflite":
        runner = TFLiteRunner(path)

        def run(x):
            return runner(**x) if isinstance(x, dict) else runner(x)
    elif engine == "tflite-arith":  # export/arith.py: the file op by op in numpy, a policy
        from export.arith import run_arithmetic

        names = [d["name"] for d in TFLiteRunner(path).inputs]

        def run(x):
            feeds = dict(x) if isinstance(x, dict) else {names[0]: x}
            result = run_arithmetic(path, feeds, stage["policy"], reference="fp32")
            return {**result.outputs, ARITH_RUN: result}
    elif engine == "tflite-gpu":  # LiteRT's GPU accelerator alone, in a child process
        from export.accelerator import AcceleratorError, run_on_gpu

        names = [d["name"] for d in TFLiteRunner(path).inputs]

        def run(x):
            feeds = {n: x[n] for n in names} if isinstance(x, dict) else {names[0]: x}
            try:
                return run_on_gpu(path, feeds)
            except AcceleratorError as exc:
                return {"error": str(exc)}
    else:
        raise UserError(f"unknown engine {engine!r} for stage {stage['name']}")
    if nchw:
        return lambda x: {k: v.transpose(0, 2, 3, 1) for k, v in
                          run(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).items()}
    return run


def stand_in_mask(rgb: np.ndarray) -> np.ndarray:
    """Min-max normalised luminance: a deterministic mask for models that take one as input."""
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    span = lum.max() - lum.min()
    return ((lum - lum.min()) / span if span > 0 else np.zeros_like(lum))[..., None]


def parity_inputs(manifest: dict, images: str | Path | None, num_random: int = 2,
                  seed: int = 0, echo: Callable[[str], None] = print) -> list[ParityInput]:
    """Photos from a folder fitted to the model's static size, else seeded random inputs.

    Random photos are smooth (low-resolution noise upsampled), so a depth net sees structure
    and its disparity range is not degenerate.
    """
    _, height, width, channels = manifest["inputs"][0]["shape"]
    if images is None:
        rng = np.random.default_rng(seed)
        result = []
        for i in range(num_random):
            coarse = torch.from_numpy(rng.random((1, channels, 8, 12), dtype=np.float32))
            smooth = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")
            noise = rng.random((1, height, width, channels), dtype=np.float32)
            value = 0.8 * smooth.numpy().transpose(0, 2, 3, 1) + 0.2 * noise
            result.append(ParityInput(f"random-{i}", value.astype(np.float32)))
        return result
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
    """Max and mean absolute difference and PSNR; an output with NaN or inf is an error row
    (no PSNR is reported for it)."""
    for what, array in (("output", output), ("PyTorch reference", reference)):
        bad = int(array.size - np.isfinite(array).sum())
        if bad:
            return {"error": f"{bad} non-finite values (NaN or inf) of {array.size} in the "
                             f"{what}"}
    diff = np.abs(reference.astype(np.float64) - output.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "psnr_db": round(psnr(reference, output), 2)}


def stage_tolerance(stage: dict, manifest: dict, atol: float | None) -> dict[str, dict]:
    """Per output: the TFLite file's manifest tolerance; fp32 defaults for earlier stages;
    ``--atol`` replaces every absolute bound."""
    if stage["engine"] == "tflite-arith" and stage["policy"] != "fp32":
        # a GPU computes an fp32 file in fp16 too: the model's fp16 bounds, whatever the file
        tol = TOLERANCE[manifest["model"]]["fp16"]
    elif stage["engine"] in ("tflite", "tflite-gpu", "tflite-arith"):
        tol = manifest["tolerance"]
    else:
        tol = TOLERANCE[stage.get("role", manifest["model"])]["fp32"]
    tol = {name: dict(t) for name, t in tol.items()}
    if atol is not None:
        for t in tol.values():
            t["atol"] = atol
    return tol


def _within(row: dict, tol: dict) -> bool:
    return ("error" not in row and row["max_abs_diff"] <= tol.get("atol", math.inf)
            and row["psnr_db"] >= tol.get("min_psnr", -math.inf))


def _once_per_input(run):
    """The same outputs again for the same input object (one GPU inference serves two checks)."""
    seen: dict[int, dict] = {}

    def cached(x):
        if id(x) not in seen:
            seen[id(x)] = run(x)
        return seen[id(x)]

    return cached


def _check_stage(stage: dict, run, inputs, expected, tol) -> dict:
    role = stage.get("role", "nafnet")
    rows = []
    for inp, ref in zip(inputs, expected, strict=True):
        got = run(ref[role]["input"])
        for name in tol:
            want = ref[role].get(name) if "against" not in stage else ref[stage["against"]][name]
            row = {"input": inp.label, "output": name}
            if "error" in got:  # the engine could not run this input (GPU accelerator)
                row["error"] = got["error"]
            elif name not in got:
                row["error"] = f"no output named {name!r} (has {sorted(got)})"
            elif got[name].shape != want.shape:
                row["error"] = f"shape {list(got[name].shape)} != {list(want.shape)}"
            elif not np.all(np.isfinite(got[name])):
                bad = int(np.count_nonzero(~np.isfinite(got[name])))
                row["error"] = f"{bad} of {got[name].size} values are inf/NaN"
            else:
                row.update(compare(want, got[name]))
            rows.append(row)
    return {"stage": stage["name"], "artifact": stage["path"], "tolerance": tol,
            "passed": all(_within(r, tol[r["output"]]) for r in rows),
            "max_abs_diff": max((r.get("max_abs_diff", math.inf) for r in rows), default=0.0),
            "inputs": rows}


def run_parity(
    tflite: str | Path,
    checkpoint: str | Path | None = None,
    images: str | Path | None = None,
    atol: float | None = None,
    num_random: int = 2,
    echo: Callable[[str], None] = print,
    tflite_only: bool = False,
    control_pairs=CONTROL_PAIRS,
    accelerator: str = "cpu",
    arithmetic: str | None = None,
    reference: Reference | None = None,
) -> dict:
    """Diff every stage present against PyTorch; the result says per stage whether it passed.

    A reduced-precision variant is also compared with its fp32 sibling when that file exists.
    A controls model runs every input at each (focus, strength) of ``control_pairs`` and, at
    its defaults, is also compared with the plain model beside it (fp32 tolerance: equal).
    With ``accelerator="gpu"`` the TFLite file runs on LiteRT's GPU accelerator, checked against
    PyTorch with the manifest's tolerance and against the same file on the CPU within
    ``GPU_VS_CPU`` (docs/design.md, section 9).
    With ``arithmetic`` (a policy of export/arith.py, e.g. "fp16") the TFLite file is run op by
    op in that arithmetic instead of by LiteRT, checked against PyTorch (the manifest's
    tolerance; under an fp16 policy the model's fp16 one, for an fp32 file too) and against
    the same file in fp32 arithmetic with the fp16 floors (``export.arith.min_psnr``); the
    first op that made an inf/NaN is reported (docs/design.md, section 12).
    ``reference``: a PyTorch reference already built for this manifest (``check_export``
    shares one between files).
    """
    if accelerator not in ("cpu", "gpu"):
        raise UserError(f"unknown accelerator {accelerator!r}; choose cpu or gpu")
    if arithmetic is not None:
        from export.arith import POLICIES

        if arithmetic not in POLICIES:
            raise UserError(f"unknown arithmetic {arithmetic!r}; choose from "
                            f"{', '.join(POLICIES)}")
        if accelerator != "cpu":
            raise UserError("--arithmetic runs the file in numpy; it takes no --accelerator")
    tflite = Path(tflite)
    manifest, folder = read_manifest(tflite)
    if accelerator == "gpu":
        from export.tflite_info import flex_ops

        flex = flex_ops(tflite)
        if flex:
            raise UserError(f"{tflite}: needs Flex ops ({', '.join(flex)}), which no GPU "
                            "backend runs; --accelerator gpu refuses it (parity on the CPU "
                            "still checks it)")
    reference = reference or Reference(manifest, checkpoint)
    if images is None:  # every input's PyTorch outputs are kept until every stage is compared
        _, height, width, _ = manifest["inputs"][0]["shape"]
        runs = num_random * max(1, len(control_pairs) if control_inputs(manifest) else 1)
        check_memory(f"--num-random {num_random} at {height}x{width}",
                     runs * height * width * 4 * REFERENCE_FLOATS, "choose a smaller --num-random")
    inputs = parity_inputs(manifest, images, num_random, echo=echo)
    defaults = control_inputs(manifest)
    if defaults:
        pairs = list(dict.fromkeys((float(f), float(s)) for f, s in control_pairs))
        if not pairs:
            raise UserError("a controls model needs at least one (focus, strength) pair")
        inputs = with_controls(inputs, pairs)
    expected = [reference.run(i.value, i.controls) for i in inputs]
    kind = manifest["model"]
    final = {"name": f"tflite-{manifest.get('variant', '')}".rstrip("-"), "engine": "tflite",
             "path": tflite.name, "layout": "NHWC", "role": kind}
    if accelerator == "gpu":
        from export.accelerator import gpu_device

        found, device = gpu_device()
        if not found:
            raise UserError(f"--accelerator gpu: no GPU device ({device}); make setup-gpu "
                            "installs a software one")
        echo(f"  GPU accelerator: {device}")
        cpu_run = stage_runner(final, folder)
        for ref in expected:
            ref["cpu"] = cpu_run(ref[kind]["input"])
        final = {**final, "name": final["name"] + " on GPU", "engine": "tflite-gpu"}
    if arithmetic is not None:
        final = {**final, "name": f"{final['name']} in {arithmetic} arithmetic",
                 "engine": "tflite-arith", "policy": arithmetic}
    earlier = [] if tflite_only else manifest["stages"]
    stages = [s for s in earlier if (folder / s["path"]).exists()] + [final]
    results = []
    runners = {final["name"]: _once_per_input(stage_runner(final, folder))}
    for stage in stages:
        echo(f"  running {stage['name']} ...")
        run = runners.get(stage["name"]) or stage_runner(stage, folder)
        results.append(_check_stage(stage, run, inputs, expected,
                                    stage_tolerance(stage, manifest, atol)))
    arith = None
    if arithmetic is not None:
        arith = _arithmetic_checks(final, runners[final["name"]], inputs, expected, kind)
        results.append(arith.pop("stage"))
    sibling = tflite.with_name(tflite.name.replace(f"_{manifest.get('variant')}.", "_fp32."))
    if manifest.get("variant", "fp32") != "fp32" and sibling.is_file() and arithmetic is None:
        fp32_run = stage_runner({**final, "path": sibling.name}, folder)
        for ref in expected:
            ref[sibling.name] = fp32_run(ref[kind]["input"])
        results.append(_check_stage({**final, "name": f"{final['name']} vs {sibling.name}",
                                     "against": sibling.name}, stage_runner(final, folder),
                                    inputs, expected, stage_tolerance(final, manifest, atol)))
    if accelerator == "gpu":
        tol = {name: {"atol": GPU_VS_CPU} for name in stage_tolerance(final, manifest, None)}
        results.append(_check_stage({**final, "name": f"{final['name']} vs CPU",
                                     "against": "cpu"}, runners[final["name"]],
                                    inputs, expected, tol))
    plain = tflite.with_name(tflite.name.replace("bokeh_controls_", "bokeh_", 1))
    at_defaults = [(i, r) for i, r in zip(inputs, expected, strict=True)
                   if i.controls == defaults]
    if defaults and plain != tflite and plain.is_file() and at_defaults and arithmetic is None:
        plain_run = stage_runner({**final, "path": plain.name}, folder)
        for inp, ref in at_defaults:
            ref[plain.name] = plain_run(inp.value)
        # at the defaults the controls are exact identities: fp32 bounds, whatever the variant
        tol = stage_tolerance({"engine": "tflite"}, {"tolerance": TOLERANCE[kind]["fp32"]}, atol)
        results.append(_check_stage(
            {**final, "name": f"{final['name']} at defaults vs {plain.name}",
             "against": plain.name}, stage_runner(final, folder),
            [i for i, _ in at_defaults], [r for _, r in at_defaults], tol))
    last = next(r for r in results if r["stage"] == final["name"])
    return {
        "tflite": tflite.name, "model": kind, "variant": manifest.get("variant"),
        "accelerator": accelerator, **({"arithmetic": arith} if arith else {}),
        "inputs": [i.label for i in inputs], "stages": results,
        "passed": all(r["passed"] for r in results),
        "max_abs_diff": last["max_abs_diff"],
        "summary": _summary(last),
    }


def _arithmetic_checks(final: dict, run, inputs, expected, kind: str) -> dict:
    """The arithmetic run of each input (cached by ``run``) against the same file in fp32
    arithmetic, as a parity stage, and the first op that made an inf/NaN."""
    from export.arith import min_psnr

    firsts = []
    for inp, ref in zip(inputs, expected, strict=True):
        result = run(ref[kind]["input"])[ARITH_RUN]
        ref["fp32 arithmetic"] = result.reference_outputs
        first = result.first_nonfinite()
        if first is not None:
            firsts.append({"input": inp.label, "index": first.index, "name": first.name,
                           "kind": first.kind, "input_ranges": first.input_ranges,
                           "output_range": first.output_range})
    tol = {name: {"min_psnr": min_psnr(name)} for name in expected[0]["fp32 arithmetic"]}
    stage = _check_stage({**final, "name": f"{final['name']} vs fp32 arithmetic",
                          "against": "fp32 arithmetic"}, run, inputs, expected, tol)
    return {"policy": final["policy"], "stage": stage,
            "first_nonfinite": firsts[0] if firsts else None,
            "inputs_with_nonfinite": [f["input"] for f in firsts]}


def export_files(folder: str | Path) -> list[Path]:
    """The .tflite files an export's report.json lists as written (not the variants it
    recorded as unsupported), fp32 files first."""
    from common.files import read_json

    folder = Path(folder)
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise UserError(f"{folder}: no report.json (not a folder written by bokeh export)")
    report = read_json(report_path)
    names = [name for name, entry in report.get("variants", {}).items()
             if "unsupported" not in entry and (folder / name).is_file()]
    if not names:
        raise UserError(f"{report_path}: lists no .tflite file that is present")
    return sorted((folder / n for n in names), key=lambda p: (not p.stem.endswith("_fp32"), p.name))


def check_export(folder: str | Path, images: str | Path | None = None, num_random: int = 1,
                 echo: Callable[[str], None] = print) -> list[dict]:
    """Parity of every file of an export, each with its manifest's tolerance, in one process:
    one PyTorch reference per (weights, depth net); every stage for the fp32 files, the file
    alone (and against its fp32 sibling) for the others."""
    references: dict[str, Reference] = {}
    results = []
    for tflite in export_files(folder):
        manifest, _ = read_manifest(tflite)
        key = reference_key(manifest)
        if key not in references:
            references[key] = Reference(manifest)
        echo(f"Parity of {tflite} against PyTorch:")
        results.append(run_parity(tflite, images=images, num_random=num_random, echo=echo,
                                  tflite_only=manifest.get("variant") != "fp32",
                                  reference=references[key]))
    return results


def _summary(stage: dict) -> str:
    parts = []
    for name in stage["tolerance"]:
        rows = [r for r in stage["inputs"] if r["output"] == name and "error" not in r]
        if rows:
            parts.append(f"{name} max abs {max(r['max_abs_diff'] for r in rows):.1e}, "
                         f"min PSNR {min(r['psnr_db'] for r in rows):.1f} dB")
    return "; ".join(parts) or "no comparable output"


def format_table(result: dict) -> str:
    """One row per stage, input and output: what a person reads in the terminal."""
    wide = max([16] + [len(r["input"]) for s in result["stages"] for r in s["inputs"]])
    name = max([34] + [len(s["stage"]) for s in result["stages"]])
    lines = [f"{'stage':<{name}} {'input':<{wide}} {'output':<7} {'max abs':>9} {'mean abs':>9} "
             f"{'PSNR dB':>8}  verdict"]
    for stage in result["stages"]:
        for row in stage["inputs"]:
            head = f"{stage['stage']:<{name}} {row['input']:<{wide}} {row['output']:<7}"
            if "error" in row:
                lines.append(f"{head} {row['error']}")
                continue
            tol = stage["tolerance"][row["output"]]
            verdict = "ok" if _within(row, tol) else "FAIL (" + ", ".join(
                f"{k} {v:g}" for k, v in tol.items()) + ")"
            lines.append(f"{head} {row['max_abs_diff']:>9.2e} {row['mean_abs_diff']:>9.2e} "
                         f"{row['psnr_db']:>8.1f}  {verdict}")
    first = (result.get("arithmetic") or {}).get("first_nonfinite")
    if first:
        ranges = ", ".join(f"[{r[0]:.4g}, {r[1]:.4g}]" for r in first["input_ranges"] if r)
        lo, hi = first["output_range"]
        lines.append(f"first inf/NaN in {result['arithmetic']['policy']} arithmetic "
                     f"({first['input']}): op {first['index']} {first['kind']} "
                     f"{first['name']!r}, inputs {ranges} -> [{lo:.4g}, {hi:.4g}]")
    lines.append("PASS: every stage within tolerance" if result["passed"]
                 else "FAIL: " + ", ".join(s["stage"] for s in result["stages"]
                                           if not s["passed"]) + " outside tolerance")
    return "\n".join(lines)
