"""Data layouts, bad-data handling, crops, sampling, synthetic scenes, renderer and depth cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.dpt import dpt_input_size
from train import trainer
from train.data import (
    DataError,
    EpochSampler,
    PairDataset,
    SyntheticDataset,
    check_pairs,
    crop_and_flip,
    ebb_pairs,
    folder_pairs,
    read_mask,
)
from train.depth_cache import build_cache
from train.render import composite, disc_kernel, render_bokeh
from train.synthetic import make_scene


def save_rgb(path, h=20, w=24, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def save_depth(path, h=20, w=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(1000, 3000, h * w).reshape(h, w).astype(np.uint16)
    Image.fromarray(ramp).save(path)


def make_ebb(root, ids):
    for i in ids:
        save_rgb(root / "Training" / "original" / f"{i}.jpg", seed=i)
        save_rgb(root / "Training" / "bokeh" / f"{i}.jpg", seed=i + 1)
        save_depth(root / "depth" / f"{i}.png")


def make_folders(root, stems):
    for s in stems:
        save_rgb(root / "input" / f"{s}.png")
        save_rgb(root / "target" / f"{s}.png")
        save_depth(root / "depth" / f"{s}.png")


def test_ebb_layout_split_and_prune(tmp_path):
    make_ebb(tmp_path, [0, 1, 2, 4400, 4693])
    names = lambda pairs: [p[0] for p in pairs]  # noqa: E731
    assert names(ebb_pairs(tmp_path, tmp_path / "depth", "train")) == ["0", "1", "2"]
    assert names(ebb_pairs(tmp_path, tmp_path / "depth", "val")) == ["4400", "4693"]
    (tmp_path / "prune.txt").write_text("1\n# misaligned\n4400\n")
    pruned = ebb_pairs(tmp_path, tmp_path / "depth", "train", prune_list=tmp_path / "prune.txt")
    assert names(pruned) == ["0", "2"]
    pairs = check_pairs(ebb_pairs(tmp_path, tmp_path / "depth", "train"))
    image, mask, target = PairDataset(pairs, crop=16)[0]
    assert image.shape == (3, 16, 16) and mask.shape == (1, 16, 16) and target.shape == (3, 16, 16)


def test_ebb_missing_root_names_the_folder(tmp_path):
    with pytest.raises(DataError, match="Training/original"):
        ebb_pairs(tmp_path, tmp_path / "depth")


def test_folder_pairs_match_stems(tmp_path):
    make_folders(tmp_path, ["a", "b"])
    pairs = check_pairs(folder_pairs(tmp_path / "input", tmp_path / "target", tmp_path / "depth"))
    assert [p.name for p in pairs] == ["a", "b"]


@pytest.mark.parametrize("damage, culprit", [
    ("missing_target", "target/b.png"),
    ("missing_depth", "depth/b.png"),
    ("unreadable", "input/b.png"),
    ("size", "target/b.png"),
])
def test_bad_pairs_name_the_file_or_are_skipped(tmp_path, damage, culprit):
    make_folders(tmp_path, ["a", "b", "c"])
    if damage == "missing_target":
        (tmp_path / "target" / "b.png").unlink()
    elif damage == "missing_depth":
        (tmp_path / "depth" / "b.png").unlink()
    elif damage == "unreadable":
        (tmp_path / "input" / "b.png").write_bytes(b"not an image")
    else:
        save_rgb(tmp_path / "target" / "b.png", h=21)
    candidates = folder_pairs(tmp_path / "input", tmp_path / "target", tmp_path / "depth")
    with pytest.raises(DataError, match=culprit):
        check_pairs(candidates)
    with pytest.warns(UserWarning, match="skipped 1 bad pair"):
        good = check_pairs(candidates, skip_bad=True)
    assert [p.name for p in good] == ["a", "c"]


def test_truncated_image_found_while_training_names_the_file(tmp_path):
    make_folders(tmp_path, ["a", "b"])
    pairs = check_pairs(folder_pairs(tmp_path / "input", tmp_path / "target", tmp_path / "depth"))
    path = tmp_path / "input" / "a.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels gone
    with pytest.raises(DataError, match="input/a.png"):
        PairDataset(pairs)[0]
    dataset = PairDataset(pairs, skip_bad=True)
    with pytest.warns(UserWarning, match="input/a.png"):
        image, _, _ = dataset[0]  # replaced by the next pair
    assert dataset.skipped == 1 and image.shape == (3, 20, 24)


def test_trainer_reports_bad_data_in_one_line(tmp_path, capsys):
    make_folders(tmp_path, ["a", "b"])
    (tmp_path / "target" / "b.png").unlink()
    rc = trainer.main(["--data", "folders", "--input-dir", str(tmp_path / "input"),
                       "--target-dir", str(tmp_path / "target"), "--depth-dir",
                       str(tmp_path / "depth"), "--out", str(tmp_path / "run"), "--crop", "16",
                       "--no-tensorboard", "--no-progress", "--epochs2", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("bokeh train: error: ") and "target/b.png" in err


def test_mask_is_min_max_normalised(tmp_path):
    save_depth(tmp_path / "d.png")
    m = read_mask(tmp_path / "d.png")
    assert m.dtype == np.float32 and m.min() == 0 and m.max() == 1


def test_crop_and_flip_is_shared_by_image_target_and_mask():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(40, 50, 3)).astype(np.float32)
    for seed in range(5):
        out_image, out_mask, out_target = crop_and_flip(
            [image, image[..., 0], image.copy()], 16, np.random.default_rng(seed))
        assert out_image.shape == (16, 16, 3)
        assert np.array_equal(out_image, out_target)
        assert np.array_equal(out_image[..., 0], out_mask)
    small = crop_and_flip([image[:10, :12]], 16, None)[0]  # reflect-padded up to the crop
    assert small.shape == (16, 16, 3)


def test_epoch_sampler_is_deterministic_disjoint_and_resumable():
    a = EpochSampler(20, 2, epoch=3, seed=1, rank=0, world_size=2)
    b = EpochSampler(20, 2, epoch=3, seed=1, rank=1, world_size=2)
    assert list(a) == list(EpochSampler(20, 2, epoch=3, seed=1, rank=0, world_size=2))
    assert not {i for i, _ in a} & {i for i, _ in b}
    assert len(a) == 10
    assert list(EpochSampler(20, 2, 3, 1, 0, 2, skip_batches=2)) == list(a)[4:]
    assert list(a) != list(EpochSampler(20, 2, epoch=4, seed=1, rank=0, world_size=2))


# --- synthetic scenes and the renderer ------------------------------------------------------


def test_synthetic_scene_is_exact_and_deterministic():
    sharp, bokeh, mask = make_scene(7, 64, 64)
    again = make_scene(7, 64, 64)
    assert all(np.array_equal(x, y) for x, y in zip((sharp, bokeh, mask), again, strict=True))
    assert mask.min() == 0 and mask.max() == 1
    subject = mask == 1  # in focus and front-most: untouched by the lens
    assert np.abs(bokeh[subject] - sharp[subject]).max() < 1e-6
    assert np.abs(bokeh[mask == 0] - sharp[mask == 0]).mean() > 0.005  # background is blurred


def test_synthetic_dataset_shapes():
    ds = SyntheticDataset(3, size=48, crop=32, seed=1)
    image, mask, target = ds[(0, 0)]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert torch.equal(ds[(1, 5)][0], ds[(1, 5)][0])
    assert ds[2][0].shape == (3, 32, 32)  # no epoch: the centre crop


def test_disc_kernel_and_in_focus_identity():
    assert disc_kernel(0).shape == (1, 1)
    k = disc_kernel(3.2)
    assert k.sum() == pytest.approx(1) and k[k.shape[0] // 2, 0] > 0
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(32, 32, 3))
    flat = np.full((32, 32), 0.7)  # everything at the focus plane
    assert np.allclose(render_bokeh(image, flat, focus=0.0, max_radius=5), image)


def test_renderer_is_occlusion_aware():
    # A sharp white square in front of a blurred black background: no black bleeds into it.
    h = w = 40
    white = np.ones((h, w, 3))
    square = np.zeros((h, w))
    square[10:30, 10:30] = 1
    out = composite([(np.zeros((h, w, 3)), np.ones((h, w)), 6.0), (white, square, 0.0)])
    assert np.allclose(out[10:30, 10:30], 1)
    assert out[5, 5].max() < 1e-6


# --- depth cache ------------------------------------------------------------------------------


def test_dpt_input_size():
    assert dpt_input_size(1024, 1536) == (384, 576)
    assert dpt_input_size(1536, 1024) == (576, 384)
    h, w = dpt_input_size(300, 451)
    assert h == 384 and w % 32 == 0


def test_depth_cache_with_a_stand_in_mask_source(tmp_path):
    save_rgb(tmp_path / "images" / "0.jpg", h=30, w=45)
    seen = []

    def stand_in(photo):  # any mask callable: here brightness
        seen.append(tuple(photo.shape))
        assert photo.min() >= 0 and photo.max() <= 1
        return photo.mean(1, keepdim=True)

    assert build_cache(tmp_path / "images", tmp_path / "depth", stand_in, progress=False) == 1
    assert seen == [(1, 3, 30, 45)]
    with Image.open(tmp_path / "depth" / "0.png") as im:
        assert im.size == (45, 30) and np.asarray(im).max() == 65535
    assert build_cache(tmp_path / "images", tmp_path / "depth", stand_in, progress=False) == 0


def test_trainer_on_an_ebb_layout_with_skip_bad(tmp_path, capsys):
    make_ebb(tmp_path, [0, 1, 2, 3, 4, 5])
    (tmp_path / "Training" / "bokeh" / "3.jpg").unlink()  # a missing partner
    tiny = '{"width": 4, "enc_blocks": [1], "middle_blocks": 1, "dec_blocks": [1]}'
    args = ["--data", "ebb", "--data-root", str(tmp_path), "--depth-dir", str(tmp_path / "depth"),
            "--val-range", "5-5", "--crop", "16", "--batch-size", "2", "--epochs1", "1",
            "--epochs2", "0", "--nafnet-config", tiny, "--out", str(tmp_path / "run"),
            "--no-tensorboard", "--no-progress", "--samples", "1"]
    assert trainer.main(args) == 2
    assert "bokeh/3.jpg" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"skipped 1 bad pair\(s\) \(--skip-bad\), first: .*3.jpg"):
        assert trainer.main([*args, "--skip-bad"]) == 0
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"step": 2' in summary  # 4 good training pairs (0, 1, 2, 4) in batches of 2


def test_renderer_cli(tmp_path, capsys):
    from train.render import main as render_main

    save_rgb(tmp_path / "photo.png", h=24, w=32)
    save_depth(tmp_path / "disp.png", h=24, w=32)
    assert render_main(["--image", str(tmp_path / "photo.png"), "--disparity",
                        str(tmp_path / "disp.png"), "--out", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (32, 24)
    save_depth(tmp_path / "small.png", h=20, w=32)
    assert render_main(["--image", str(tmp_path / "photo.png"), "--disparity",
                        str(tmp_path / "small.png"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "small.png" in err


def test_depth_cache_cli_errors_name_the_file(tmp_path, capsys):
    from train.depth_cache import main as cache_main

    assert cache_main(["--dpt-weights", str(tmp_path / "none.pt"), "--images", str(tmp_path),
                       "--out", str(tmp_path / "d")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_empty_folders_are_named(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "target").mkdir()
    with pytest.raises(DataError, match="input: no images"):
        folder_pairs(tmp_path / "input", tmp_path / "target", tmp_path / "depth")
    (tmp_path / "Training" / "original").mkdir(parents=True)
    with pytest.raises(DataError, match="original: no training images"):
        ebb_pairs(tmp_path, tmp_path / "depth")
