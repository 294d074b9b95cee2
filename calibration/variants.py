"""Quantize an existing fused export again, on new calibration data, without its earlier stages.

The conversion itself is an export stage (export/quantize.py); this module brings the data.
"""

from __future__ import annotations

from pathlib import Path

from calibration.dataset import calibration_set
from common.files import read_json
from export.quantize import write_quant_variants
from export.report import StageLog, write_report


def add_quant_variants(export_dir: str | Path, variants: tuple[str, ...], calib_dir=None,
                       calib_samples: int = 32, echo=print) -> dict:
    """Quantize an existing fused export again (new calibration folder or sample count)
    without rerunning the earlier stages; returns the updated report."""
    out = Path(export_dir)
    base = read_json(out / "bokeh_fp32.manifest.json")
    frozen = next(s for s in base["stages"] if s["name"] == "bokeh-frozen-graph")
    shapes = {t["name"]: t["shape"] for t in base["inputs"]}
    io_spec = {"inputs": {n: shapes[n] for n in frozen["inputs"]}, "outputs": frozen["outputs"]}
    calibration = calibration_set(base["height"], base["width"], calib_samples, calib_dir)
    report = read_json(out / "report.json")
    log = StageLog(out, echo, report["stages"])
    report["variants"].update(write_quant_variants(out / frozen["path"], io_spec, variants,
                                                   calibration, base, log))
    write_report(out, report)
    return report
