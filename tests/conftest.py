"""Shared fixtures: small shapes, real photos from scikit-image, one export reused by many tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test`: one worker per core, one thread each
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(threads, "1")

SMALL_H, SMALL_W = 64, 96
# The session-wide exports: minutes each on 2 cores. A test that uses one (directly or through
# another fixture) must carry an explicit `slow` mark, so `pytest -m 'not slow'` stays the fast
# loop; collection fails when one is missing (docs/design.md, "Tests").
SLOW_FIXTURES = {"fused_export", "nafnet_export", "quant_export"}
# A switch per optional backend: set (CI sets both), a test that would skip for want of the
# backend fails instead, so a green run proves the path ran.
REQUIRED_BACKENDS = {"gpu": "BOKEH_REQUIRE_GPU", "litert_torch": "BOKEH_REQUIRE_LITERT_TORCH"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`full` implies `slow` (a command-line `-m 'not slow'` replaces pyproject's
    `-m 'not full'`); a test on a session export without its `slow` mark is an error.

    `make test` runs two pytest-xdist workers (`--dist loadgroup`): the tests on the session
    export run in one worker, so the export is made there once (a module may name its own group
    to run in the other worker, making its own), and every other module stays whole in one
    worker, so its module fixtures are built once."""
    unmarked = []
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(pytest.mark.slow)
        on_export = SLOW_FIXTURES & set(item.fixturenames)
        if on_export and not item.get_closest_marker("slow"):
            unmarked.append(item.nodeid)
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("session-export" if on_export
                                                    else item.nodeid.split("::")[0]))
    if unmarked:
        raise pytest.UsageError("tests on a session export need @pytest.mark.slow: "
                                + ", ".join(unmarked))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under BOKEH_REQUIRE_GPU=1 (or BOKEH_REQUIRE_LITERT_TORCH=1) a skipped test of that backend
    is a failure, with the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, switch in REQUIRED_BACKENDS.items():
        if item.get_closest_marker(marker) and os.environ.get(switch) == "1":
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
            report.outcome = "failed"
            report.longrepr = f"{switch}=1, but this {marker} test would skip: {reason}"


def backend_required(marker: str) -> bool:
    """True where the switch of that backend is set (see REQUIRED_BACKENDS)."""
    return os.environ.get(REQUIRED_BACKENDS[marker]) == "1"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """A folder of real photos that scikit-image ships (no download)."""
    import imageio.v3 as iio
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        iio.imwrite(folder / f"{name}.png", getattr(skimage.data, name)())
    return folder


@pytest.fixture(scope="session")
def fused_export(tmp_path_factory):
    """Paper-config NAFNet + tiny random DPT, exported once at 64x96 through every stage, fp32
    and fp16: NAFNet alone (nafnet_*.tflite), fused (bokeh_*.tflite) and fused with the focus
    and strength inputs (bokeh_controls_*.tflite, from the same NAFNet stages)."""
    from export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("export")
    report = export(ExportOptions(out, SMALL_H, SMALL_W, depth="dpt-tiny", depth_short_side=64,
                                  controls=True), echo=lambda s: None)
    return out, report


@pytest.fixture(scope="session")
def nafnet_export(fused_export):
    """The NAFNet half of the shared export (its files are the same as a --no-fuse export's)."""
    return fused_export


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
