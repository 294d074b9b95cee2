"""report.json and report.txt of an export run: what each stage did, what each file is, and
every parity result recorded against the run that made the files."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.files import human_bytes, read_json, write_bytes, write_json
from export.arith import verdict_line


@dataclass
class StageLog:
    """Collects what each stage did, prints one line per stage and becomes report.json."""

    out_dir: Path
    echo: Callable[[str], None] = print
    stages: list[dict] = field(default_factory=list)

    def run(self, name: str, fn: Callable, *args, note: str = "", **kwargs):
        if note:
            self.echo(f"  .. {name}: {note}")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        artifact = result[0] if isinstance(result, tuple) else result
        entry = {"stage": name, "seconds": round(seconds, 2)}
        if isinstance(artifact, Path):
            entry.update(artifact=artifact.name, bytes=_size(artifact))
            self.echo(f"  ok {name:<12} {seconds:6.1f} s  {artifact.name}  "
                      f"({human_bytes(entry['bytes'])})")
        else:
            self.echo(f"  ok {name:<12} {seconds:6.1f} s")
        self.stages.append(entry)
        return result


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def banner(text: str) -> str:
    bar = "!" * 78
    return f"\n{bar}\n!! {text}\n{bar}\n"


def summary_text(report: dict) -> str:
    """A few lines a person reads after the export: per variant size, ops, Flex, rank, GPU."""
    lines = [f"Export summary ({report['height']}x{report['width']}, run "
             f"{report.get('run_id', '?')}):"]
    if report.get("failed"):
        lines.append(f"  EXPORT FAILED: {report['failed']}")
    for w in report["warnings"]:
        lines.append(f"  WARNING: {w}")
    if report.get("depth"):
        from models.depth import describe_mask_source, describe_record

        lines.append(f"  depth net: {describe_record(report['depth'])}")
        trained = (report.get("weights") or {}).get("trained_with_depth")
        lines.append("  NAFNet trained on masks of: " + (
            describe_mask_source(trained) if trained else "not recorded (random weights, or "
            "a checkpoint made before bokeh train recorded its depth net)"))
    total = sum(s["seconds"] for s in report["stages"])
    lines.append(f"  {len(report['stages'])} stages in {total:.0f} s")
    for name, v in report["variants"].items():
        if "unsupported" in v:
            lines.append(f"  {name}: {v['unsupported']}")
            continue
        if "ops" not in v:
            lines.append(f"  {name}: FAILED builtin conversion; Flex ops {v['flex_ops']}")
            continue
        top = ", ".join(f"{k} {n}" for k, n in list(v["ops"].items())[:3])
        lines.append(
            f"  {name}: {human_bytes(v['bytes'])}, {sum(v['ops'].values())} ops ({top} ...), "
            f"Flex ops: {', '.join(v['flex_ops']) or 'none'}, max rank {v['max_rank']}, "
            f"GPU delegate: {'compatible' if v['gpu_compatible'] else 'ISSUES'}"
            + (f", GPU execution: {gpu_execution_line(v['gpu_execution'])}"
               if "gpu_execution" in v else ""))
    for name, v in report["variants"].items():
        if v.get("fp16_arithmetic") and "not_evaluated" not in v["fp16_arithmetic"]:
            fp16 = v["fp16_arithmetic"]
            lines.append(f"  {'FP16 ARITHMETIC FAIL ' if fp16['passed'] is False else ''}"
                         f"{name}: {verdict_line(fp16)}")
    for name, v in report.get("gpu_execution", {}).items():
        lines.append(f"  GPU execution {name}: {gpu_execution_line(v)}")
    for name, p in report.get("parity", {}).items():
        lines.append(f"  parity {name}: {'PASS' if p['passed'] else 'FAIL'} "
                     f"({p['summary']})")
    return "\n".join(lines) + "\n"


def gpu_execution_line(verdict: dict) -> str:
    """'ran (max abs vs CPU 1.3e-06)', 'failed: why' or 'not tried: why'."""
    if verdict["status"] == "ran":
        return f"ran (max abs vs CPU {verdict['max_abs_vs_cpu']:.1e})"
    return f"{verdict['status']}: {verdict.get('reason', '')}"


def record_parity(report_path: str | Path, manifest: dict, result: dict) -> bool:
    """Add a parity result to the report.json of the run that wrote the file; ``False`` (and
    nothing written) when that report belongs to another run."""
    report_path = Path(report_path)
    report = read_json(report_path)
    if report.get("run_id") != manifest.get("run_id"):
        return False
    on_gpu = result.get("accelerator") == "gpu"
    key = result["tflite"] + (" on GPU" if on_gpu else "") + (
        f" in {result['arithmetic']['policy']} arithmetic" if result.get("arithmetic") else "")
    report.setdefault("parity", {})[key] = result
    if on_gpu:  # the GPU-execution verdict, beside the analyzer's
        vs_cpu = next(s for s in result["stages"] if s["stage"].endswith(" vs CPU"))
        errors = [r["error"] for r in vs_cpu["inputs"] if "error" in r]
        report.setdefault("gpu_execution", {})[result["tflite"]] = (
            {"status": "failed", "reason": errors[0]} if errors else
            {"status": "ran", "max_abs_vs_cpu": vs_cpu["max_abs_diff"],
             "within_tolerance": vs_cpu["passed"], "by": "bokeh parity --accelerator gpu"})
    write_report(report_path.parent, report)
    return True


def write_report(out: Path, report: dict) -> None:
    """report.json and its readable summary report.txt."""
    write_json(out / "report.json", report)
    write_bytes(out / "report.txt", summary_text(report).encode())
