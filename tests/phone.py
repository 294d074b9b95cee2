"""One check of what makes a .tflite phone-ready, shared by every test of an exported file.

Not a test module: tests import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

from export.tflite_info import TFLiteInfo, inspect_tflite


def assert_phone_ready(tflite: Path, report: dict | None = None) -> TFLiteInfo:
    """Builtin ops only (no Flex), tensors of rank <= 4, static shapes and the GPU analyzer's
    yes, in the file and in the export's report.json entry when given; returns the file's
    facts for further checks."""
    info = inspect_tflite(tflite)
    assert info.flex_ops == [], info.flex_ops
    assert info.max_rank <= 4, info.max_rank
    assert all(-1 not in t["shape"] for t in info.inputs + info.outputs), info.inputs
    assert info.gpu_compatible is True, info.gpu_messages[:5]
    if report is not None:
        entry = report["variants"][Path(tflite).name]
        assert entry["gpu_compatible"] is True and entry["flex_ops"] == []
        assert entry["gpu_messages"] == info.gpu_messages[:5]
    return info
