"""`make bench-peers`: our TFLite files against the ones other converters make of the same model.

Peers, each in its own virtual environment (made by the Makefile), run as subprocesses:

* onnx2tf (``.venv-peers``): pins TensorFlow 2.19, which cannot share an environment with
  onnx-tf's TF 2.15; it converts the same ``nafnet_sim.onnx`` our export starts from.
* litert-torch (``.venv-litert-torch``): Google's PyTorch -> LiteRT converter, straight from the
  PyTorch module (``validate/litert_torch_convert.py``). It converts NAFNet and, for a fused
  export, the whole PyTorch reference pipeline (depth net + mask + NAFNet): the exact modules
  ``validate.parity`` checks our files against, pickled, so the weights are the same.

Every file then runs on *our* interpreters (TF 2.15's and LiteRT), interleaved with the others and
with PyTorch eager on the same input and thread count, so each ratio compares converters on one
runtime, at one moment. Beside the times: each file's op histogram, max rank, Flex ops, the GPU
analyzer's verdict, XNNPACK partitions and the largest difference from PyTorch.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.cli import positive_int, run_command
from common.errors import UserError
from common.files import read_json, write_json
from export.runner import RUNTIMES, runtime_label

ONNX2TF_VERSION = "1.29.24"
LITERT_TORCH_VERSION = "0.10.0"
LITERT_TORCH_SCRIPT = Path(__file__).with_name("litert_torch_convert.py")
CONVERT_TIMEOUT_S = 3 * 3600
PAUSE_S = 0.5  # idle gap before each timed call (see validate.runtime.time_interleaved)
TOP_OPS = 5


def convert_with_onnx2tf(onnx_path: Path, out_dir: Path, venv: Path) -> Path:
    """onnx2tf's float32 TFLite of ``onnx_path`` (reused while newer than the ONNX file).

    Its conversion time and peak memory go to ``out_dir``.json (see ``onnx2tf_record``).
    """
    tflite = out_dir / f"{onnx_path.stem}_float32.tflite"
    if tflite.is_file() and tflite.stat().st_mtime > onnx_path.stat().st_mtime:
        return tflite
    exe = venv / "bin" / "onnx2tf"
    if not exe.is_file():
        raise UserError(f"{exe}: not found; `make bench-peers` creates {venv} with onnx2tf "
                        f"{ONNX2TF_VERSION}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    log = out_dir.with_suffix(".log")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"  onnx2tf {onnx_path} -> {out_dir}/ (minutes; log in {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run([str(exe), "-i", str(onnx_path), "-o", str(out_dir)],
                              stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode or not tflite.is_file():
        raise UserError(f"onnx2tf failed (exit {done.returncode}); see {log}")
    seconds = time.perf_counter() - start
    # the largest child this process has waited for: onnx2tf, which runs before any other
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    write_json(out_dir.with_suffix(".json"), {"seconds": round(seconds, 1),
                                              "peak_rss_mib": round(peak)})
    print(f"  ok onnx2tf {seconds:.0f} s  {tflite}")
    return tflite


def onnx2tf_record(out_dir: Path) -> dict:
    """Conversion seconds and peak RSS that ``convert_with_onnx2tf`` recorded, if any."""
    record = out_dir.with_suffix(".json")
    return read_json(record) if record.is_file() else {}


def check_litert_torch_venv(venv: Path) -> Path:
    """The venv's python, or a ``UserError`` saying how to make the environment."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise UserError(f"{python}: not found; `make litert-torch-env` creates {venv} with "
                        f"litert-torch {LITERT_TORCH_VERSION} (or pass --no-litert-torch)")
    return python


def convert_with_litert_torch(model, input_shape: list[int], outputs: int, dest: Path,
                              venv: Path, newer_than: Path | None = None,
                              timeout_s: float = CONVERT_TIMEOUT_S) -> dict:
    """litert-torch's TFLite of the PyTorch ``model`` (NCHW in; NHWC in and out after conversion).

    Returns ``{"path": dest, "seconds": ..., "peak_rss_mib": ...}``, or ``{"path": None,
    "error": why}`` when the conversion failed (a result, not an exception: the table says it).
    A file (or a recorded failure) newer than ``newer_than`` is reused; delete it to retry.
    """
    python = check_litert_torch_venv(venv)
    meta_file = dest.with_suffix(".json")
    if meta_file.is_file() and (newer_than is None
                                or meta_file.stat().st_mtime > newer_than.stat().st_mtime):
        meta = read_json(meta_file)
        if meta.get("input_shape") == list(input_shape) and (dest.is_file() or "error" in meta):
            return {**meta, "path": dest if "error" not in meta else None, "reused": True}
    import torch

    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in (dest, meta_file):
        stale.unlink(missing_ok=True)
    pickled, log = dest.with_suffix(".pt"), dest.with_suffix(".log")
    torch.save(model, pickled)
    cmd = [str(python), str(LITERT_TORCH_SCRIPT), str(pickled), str(dest),
           "--input-shape", ",".join(str(d) for d in input_shape), "--outputs", str(outputs)]
    print(f"  litert-torch {type(model).__name__} {input_shape} -> {dest} (log in {log})",
          flush=True)
    start = time.perf_counter()
    try:
        with log.open("w") as sink:
            done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        pickled.unlink(missing_ok=True)
    seconds = round(time.perf_counter() - start, 1)
    if code == 0 and dest.is_file() and meta_file.is_file():
        print(f"  ok litert-torch {seconds:.0f} s  {dest}")
        return {**read_json(meta_file), "path": dest}
    why = _failure(code, log, timeout_s)
    print(f"  litert-torch FAILED after {seconds:.0f} s: {why}")
    write_json(meta_file, {"error": why, "seconds": seconds, "input_shape": list(input_shape)})
    return {"path": None, "error": why, "seconds": seconds}


def _failure(code: int | None, log: Path, timeout_s: float) -> str:
    """One line: why the converter's process ended without a file."""
    if code is None:
        return f"no result within {timeout_s:.0f} s (log {log})"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint} (log {log})"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    last = (errors or lines or ["no output"])[-1]
    return f"exit {code}: {last[:200]} (log {log})"


def _nhwc_runner(path: Path, threads: int, in_shape: list[int], out_shape: list[int],
                 runtime: str = "tensorflow"):
    """Our interpreter on any TFLite of the model, NHWC in and out whatever layout it uses.

    The output is the one of shape ``out_shape`` (NHWC or NCHW; the fused model's bokeh, not its
    mask), whatever the file's output order. onnx2tf makes the input NHWC but may keep an NCHW
    output; a transpose outside the timed interpreter call would bill our side, so it is applied
    to the returned array only.
    """
    from export.runner import TFLiteRunner

    runner = TFLiteRunner(path, threads, xnnpack=True, runtime=runtime)
    want_in = [int(d) for d in runner.inputs[0]["shape"]]
    n, h, w, c = in_shape
    if want_in not in (in_shape, [n, c, h, w]):
        raise UserError(f"{path}: input shape {want_in} is neither NHWC nor NCHW of {in_shape}")
    nchw_out = [out_shape[0], out_shape[3], out_shape[1], out_shape[2]]
    shapes = {d["name"]: [int(s) for s in d["shape"]] for d in runner.outputs}
    name = next((k for k, s in shapes.items() if s == out_shape), None)
    nchw = name is None
    name = name or next((k for k, s in shapes.items() if s == nchw_out), None)
    if name is None:
        raise UserError(f"{path}: no output of shape {out_shape} (NHWC or NCHW): {shapes}")
    to_model = (lambda x: x) if want_in == in_shape else (
        lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    from_model = (lambda y: y.transpose(0, 2, 3, 1)) if nchw else (lambda y: y)
    return lambda x: from_model(runner(to_model(x))[name])


def gpu_accelerator_verdict(path: Path) -> str:
    """The file run once on LiteRT's GPU accelerator (export/accelerator.py), in one line."""
    from export.accelerator import gpu_execution_verdict
    from export.report import gpu_execution_line

    return gpu_execution_line(gpu_execution_verdict(path))


@dataclass
class Converted:
    """One converter's TFLite file of the model (or why there is none)."""

    key: str  # short id for ratios: ours, onnx2tf, litert_torch, baseline
    who: str  # the table's name: converter and version
    path: Path | None
    note: str = ""  # why there is no file
    convert: dict = field(default_factory=dict)  # seconds, peak_rss_mib where measured


def describe_file(path: Path, threads: int) -> dict:
    """What the table shows of one .tflite besides time: ops, rank, Flex, GPU, XNNPACK."""
    from export.tflite_info import inspect_tflite
    from validate.profile import delegate_coverage

    info = inspect_tflite(path)
    coverage = {runtime: delegate_coverage(path, threads, runtime) for runtime in RUNTIMES}
    return {"file": path.name, "size_mb": round(info.size_bytes / 2**20, 2),
            "ops": sum(info.op_histogram.values()), "op_histogram": info.op_histogram,
            "max_rank": info.max_rank, "flex_ops": info.flex_ops,
            "gpu_analyzer": bool(info.gpu_compatible), "gpu_messages": info.gpu_messages,
            "gpu_accelerator": gpu_accelerator_verdict(path),
            "xnnpack": {runtime_label(r): {"partitions": c["partitions"],
                                           "outside": c["not_delegated"]}
                        for r, c in coverage.items()}}


def bench_model(manifest: dict, files: list[Converted], in_shape: list[int],
                out_shape: list[int], threads: int, runs: int) -> dict:
    """Time PyTorch eager and every converted file in both interpreters, interleaved."""
    from validate.runtime import EngineSpec, build_engine, machine, time_interleaved

    engines = {"PyTorch eager": build_engine(EngineSpec("PyTorch eager", "torch", threads),
                                             manifest)}
    labels = {}
    for entry in files:
        if entry.path is None:
            continue
        for runtime in RUNTIMES:
            label = f"{entry.who} ({entry.path.name}), {runtime_label(runtime)}"
            labels[entry.key, runtime] = label
            engines[label] = _nhwc_runner(entry.path, threads, in_shape, out_shape, runtime)
    x = np.random.default_rng(0).random(in_shape, dtype=np.float32)
    print(f"Timing {len(engines)} engines, {runs} interleaved rounds, {threads} threads ...")
    stats = time_interleaved(engines, x, runs=runs, progress=lambda s: print(f"  {s}"),
                             pause_s=PAUSE_S)
    torch_s = stats["PyTorch eager"]

    def diff(a: str, b: str) -> float:
        return float(np.abs(stats[a]["output"] - stats[b]["output"]).max())

    rows = [{"engine": name, "median_s": s["median_s"], "p90_s": s["p90_s"], "min_s": s["min_s"],
             "vs_torch": s["median_s"] / torch_s["median_s"],
             "max_abs_diff_vs_torch": diff(name, "PyTorch eager")} for name, s in stats.items()]
    converters = []
    for entry in files:
        row = {"key": entry.key, "converter": entry.who, "note": entry.note,
               "convert": entry.convert}
        if entry.path is not None:
            print(f"Inspecting {entry.path} ...")
            row.update(describe_file(entry.path, threads))
            row["times"] = {runtime_label(r): {k: stats[labels[entry.key, r]][k]
                                               for k in ("median_s", "min_s", "p90_s")}
                            for r in RUNTIMES}
            row["max_abs_diff_vs_torch"] = max(diff(labels[entry.key, r], "PyTorch eager")
                                               for r in RUNTIMES)
        converters.append(row)
    ratios = {}
    if ("ours", RUNTIMES[0]) in labels:
        for runtime in RUNTIMES:
            ours = labels["ours", runtime]
            ratio = {"ours_vs_torch": stats[ours]["median_s"] / torch_s["median_s"]}
            for entry in files:
                peer = labels.get((entry.key, runtime))
                if entry.key != "ours" and peer is not None:
                    ratio[f"ours_vs_{entry.key}"] = stats[ours]["median_s"] / stats[peer][
                        "median_s"]
                    ratio[f"{entry.key}_vs_ours_max_abs_diff"] = diff(peer, ours)
            ratios[runtime_label(runtime)] = ratio
    return {"shape": in_shape, "threads": threads, "runs": runs, "machine": machine(),
            "torch": {k: torch_s[k] for k in ("median_s", "min_s", "p90_s")},
            "rows": rows, "converters": converters, "ratios": ratios}


def bench_peers(export: Path, peers: Path, venv: Path, threads: int, runs: int,
                baseline: Path | None = None, litert_venv: Path | None = None,
                fused: bool = True) -> dict:
    """NAFNet: ours, onnx2tf, litert-torch (and ``baseline``); the fused model, where the export
    has one: ours against litert-torch's conversion of the PyTorch reference pipeline."""
    from models.reference import reference_model, reference_pipeline

    manifest = read_json(export / "nafnet_fp32.manifest.json")
    shape = manifest["inputs"][0]["shape"]
    out_shape = manifest["outputs"][0]["shape"]
    files = [Converted("ours", "ours", export / "nafnet_fp32.tflite")]
    theirs = convert_with_onnx2tf(export / "nafnet_sim.onnx", peers / "onnx2tf", venv)
    files.append(Converted("onnx2tf", f"onnx2tf {ONNX2TF_VERSION}", theirs,
                           convert=onnx2tf_record(peers / "onnx2tf")))
    if litert_venv is not None:
        files.append(_litert_entry(reference_model(manifest), shape, 1,
                                   peers / "litert-torch" / "nafnet.tflite", litert_venv,
                                   export / "nafnet_fp32.manifest.json"))
    if baseline is not None:
        files.append(Converted("baseline", "onnx-tf without rewrites", baseline))
    result = bench_model(manifest, files, shape, out_shape, threads, runs)
    result["weights"] = _weights(manifest)
    fused_manifest = export / "bokeh_fp32.manifest.json"
    if fused and litert_venv is not None and fused_manifest.is_file() \
            and (export / "bokeh_fp32.tflite").is_file():
        bokeh = read_json(fused_manifest)
        in_shape = bokeh["inputs"][0]["shape"]
        out_shape = _bokeh_shape(bokeh)
        pipeline = reference_pipeline(bokeh)
        files = [Converted("ours", "ours (fused TF graph)", export / "bokeh_fp32.tflite"),
                 _litert_entry(pipeline, in_shape, 2,
                               peers / "litert-torch" / "bokeh_pipeline.tflite", litert_venv,
                               fused_manifest)]
        del pipeline
        result["fused"] = bench_model(bokeh, files, in_shape, out_shape, threads, runs)
        result["fused"]["weights"] = _weights(bokeh)
    return result


def _litert_entry(model, shape: list[int], outputs: int, dest: Path, venv: Path,
                  manifest: Path) -> Converted:
    done = convert_with_litert_torch(model, shape, outputs, dest, venv, newer_than=manifest)
    who = f"litert-torch {done.get('litert_torch', LITERT_TORCH_VERSION)}"
    convert = {k: done[k] for k in ("seconds", "peak_rss_mib", "torch") if k in done}
    return Converted("litert_torch", who, done["path"], done.get("error", ""), convert)


def _bokeh_shape(manifest: dict) -> list[int]:
    """The fused model's bokeh output shape (its other output is the mask)."""
    outputs = manifest["outputs"]
    named = [o for o in outputs if o["name"] == "bokeh"]
    return (named or outputs)[0]["shape"]


def _weights(manifest: dict) -> str:
    def describe(record: dict | None) -> str:
        if not record:
            return "none"
        return record.get("checkpoint") or f"random (seed {record.get('random_seed') or 0})"

    text = f"NAFNet weights: {describe(manifest.get('weights'))}"
    if manifest.get("dpt"):
        text += f"; depth net weights: {describe(manifest['dpt'])}"
    return text


# --- the published section ----------------------------------------------------------------------

def _top_ops(histogram: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in list(histogram.items())[:TOP_OPS])


def _xnnpack(row: dict) -> str:
    """``TF: 145 (outside: MEAN 144); LiteRT: 1``: partitions per interpreter, ops left out."""
    cells = []
    for label, c in row["xnnpack"].items():
        outside = ", ".join(f"{op} {n}" for op, n in c["outside"].items())
        cells.append(f"{label.split()[0]}: {c['partitions']}"
                     + (f" (outside: {outside})" if outside else ""))
    return "; ".join(cells)


def _analyzer(row: dict) -> str:
    """The GPU analyzer's verdict in one cell: unsupported ops named, other reasons shortened."""
    if row["gpu_analyzer"]:
        return "compatible"
    unsupported = [m.removeprefix("Not supported op ") for m in row["gpu_messages"]
                   if m.startswith("Not supported op ")]
    nodes = [m for m in row["gpu_messages"] if "issues at nodes" in m]
    other = [m if len(m) <= 70 else m[:67] + "..." for m in row["gpu_messages"]
             if not m.startswith("Not supported op ") and m not in nodes]
    parts = [f"{len(nodes[0].split('nodes', 1)[1].split('on TFLite')[0].split(','))} nodes"
             ] if nodes else []
    if unsupported:
        parts.append(f"unsupported {', '.join(unsupported)}")
    return "flags " + "; ".join(parts + other)


def format_table(result: dict, title: str) -> list[str]:
    """One table: a row per converter's file, PyTorch eager first."""
    h, w = result["shape"][1:3]
    labels = [runtime_label(r) for r in RUNTIMES]
    torch_s = result["torch"]
    lines = [f"### {title} {h}x{w}, fp32, {result['threads']} threads", "",
             f"{result['weights']}.", "",
             "| converter (file) | MB | ops | top ops | TRANSPOSE | max rank | Flex ops | "
             "GPU analyzer | GPU accelerator | XNNPACK partitions | max abs vs PyTorch | "
             + " | ".join(f"{lab} median (min) s" for lab in labels) + " |",
             "|---" * (11 + len(labels)) + "|",
             "| PyTorch eager | - | - | - | - | - | - | - | - | - | - | "
             + " | ".join(f"{torch_s['median_s']:.3f} ({torch_s['min_s']:.3f})"
                          for _ in labels) + " |"]
    for row in result["converters"]:
        name = row["converter"]
        if "file" not in row:
            lines.append(f"| {name} | did not convert: {row['note']} |" + " |" * (10
                                                                              + len(labels)))
            continue
        seconds = row["convert"].get("seconds")
        if seconds is not None:
            name += f" (converted in {seconds:.0f} s" + (
                f", peak {row['convert']['peak_rss_mib'] / 1024:.1f} GB RSS)"
                if row["convert"].get("peak_rss_mib") else ")")
        times = " | ".join(f"{row['times'][lab]['median_s']:.3f} ({row['times'][lab]['min_s']:.3f})"
                           for lab in labels)
        lines.append(
            f"| {name}: `{row['file']}` | {row['size_mb']:.1f} | {row['ops']} | "
            f"{_top_ops(row['op_histogram'])} | {row['op_histogram'].get('TRANSPOSE', 0)} | "
            f"{row['max_rank']} | {', '.join(row['flex_ops']) or 'none'} | {_analyzer(row)} | "
            f"{row['gpu_accelerator']} | {_xnnpack(row)} | {row['max_abs_diff_vs_torch']:.1e} | "
            f"{times} |")
    lines.append("")
    for label, ratio in result["ratios"].items():
        parts = [f"ours / PyTorch eager **{ratio['ours_vs_torch']:.2f}x**"]
        for key, value in ratio.items():
            if key.startswith("ours_vs_") and key != "ours_vs_torch":
                peer = key.removeprefix("ours_vs_")
                parts.append(f"ours / {peer.replace('_', '-')} **{value:.2f}x** (outputs differ "
                             f"by at most {ratio[f'{peer}_vs_ours_max_abs_diff']:.1e})")
        lines.append(f"- {label}: " + "; ".join(parts) + ".")
    return lines


def format_peers(result: dict, command: str) -> str:
    h, w = result["shape"][1:3]
    m = result["machine"]
    lines = [f"## Peer converters at {h}x{w}: ours, onnx2tf, litert-torch", "",
             f"Command: `{command}`. Machine: {m['cpu']}, {m['cores']} cores, load average "
             f"{m['load_avg_1m']:.1f} at the end. Median (and fastest) of {result['runs']} "
             "interleaved runs after one warm-up, every TFLite file on each interpreter "
             f"(XNNPACK on), {PAUSE_S} s idle before each timed call. Max abs vs PyTorch: the "
             "larger of the two interpreters, same seeded input. GPU analyzer: TensorFlow's GPU "
             "delegate compatibility analyzer (it does not check rank or Flex: own columns). "
             "XNNPACK partitions: delegate partitions in TF's interpreter and in LiteRT's, with "
             "the ops left outside XNNPACK.", ""]
    lines += format_table(result, "NAFNet")
    if "fused" in result:
        lines += ["", *format_table(result["fused"], "Fused photo -> bokeh model")]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "bokeh peers") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"example:\n  {prog} --export-dir build/export")
    p.add_argument("--export-dir", "--export", dest="export_dir", default="build/export",
                   help="our export folder (%(default)s; --export is the old name)")
    p.add_argument("--peers", default="build/peers", help="peer outputs (%(default)s)")
    p.add_argument("--venv", default=".venv-peers", help="onnx2tf's environment (%(default)s)")
    p.add_argument("--litert-torch-venv", default=".venv-litert-torch",
                   help="litert-torch's environment (%(default)s)")
    p.add_argument("--no-litert-torch", action="store_true",
                   help="leave litert-torch out (NAFNet and the fused model)")
    p.add_argument("--no-fused", action="store_true",
                   help="NAFNet only: no litert-torch conversion of the fused model")
    p.add_argument("--baseline", help="also time this TFLite (e.g. one built without rewrites)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--runs", type=positive_int, default=5)
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown to update")
    args = p.parse_args(argv)
    from validate.doc import publish_section

    def body() -> int:
        export = Path(args.export_dir)
        for name in ("nafnet_fp32.manifest.json", "nafnet_sim.onnx", "nafnet_fp32.tflite"):
            if not (export / name).is_file():
                raise UserError(f"{export / name}: no such file; run `make export` first")
        if args.baseline and not Path(args.baseline).is_file():
            raise UserError(f"{args.baseline}: no such TFLite file")
        litert_venv = None
        if not args.no_litert_torch:
            litert_venv = Path(args.litert_torch_venv)
            check_litert_torch_venv(litert_venv)
        result = bench_peers(export, Path(args.peers), Path(args.venv), args.threads, args.runs,
                             Path(args.baseline) if args.baseline else None, litert_venv,
                             fused=not args.no_fused)
        write_json(Path(args.peers) / "peers.json", result)
        given = sys.argv[1:] if argv is None else argv
        command = f"bokeh peers {' '.join(given)}" if given else "make bench-peers"
        publish_section(args.doc, "peers", format_peers(result, command))
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
