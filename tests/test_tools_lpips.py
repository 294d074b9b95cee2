"""LPIPS from local files: the accepted weight layouts, its basic properties, clear refusals.

No official weights are available offline, so these check the metric's structure with random
weights, not its published values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import UserError
from models.lpips import LPIPS, alexnet_features, load_lpips


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights split the way they ship: torchvision AlexNet file + LPIPS v0.1 heads."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    model = LPIPS()
    with torch.no_grad():
        for k in range(5):  # the official heads are non-negative
            head = getattr(model, f"lin{k}").model[1].weight
            head.copy_(head.abs())
    state = model.state_dict()
    alexnet = {k: v for k, v in state.items() if k.startswith("features.")}
    alexnet["classifier.1.weight"] = torch.zeros(4, 4)  # ignored
    torch.save(alexnet, folder / "alexnet.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, folder / "alex.pth")
    return folder, model


def test_properties(weights, rng):
    folder, _ = weights
    metric = load_lpips([folder / "alexnet.pth", folder / "alex.pth"])
    a = rng.random((64, 80, 3), dtype=np.float32)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    assert metric.distance(a, a) == pytest.approx(0.0, abs=1e-7)
    d = metric.distance(a, b)
    assert d > 0 and d == pytest.approx(metric.distance(b, a), rel=1e-5)
    assert metric.distance(a, np.clip(a + 0.02, 0, 1)) < d


def test_lpips_module_layout_gives_the_same_numbers(weights, tmp_path, rng):
    """A saved LPIPS module keeps AlexNet under net.slice{k}.{i}: same weights, same value."""
    folder, model = weights
    slices = {1: range(0, 2), 2: range(2, 5), 3: range(5, 8), 4: range(8, 10), 5: range(10, 12)}
    state = {"scaling_layer.shift": model.shift, "scaling_layer.scale": model.scale}
    for k, idx in slices.items():
        for i in idx:
            for name, _ in alexnet_features()[i].named_parameters():
                state[f"net.slice{k}.{i}.{name}"] = model.state_dict()[f"features.{i}.{name}"]
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("lin")})
    torch.save(state, tmp_path / "full.pth")
    a, b = rng.random((2, 48, 48, 3), dtype=np.float32)
    split = load_lpips([folder / "alexnet.pth", folder / "alex.pth"]).distance(a, b)
    assert load_lpips([tmp_path / "full.pth"]).distance(a, b) == pytest.approx(split, rel=1e-6)


def test_refusals(weights, tmp_path):
    folder, _ = weights
    with pytest.raises(UserError, match="nope.pth: no such LPIPS weights file"):
        load_lpips([tmp_path / "nope.pth"])
    with pytest.raises(UserError, match="missing 5 keys"):
        load_lpips([folder / "alexnet.pth"])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth: not readable"):
        load_lpips([tmp_path / "bad.pth"])
