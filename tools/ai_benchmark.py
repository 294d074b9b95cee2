"""`python -m tools.ai_benchmark --variant fp16 --out DIR`: a folder to copy onto the phone.

The AI Benchmark app (PRO mode, "Custom Model") runs one ``model.tflite`` from the phone's
Download folder on the CPU, NNAPI or the GPU delegate. The bundle holds that file, a
``manifest.json`` saying what it takes and returns, whether each delegate can run it and how close
it is to PyTorch, and a short README.txt. A model the chosen delegate cannot run is refused here,
with the reason, rather than on the phone with an error log: Flex ops, rank > 4 or a flagged op
for the GPU delegate, and a dynamic shape for any delegate. The bundle holds a one-input model:
the controls model (photo, focus, strength in) is refused in favour of its plain twin, which
computes the same at the default controls.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from datetime import UTC, datetime
from pathlib import Path

from common.cli import run_command
from common.errors import UserError
from common.files import ensure_writable_dir, human_bytes, read_json, write_bytes, write_json
from common.ownership import claim, record
from export.arith import fp16_verdict, verdict_line
from export.tflite_info import dynamic_dims, gpu_verdict
from export.variants import VARIANTS, describe
from tools.inspect import inspect

BUNDLE_FORMAT = "bokehlite-ai-benchmark/1"
DELEGATES = ("gpu", "cpu", "nnapi")
DEFAULT_DELEGATE = {v.name: v.delegate for v in VARIANTS}  # export/variants.py
NOT_MEASURED = "not measured — run validate parity --tflite {path}"
BUNDLE_FILES = ("model.tflite", "manifest.json", "README.txt")


class Refused(UserError):
    """The model cannot run on the delegate the bundle is for."""


def source_tflite(variant: str, export_dir: str | Path, tflite: str | Path | None) -> Path:
    """``--tflite`` if given, else the fused model of ``variant`` in the export folder."""
    if tflite:
        return Path(tflite)
    path = Path(export_dir) / f"bokeh_{variant}.tflite"
    if not path.is_file():
        raise UserError(f"{path}: no such TFLite file; run `make export` first or give --tflite")
    return path


def check_delegate(info, dynamic: list[str], delegate: str) -> list[str]:
    """Reasons the delegate cannot run the model (empty: it can); dynamic shapes fail all."""
    reasons = [f"dynamic shape {d}: mobile delegates and AI Benchmark need static shapes"
               for d in dynamic]
    if delegate == "gpu":
        reasons += gpu_verdict(info)[1]
    return reasons


def parity_record(tflite: Path, manifest: dict, folder: Path) -> dict | str:
    """The parity result `validate parity` wrote into the export's report.json, if any."""
    report_path = folder / manifest.get("report", "report.json")
    report = read_json(report_path) if report_path.is_file() else {}
    result = (report.get("parity") or {}).get(tflite.name)
    if not result:
        return NOT_MEASURED.format(path=tflite)
    final = next((s for s in result.get("stages", []) if s["stage"].startswith("tflite")
                  and "vs" not in s["stage"]), None)
    return {"passed": result.get("passed"), "summary": result.get("summary"),
            "max_abs_diff": result.get("max_abs_diff"), "inputs": result.get("inputs"),
            "tolerance": final["tolerance"] if final else manifest.get("tolerance"),
            "against": "PyTorch reference (validate parity)"}


def gpu_execution_record(tflite: Path, manifest: dict, folder: Path) -> dict:
    """Whether the file ran on a GPU backend: `bokeh parity --accelerator gpu`'s verdict in the
    export's report.json if there is one, else the export's own (its manifest)."""
    report_path = folder / manifest.get("report", "report.json")
    report = read_json(report_path) if report_path.is_file() else {}
    recorded = (report.get("gpu_execution") or {}).get(tflite.name)
    return recorded or manifest.get("gpu_execution") or {
        "status": "not tried", "reason": f"run bokeh parity --tflite {tflite} --accelerator gpu"}


def _io(tensors: list[dict], manifest_io: list[dict]) -> list[dict]:
    described = {t["name"]: t for t in manifest_io}
    return [{"name": t["name"], "shape": t["shape"], "dtype": t["dtype"],
             "layout": described.get(t["name"], {}).get("layout", "NHWC"),
             "range": described.get(t["name"], {}).get("range", [0.0, 1.0]),
             "description": described.get(t["name"], {}).get("description", "")}
            for t in tensors]


def build_manifest(src: Path, data: bytes, info, manifest: dict, dynamic: list[str],
                   delegate: str, parity: dict | str, gpu_execution: dict) -> dict:
    ready, gpu_reasons = gpu_verdict(info)
    return {
        "format": BUNDLE_FORMAT, "model": "model.tflite", "source": str(src.resolve()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": manifest["model"], "variant": manifest.get("variant"), "delegate": delegate,
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "inputs": _io(info.inputs, manifest["inputs"]),
        "outputs": _io(info.outputs, manifest["outputs"]),
        "static_shapes": not dynamic,
        "flex": {"required": bool(info.flex_ops), "ops": info.flex_ops},
        "max_rank": info.max_rank,
        "delegates": {
            "gpu": {"compatible": ready, "reasons": gpu_reasons,
                    "notes": info.gpu_messages if ready else []},
            "cpu": {"compatible": not dynamic,
                    "notes": ["needs the Flex delegate"] if info.flex_ops else []},
            "nnapi": {"compatible": None,
                      "notes": ["depends on the phone's NNAPI driver; falls back to the CPU "
                                "for unsupported ops"]},
        },
        "parity": parity,
        "gpu_execution": gpu_execution,
        "variant_info": describe(manifest["variant"]) if manifest.get("variant") in
        DEFAULT_DELEGATE else None,
        "trained_with_depth": (manifest.get("weights") or {}).get("trained_with_depth"),
        "weights": {"nafnet": manifest.get("weights"),
                    "depth": {k: v for k, v in (manifest.get("depth") or manifest.get("dpt")
                                                or {}).items() if k != "config"} or None},
        "warnings": manifest.get("warnings", []),
    }


def readme_text(bundle: dict) -> str:
    """Short instructions for the person holding the phone."""
    inp = bundle["inputs"][0]
    shape = "x".join(map(str, inp["shape"]))
    delegate = {"gpu": "TFLite GPU delegate (fp16)",
                "cpu": "CPU (TFLite CPU / XNNPACK, fp32)",
                "nnapi": "NNAPI"}[bundle["delegate"]]
    parity = bundle["parity"]
    parity_line = parity if isinstance(parity, str) else (
        f"{'PASS' if parity['passed'] else 'FAIL'}: {parity['summary']}")
    lines = [
        f"bokehlite phone bundle: {bundle['kind']} {bundle['variant']} for the {delegate}",
        "",
        "1. Copy model.tflite to the phone's Download folder.",
        "2. Open AI Benchmark -> PRO Mode -> Custom Model.",
        f"3. Pick the {delegate}"
        + ("; NNAPI is the alternative to try." if bundle["delegate"] != "nnapi" else "."),
        f"4. Input: {inp['name']} {shape} {inp['dtype']}, {inp['layout']}, values in "
        f"[{inp['range'][0]:g}, {inp['range'][1]:g}] (RGB).",
        "5. Run; AI Benchmark reports the latency, or an error log if the delegate refused.",
        "",
        "Outputs: " + ", ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}"
                                for o in bundle["outputs"]) + ".",
        f"Flex ops: {', '.join(bundle['flex']['ops']) or 'none'}; max tensor rank "
        f"{bundle['max_rank']}; static shapes: {'yes' if bundle['static_shapes'] else 'NO'}.",
        f"Parity with PyTorch: {parity_line}.",
        *([f"Variant {bundle['variant_info']}."] if bundle.get("variant_info") else []),
        *([f"What the phone GPU computes (fp16): {verdict_line(bundle['fp16_arithmetic'])}."]
          if bundle.get("fp16_arithmetic") else []),
        f"sha256 {bundle['sha256']}",
        "",
        "Target of the paper: a Kirin 9000 phone, where the original model needed Flex ops and ran",
        "12.9 s on the CPU with no GPU run at all.",
    ]
    if bundle["delegates"]["gpu"]["compatible"]:
        lines[-1] += " This model has builtin ops only, rank <= 4 and static"
        lines.append("shapes: the GPU delegate can take it.")
    for w in bundle["warnings"]:
        lines += ["", f"WARNING: {w}"]
    return "\n".join(lines) + "\n"


def fp16_record(tflite: Path, manifest: dict) -> dict:
    """The file's fp16-arithmetic verdict: the export's (its manifest), else computed now (an
    export from before the verdict existed)."""
    if manifest.get("fp16_arithmetic"):
        return manifest["fp16_arithmetic"]
    return fp16_verdict(tflite, {name: float(c["default"])
                                 for name, c in (manifest.get("controls") or {}).items()})


def make_bundle(out: str | Path, variant: str = "fp16", export_dir: str | Path = "build/export",
                tflite: str | Path | None = None, delegate: str | None = None,
                overwrite: bool = False, allow_fp16_failure: bool = False) -> dict:
    """Check the model against the delegate, then write model.tflite, manifest.json, README.txt.

    Raises ``Refused`` (a ``UserError``) when the delegate cannot run the model or, for the GPU
    delegate (which computes in fp16), when its fp16-arithmetic verdict fails, naming the op,
    unless ``allow_fp16_failure``; and
    ``UserError`` when ``out`` lies in an export folder or holds a file of those names that this
    tool did not write (unless ``overwrite``): the user's files are never replaced.
    """
    from export.folder import export_around
    from export.manifest import read_manifest

    if variant not in DEFAULT_DELEGATE:
        raise UserError(f"unknown variant {variant!r}; expected one of {tuple(DEFAULT_DELEGATE)}")
    src = source_tflite(variant, export_dir, tflite)
    inside = export_around(out)
    if inside is not None:
        raise UserError(f"{out}: is inside the export folder {inside}; give the bundle a folder "
                        "of its own (e.g. build/bundle)")
    manifest, folder = read_manifest(src)
    names = [t.get("name") for t in manifest["inputs"]]
    if len(names) != 1:
        plain = src.with_name(src.name.replace("bokeh_controls_", "bokeh_", 1))
        twin = (f"; bundle {plain.name} instead (the same model at focus 1, strength 1)"
                if plain != src else "")
        raise UserError(f"{src}: takes {len(names)} inputs ({', '.join(names)}); the AI "
                        f"Benchmark bundle is for a one-input model (the app feeds one "
                        f"tensor){twin}")
    # the file's own variant decides the default delegate (--tflite bokeh_fp32.tflite -> CPU)
    delegate = delegate or DEFAULT_DELEGATE.get(manifest.get("variant"), DEFAULT_DELEGATE[variant])
    if delegate not in DELEGATES:
        raise UserError(f"unknown delegate {delegate!r}; expected one of {DELEGATES}")
    info = inspect(src)
    dynamic = dynamic_dims(src)
    reasons = check_delegate(info, dynamic, delegate)
    if reasons:
        raise Refused(f"{src}: refused for a {delegate.upper()} bundle: " + "; ".join(reasons))
    fp16 = fp16_record(src, manifest) if delegate == "gpu" else None
    if fp16 and fp16["passed"] is False and not allow_fp16_failure:
        raise Refused(f"{src}: refused for a GPU bundle: {verdict_line(fp16)}; a phone GPU "
                      "computes in fp16 (--allow-fp16-failure bundles it anyway)")
    out = ensure_writable_dir(out)
    claim(out, BUNDLE_FILES, overwrite)
    data = src.read_bytes()
    bundle = build_manifest(src, data, info, manifest, dynamic, delegate,
                            parity_record(src, manifest, folder),
                            gpu_execution_record(src, manifest, folder))
    if fp16:
        bundle["fp16_arithmetic"] = fp16
        if fp16["passed"] is False:
            bundle["warnings"] = [*bundle["warnings"], f"bundled despite the fp16 verdict: "
                                  f"{verdict_line(fp16)}"]
    write_bytes(out / "model.tflite", data)
    write_json(out / "manifest.json", bundle)
    write_bytes(out / "README.txt", readme_text(bundle).encode())
    record(out, [out / name for name in BUNDLE_FILES])
    return bundle


def build_parser(prog: str = "bokeh ai-benchmark") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bundle an exported model for the AI Benchmark app: model.tflite, "
                    "manifest.json (inputs, outputs, delegates, Flex, parity, sha256) and "
                    "README.txt. Refuses a model the chosen delegate cannot run.",
        epilog=f"examples:\n  {prog} --variant fp16 --out bundle\n"
               f"  {prog} --tflite build/export/bokeh_fp32.tflite --delegate cpu --out bundle\n"
               "Then copy DIR/model.tflite to the phone's Download folder (see DIR/README.txt).")
    p.add_argument("--out", required=True,
                   help="bundle folder (created; not inside an export folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace model.tflite, manifest.json, README.txt in --out even if this "
                        "tool did not write them")
    p.add_argument("--variant", default="fp16", choices=tuple(DEFAULT_DELEGATE),
                   help="the export's bokeh_{variant}.tflite, bundled for its delegate (bokeh "
                        "variants: fp16 the GPU, int8 NNAPI, the others the CPU; default "
                        "%(default)s)")
    p.add_argument("--export-dir", default="build/export",
                   help="where bokeh_{variant}.tflite is (default %(default)s)")
    p.add_argument("--tflite", help="bundle this .tflite instead (its manifest must be beside it)")
    p.add_argument("--delegate", choices=DELEGATES,
                   help="delegate the bundle is for (default: gpu for an fp16 model, cpu for "
                        "fp32)")
    p.add_argument("--allow-fp16-failure", action="store_true",
                   help="bundle a model for the GPU even when its fp16-arithmetic verdict "
                        "fails (a phone GPU computes in fp16: it will not render correctly)")
    return p


def main(argv: list[str] | None = None, prog: str = "bokeh ai-benchmark") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_command(prog, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    bundle = make_bundle(args.out, args.variant, args.export_dir, args.tflite, args.delegate,
                         args.overwrite, args.allow_fp16_failure)
    out = Path(args.out)
    print(f"Bundle for AI Benchmark ({bundle['delegate'].upper()}): {out}/")
    print(f"  model.tflite   {human_bytes(bundle['bytes'])}, sha256 {bundle['sha256'][:16]}...")
    print(f"  input          {bundle['inputs'][0]['name']} "
          f"{'x'.join(map(str, bundle['inputs'][0]['shape']))} {bundle['inputs'][0]['dtype']}")
    parity = bundle["parity"]
    print("  parity         " + (parity if isinstance(parity, str) else
                                 f"{'PASS' if parity['passed'] else 'FAIL'} "
                                 f"({parity['summary']})"))
    for w in bundle["warnings"]:
        print(f"  WARNING: {w}")
    print(f"Next: copy {out}/model.tflite to the phone's Download folder, then AI Benchmark -> "
          f"PRO Mode -> Custom Model (details in {out}/README.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
