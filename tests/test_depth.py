"""The depth-net registry (models/depth.py): names, input rules, normalisation, checkpoints of
another net refused by name, the manifest record, and the export options that choose a net."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import CheckpointError, UserError
from models.depth import (
    DEPTH_NETS,
    depth_input_size,
    depth_names,
    depth_net,
    depth_record,
    depth_record_of,
    identify_checkpoint,
    load_depth_model,
    model_from_record,
)
from tools.cli import export_main

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINY = ("dpt-tiny", "midas-small-tiny", "depth-anything-v2-small-tiny")


def _input(name: str, seed: int = 0) -> torch.Tensor:
    side = 2 * depth_net(name).multiple
    return torch.rand(1, 3, side, side + depth_net(name).multiple,
                      generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_names_rules_and_normalisation():
    assert depth_names(tests=False) == ("dpt-hybrid", "dpt-large", "midas-small",
                                        "depth-anything-v2-small")
    assert set(TINY) <= set(depth_names())
    rules = {n: (e.multiple, e.short_side, (e.mean, e.std), e.official_file)
             for n, e in DEPTH_NETS.items() if not e.test_only}
    assert rules == {
        "dpt-hybrid": (32, 384, ((0.5,) * 3, (0.5,) * 3), "dpt_hybrid_384.pt"),
        "dpt-large": (32, 384, ((0.5,) * 3, (0.5,) * 3), "dpt_large_384.pt"),
        "midas-small": (32, 256, IMAGENET, "midas_v21_small_256.pt"),
        "depth-anything-v2-small": (14, 518, IMAGENET, "depth_anything_v2_vits.pth"),
    }
    for name in TINY:  # a test config has the rules of the net it shrinks
        parent = {"dpt-tiny": "dpt-hybrid"}.get(name, name.removesuffix("-tiny"))
        assert depth_net(name).multiple == depth_net(parent).multiple
        assert depth_net(name).mean == depth_net(parent).mean


def test_old_dpt_variants_are_aliases():
    assert [depth_net(v).name for v in ("hybrid", "large", "tiny")] == [
        "dpt-hybrid", "dpt-large", "dpt-tiny"]
    with pytest.raises(UserError, match="unknown depth net 'midas'.*midas-small.*test configs"):
        depth_net("midas")


def test_input_size_keeps_aspect_and_rounds_to_the_multiple():
    assert depth_input_size("dpt-hybrid", 1024, 1536) == (384, 576)
    assert depth_input_size("midas-small", 1024, 1536) == (256, 384)
    assert depth_input_size("depth-anything-v2-small", 1024, 1536) == (518, 784)
    assert depth_input_size("depth-anything-v2-small", 1536, 1024) == (784, 518)
    assert depth_input_size("midas-small", 1024, 1536, short_side=384) == (384, 576)
    with pytest.raises(UserError, match="depth-anything-v2-small needs a positive multiple of 14"):
        depth_input_size("depth-anything-v2-small", 1024, 1536, short_side=512)
    with pytest.raises(UserError, match="midas-small needs a positive multiple of 32"):
        depth_input_size("midas-small", 1024, 1536, short_side=100)


@pytest.mark.parametrize("name", TINY)
def test_random_model_eval_deterministic_official_output(name):
    model = load_depth_model(name)
    assert not model.training
    x = _input(name)
    with torch.no_grad():
        out = model(x)
        again = load_depth_model(name)(x)
    assert out.shape == (1, *x.shape[-2:]) and out.dtype == torch.float32
    assert torch.equal(out, again) and out.std() > 0 and (out >= 0).all()
    assert not torch.equal(out, load_depth_model(name, seed=1)(x))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A saved state dict of every tiny net, by name."""
    folder = tmp_path_factory.mktemp("depth_files")
    files = {}
    for name in TINY:
        files[name] = folder / f"{name}.pt"
        torch.save(load_depth_model(name, seed=3).state_dict(), files[name])
    return files


@pytest.mark.parametrize("kind", TINY)
def test_checkpoint_is_recognised_and_loads_as_itself(tiny_files, kind):
    state = torch.load(tiny_files[kind], weights_only=True)
    assert identify_checkpoint(state) == kind
    x = _input(kind)
    with torch.no_grad():
        assert torch.equal(load_depth_model(kind, tiny_files[kind])(x),
                           load_depth_model(kind, seed=3)(x))


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("named", [*TINY, "dpt-hybrid", "midas-small", "depth-anything-v2-small"])
def test_checkpoint_of_another_net_is_refused_by_name(tiny_files, kind, named):
    if named == kind:
        return
    path = tiny_files[kind]
    with pytest.raises(CheckpointError) as info:
        load_depth_model(named, path)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{path}: is a {depth_net(kind).title} checkpoint ({kind}), not "
                       f"{named}; use --depth {kind}")


def test_file_of_no_depth_net_gets_the_architecture_error(tmp_path):
    from models.nafnet import NAFNet

    path = tmp_path / "nafnet.pt"
    torch.save(NAFNet(width=8, enc_blocks=(1,), dec_blocks=(1,)).state_dict(), path)
    assert identify_checkpoint(torch.load(path, weights_only=True)) is None
    with pytest.raises(CheckpointError, match="nafnet.pt: not a MiDaS v2.1 Small checkpoint"):
        load_depth_model("midas-small", path)
    with pytest.raises(CheckpointError, match="nafnet.pt: not a Depth Anything V2 checkpoint"):
        load_depth_model("depth-anything-v2-small", path)


@pytest.mark.parametrize("name", TINY)
def test_record_rebuilds_the_same_module_after_json(name, tiny_files):
    model = load_depth_model(name, seed=5)
    record = json.loads(json.dumps(depth_record(name, model, None, 5, (64, 96))))
    assert record["name"] == name and record["input_size"] == [64, 96]
    assert record["checkpoint"] is None and record["random_seed"] == 5
    assert [record["mean"], record["std"]] == [list(v) for v in (depth_net(name).mean,
                                                                 depth_net(name).std)]
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(model_from_record(depth_record_of({"depth": record}))(x), model(x))
    from_file = depth_record(name, model, tiny_files[name], None, (64, 96))
    assert from_file["checkpoint"] == str(tiny_files[name].resolve())
    assert from_file["random_seed"] is None
    with torch.no_grad():
        assert torch.equal(model_from_record(from_file)(x),
                           load_depth_model(name, tiny_files[name])(x))


def test_old_manifest_dpt_record_still_reads():
    """Exports made before the registry recorded a MiDaS DPT under 'dpt', without name or
    normalisation."""
    import dataclasses

    from models.dpt import tiny_dpt_config

    old = {"dpt": {"checkpoint": None, "random_seed": 0, "input_size": [64, 96],
                   "config": json.loads(json.dumps(dataclasses.asdict(tiny_dpt_config())))}}
    record = depth_record_of(old)
    assert record["name"] == "dpt-tiny" and record["mean"] == [0.5] * 3
    x = _input("dpt-tiny")
    with torch.no_grad():
        assert torch.equal(model_from_record(record)(x), load_depth_model("dpt-tiny")(x))
    with pytest.raises(UserError, match="no depth-net record"):
        depth_record_of({"dpt": None})


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--depth", "midas"], "unknown depth net 'midas'"),
    (["--depth", "midas-small", "--depth-short-side", "100"],
     "midas-small needs a positive multiple of 32"),
    (["--depth", "depth-anything-v2-small", "--dpt-short-side", "384"],
     "needs a positive multiple of 14"),
    (["--depth", "midas-small", "--dpt-variant", "large"],
     "--depth midas-small and --dpt-variant dpt-large disagree"),
])
def test_export_refuses_bad_depth_options_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = export_main(["--export-dir", str(out), "--height", "64", "--width", "96", *args])
    except SystemExit as exc:  # argparse's own error (the --depth type)
        code = exc.code
    assert code == 2
    assert message in _error_line(capsys)
    assert not out.exists() or not list(out.iterdir())


def test_export_refuses_another_nets_weights(tmp_path, capsys, tiny_files):
    code = export_main(["--export-dir", str(tmp_path / "out"), "--height", "64", "--width", "96",
                        "--depth", "depth-anything-v2-small",
                        "--depth-weights", str(tiny_files["midas-small-tiny"])])
    assert code == 2
    assert _error_line(capsys).endswith(
        "is a MiDaS v2.1 Small (tiny test config) checkpoint (midas-small-tiny), not "
        "depth-anything-v2-small; use --depth midas-small-tiny")


@pytest.mark.parametrize("old, new, dest, value", [
    ("--out", "--export-dir", "export_dir", "somewhere"),
    ("--dpt-weights", "--depth-weights", "depth_weights", "w.pt"),
    ("--dpt-short-side", "--depth-short-side", "depth_short_side", "64"),
])
def test_each_old_export_option_name_is_its_new_one(old, new, dest, value):
    """The old names are aliases at the CLI edge only: they parse into the canonical option."""
    from tools.cli import build_export_parser

    parser = build_export_parser("bokeh export")
    assert getattr(parser.parse_args([old, value]), dest) == \
        getattr(parser.parse_args([new, value]), dest)
