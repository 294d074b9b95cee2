"""Shared fixtures: small shapes, real photos from scikit-image, one export reused by many tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMALL_H, SMALL_W = 64, 96
# What makes a test slow (marker `slow`; `-m 'not slow'` skips them while iterating): the
# session-wide exports, calibration, trainer runs and torchrun. `make test` runs them all.
SLOW_FIXTURES = {"fused_export", "nafnet_export", "quant_export"}
SLOW_MODULES = {"test_calib_variants", "test_train_trainer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


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
    from export.pipeline import export

    out = tmp_path_factory.mktemp("export")
    report = export(out, SMALL_H, SMALL_W, dpt_variant="tiny", dpt_short_side=64,
                    controls=True, echo=lambda s: None)
    return out, report


@pytest.fixture(scope="session")
def nafnet_export(fused_export):
    """The NAFNet half of the shared export (its files are the same as a --no-fuse export's)."""
    return fused_export


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
