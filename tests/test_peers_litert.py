"""litert-torch as a peer converter (`make bench-peers`): a small NAFNet converted in
``.venv-litert-torch``, its table row (ops, rank, Flex, max abs vs PyTorch) and a failed
conversion reported as a row, not a crash. Skipped where that environment is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.runner import RUNTIMES, runtime_label

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-litert-torch"
H, W = 64, 96
SMALL = dict(in_channels=4, out_channels=3, width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1,
             dec_blocks=(1, 1, 1, 1))

# A conversion in a second environment: slow; under BOKEH_REQUIRE_LITERT_TORCH=1 the skip fails.
pytestmark = [pytest.mark.slow, pytest.mark.litert_torch, pytest.mark.skipif(
    not (VENV / ".installed").is_file(),
    reason=f"{VENV.name} is not installed (`make litert-torch-env` makes it: litert-torch 0.10.0, "
           "about 2 GB)")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from models.nafnet import random_nafnet
    from validate.peers import convert_with_litert_torch

    dest = tmp_path_factory.mktemp("litert") / "nafnet.tflite"
    done = convert_with_litert_torch(random_nafnet(SMALL, 0), [1, H, W, 4], 1, dest, VENV)
    return done


def test_small_nafnet_converts_builtin_rank4_and_exact(converted):
    from validate.peers import (
        Converted,
        bench_model,
        convert_with_litert_torch,
        format_table,
    )

    assert converted["path"] is not None, converted.get("error")
    assert converted["seconds"] > 0 and converted["litert_torch"] == "0.10.0"
    manifest = {"model": "nafnet", "nafnet_config": SMALL, "weights": {"random_seed": 0}}
    result = bench_model(manifest, [Converted("litert_torch", "litert-torch 0.10.0",
                                              converted["path"], convert=converted)],
                         [1, H, W, 4], [1, H, W, 3], threads=1, runs=1)
    result["weights"] = "random"
    row = result["converters"][0]
    # 9 blocks: 2 LayerNorms each (MEAN x2), convs 1-5, the intro/ending/down/up convs
    assert row["op_histogram"]["CONV_2D"] >= 9 * 4 + 2 + 4 + 4
    assert row["op_histogram"]["DEPTHWISE_CONV_2D"] == 9
    assert row["max_rank"] <= 4 and row["flex_ops"] == [] and row["gpu_analyzer"]
    # the GPU accelerator's verdict: it ran (a device, e.g. make setup-gpu) or says why not
    assert row["gpu_accelerator"].startswith(("ran (max abs vs CPU", "not tried: no GPU device"))
    assert row["max_abs_diff_vs_torch"] < 1e-4
    assert set(row["times"]) == {runtime_label(r) for r in RUNTIMES}
    table = "\n".join(format_table(result, "NAFNet"))
    assert f"`{converted['path'].name}`" in table and "litert-torch 0.10.0 (converted in" in table
    assert row["gpu_accelerator"] in table
    # the same file again: reused, not converted anew
    again = convert_with_litert_torch(None, [1, H, W, 4], 1, converted["path"], VENV)
    assert again.get("reused") and again["path"] == converted["path"]


def test_failed_conversion_is_a_row_not_a_crash(tmp_path):
    from validate.peers import convert_with_litert_torch, format_table

    dest = tmp_path / "wrong.tflite"
    done = convert_with_litert_torch({"not": "a module"}, [1, H, W, 4], 1, dest, VENV)
    assert done["path"] is None and done["error"].startswith("exit 2: error: ")
    assert "not a torch.nn.Module" in done["error"]
    assert not dest.with_suffix(".pt").exists()  # the pickled module is removed
    result = {"shape": [1, H, W, 4], "threads": 1, "weights": "random", "ratios": {},
              "torch": {"median_s": 1.0, "min_s": 1.0},
              "converters": [{"converter": "litert-torch 0.10.0", "note": done["error"]}]}
    assert "did not convert: exit " in "\n".join(format_table(result, "NAFNet"))
    assert not dest.exists()
