"""Each export rewrite pass alone on a small NAFNet: exact (onnxruntime before vs after), and it
fires where it should and nowhere else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import onnx_stages, rewrites
from models.nafnet import NAFNet, randomize_residual_scales

SHAPE = (1, 4, 32, 48)


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    """A 2-level NAFNet with every LayerNorm affine, beta and gamma non-trivial, simplified."""
    torch.manual_seed(0)
    model = NAFNet(4, 3, 8, (1, 2), 1, (1, 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    randomize_residual_scales(model).eval()
    folder = tmp_path_factory.mktemp("rewrites")
    raw = onnx_stages.to_onnx(model, SHAPE, folder / "m.onnx")
    sim = onnx_stages.simplify(raw, folder / "m_sim.onnx")
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    return onnx.load(str(sim)), x, onnx_stages.run_onnx(sim, x)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _run(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> np.ndarray:
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "r.onnx"))
    return onnx_stages.run_onnx(tmp_path / "r.onnx", x)


# A pass that works on another pass's output is tested on that output.
PREREQUISITE = {rewrites.split_convs_at_gate: rewrites.simplegate_as_split}


@pytest.mark.parametrize("rewrite_pass", rewrites.PASSES, ids=lambda f: f.__name__)
def test_pass_alone_is_exact_and_fires(small_sim, tmp_path, rewrite_pass):
    model, x, expected = small_sim
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if rewrite_pass in PREREQUISITE:
        model, _ = PREREQUISITE[rewrite_pass](model)
    rewritten, count = rewrite_pass(model)
    assert count > 0, f"{rewrite_pass.__name__} found nothing in a NAFNet"
    assert np.abs(_run(rewritten, x, tmp_path) - expected).max() <= 1e-5


def test_all_passes_together_exact(small_sim, tmp_path):
    model, x, expected = small_sim
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for rewrite_pass in rewrites.PASSES:
        model, _ = rewrite_pass(model)
    assert np.abs(_run(model, x, tmp_path) - expected).max() <= 1e-5


def test_folds_remove_the_affine_and_scale_ops(small_sim):
    model, _, _ = small_sim
    before = _ops(model)
    folded, n_affine = rewrites.fold_affine_into_next_conv(
        onnx.ModelProto.FromString(model.SerializeToString()))
    folded, n_scale = rewrites.fold_scale_into_prev_conv(folded)
    after = _ops(folded)
    blocks = 6  # (1 + 2) encoder + 1 middle + (1 + 1) decoder blocks
    assert n_affine == 4 * blocks and n_scale == 2 * blocks  # 2 norms x (Mul, Add); beta, gamma
    assert before["Mul"] - after["Mul"] == 2 * blocks + 2 * blocks
    assert before["Add"] - after["Add"] == 2 * blocks
    assert after["Conv"] == before["Conv"]


def test_simplegate_split_is_equal_halves_and_square_is_mul(small_sim):
    model, _, _ = small_sim
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m, _ = rewrites.simplegate_as_split(m)
    m, _ = rewrites.square_as_mul(m)
    splits = [n for n in m.graph.node if n.op_type == "Split"]
    assert len(splits) == 12 and all(not n.attribute or [a.name for a in n.attribute] == ["axis"]
                                     for n in splits)
    assert "Pow" not in _ops(m)
    m, count = rewrites.split_convs_at_gate(m)
    assert count == 12 and "Split" not in _ops(m)


def test_channels_last_leaves_transposes_only_around_nchw_ops(small_sim):
    model, _, _ = small_sim
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for rewrite_pass in rewrites.PASSES:
        m, _ = rewrite_pass(m)
    producers = {o: n for n in m.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    nchw_ops = {"Conv", "DepthToSpace"}
    for t in (n for n in m.graph.node if n.op_type == "Transpose"):
        src = producers.get(t.input[0])
        next_ops = {u.op_type for u in users.get(t.output[0], [])}
        assert (src is None or src.op_type in nchw_ops) or next_ops <= nchw_ops, t.name


class _PaddedAffine(nn.Module):
    """An affine feeding a padded conv and a shared one: neither may be folded."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.rand(1, 4, 1, 1))
        self.padded = nn.Conv2d(4, 4, 3, padding=1)
        self.one = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = x * self.scale + self.shift
        return self.padded(y) + self.one(y)


def test_affine_not_folded_into_padded_or_shared_conv(tmp_path):
    raw = onnx_stages.to_onnx(_PaddedAffine().eval(), (1, 4, 8, 8), tmp_path / "p.onnx")
    _, count = rewrites.fold_affine_into_next_conv(onnx.load(str(raw)))
    assert count == 0


def test_same_padding_only_for_symmetric_stride_1(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Conv2d(4, 4, 2, stride=2)).eval()
    raw = onnx_stages.to_onnx(model, (1, 4, 16, 16), tmp_path / "c.onnx")
    m, count = rewrites.conv_same_padding(onnx.load(str(raw)))
    assert count == 1
    x = np.random.default_rng(0).random((1, 4, 16, 16), dtype=np.float32)
    assert np.abs(_run(m, x, tmp_path) - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-5
