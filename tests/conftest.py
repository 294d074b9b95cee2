"""Shared fixtures: small shapes, real photos from scikit-image, one export reused by many tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMALL_H, SMALL_W = 64, 96


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
def nafnet_export(tmp_path_factory):
    """The paper-config NAFNet exported once at 64x96 through every stage (fp32 and fp16)."""
    from export.pipeline import export_nafnet

    out = tmp_path_factory.mktemp("export")
    report = export_nafnet(out, SMALL_H, SMALL_W, echo=lambda s: None)
    return out, report


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
