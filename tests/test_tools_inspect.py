"""tools.inspect: the one-screen report, its JSON, its verdicts and its refusals of bad files."""

from __future__ import annotations

import json

import pytest
from tools_models import dynamic_tflite, flex_tflite

from tools.inspect import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {"flex": flex_tflite(folder), "dynamic": dynamic_tflite(folder)}


@pytest.mark.slow
def test_report_of_fused_fp16(fused_export, capsys):
    out, _ = fused_export
    assert main([str(out / "bokeh_fp16.tflite")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("bokeh_fp16.tflite: ")
    for line in ("photo", "[1,64,96,3]", "bokeh", "mask", "shapes     static",
                 "Flex ops   none", "max rank   4", "GPU        READY for the TFLite GPU delegate",
                 "ops (by count):", "CONV_2D", "largest tensors:"):
        assert line in text, line


@pytest.mark.slow
def test_json_report(fused_export, capsys):
    out, _ = fused_export
    assert main([str(out / "bokeh_fp32.tflite"), "--json", "--largest", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gpu_verdict"] == "READY" and info["flex_ops"] == [] and info["max_rank"] == 4
    assert [t["name"] for t in info["inputs"]] == ["photo"]
    assert len(info["largest_tensors"]) == 2 and info["dynamic"] == []
    assert sum(info["op_histogram"].values()) > 100


def test_flex_and_dynamic_models_are_flagged(tiny, capsys):
    assert main([str(tiny["flex"])]) == 0
    text = capsys.readouterr().out
    assert "Flex ops   Cumprod" in text and "GPU        NOT READY" in text
    assert "- Flex ops Cumprod: the GPU delegate runs builtin ops only" in text
    assert main([str(tiny["dynamic"])]) == 0
    assert "shapes     DYNAMIC: photo [1,-1,-1,3]" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "no such TFLite file"),
    (b"junk bytes, not a flatbuffer", "not a readable TFLite model"),
])
def test_missing_or_corrupt_file(tmp_path, capsys, content, message):
    path = tmp_path / "m.tflite"
    if content is not None:
        path.write_bytes(content)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0]
    assert captured.out == ""
