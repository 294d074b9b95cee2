"""Training data: EBB! pairs, generic paired folders and synthetic scenes, each with a depth mask.

Every dataset yields ``(image [3,H,W], mask [1,H,W], target [3,H,W])`` float32 in [0,1]. A key is
either an index (validation: no augmentation, optional centre crop) or ``(index, epoch)``
(training: a random crop and flips drawn from ``seed, epoch, index``, so an epoch's samples do not
depend on worker count, rank or where a resumed run restarted).

Masks come from a depth cache (one 16-bit PNG per image, ``bokeh depth-cache``) and are
min-max normalised per image to [0,1], as the fused phone graph does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from common.errors import UserError
from common.images import IMAGE_SUFFIXES, load_rgb

EBB_VAL294 = (4400, 4693)


class DataError(UserError, RuntimeError):
    """Bad training data; the message names the file."""


@dataclass(frozen=True)
class Pair:
    """One training example on disk."""

    name: str
    image: Path
    target: Path
    depth: Path


# --- finding pairs -----------------------------------------------------------------------------


def read_id_list(path: Path) -> set[str]:
    """Ids one per line; blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read id list ({exc.strerror})") from None
    return {s.split("#")[0].strip() for s in lines} - {""}


def ebb_pairs(root: Path, depth_dir: Path, split: str = "train",
              val_range: tuple[int, int] = EBB_VAL294, prune_list: Path | None = None
              ) -> list[tuple[str, Path, Path, Path]]:
    """EBB! layout ``root/Training/{original,bokeh}/{i}.jpg``; ``split`` 'train' or 'val'.

    Ids ``val_range`` (inclusive, default 4400-4693: Val294) are validation, the rest training.
    Ids in ``prune_list`` (misaligned pairs, one id a line) are left out of both.
    Returns candidates ``(name, image, target, depth)``; ``check_pairs`` validates them.
    """
    originals = Path(root) / "Training" / "original"
    bokeh = Path(root) / "Training" / "bokeh"
    if not originals.is_dir():
        raise DataError(f"{originals}: no such folder (expected the EBB! layout "
                        "Training/original/{i}.jpg, Training/bokeh/{i}.jpg)")
    pruned = read_id_list(prune_list) if prune_list else set()
    lo, hi = val_range
    out = []
    for f in sorted(originals.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem)):
        if f.stem in pruned or not f.stem.isdigit():
            continue
        is_val = lo <= int(f.stem) <= hi
        if (split == "val") == is_val:
            out.append((f.stem, f, bokeh / f.name, Path(depth_dir) / f"{f.stem}.png"))
    if not out and split == "train":
        raise DataError(f"{originals}: no training images {{i}}.jpg outside ids {lo}-{hi}")
    return out


def folder_pairs(image_dir: Path, target_dir: Path, depth_dir: Path
                 ) -> list[tuple[str, Path, Path, Path]]:
    """Generic paired folders: files with the same stem are a pair; depth is ``{stem}.png``."""
    image_dir, target_dir = Path(image_dir), Path(target_dir)
    for d in (image_dir, target_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder")
    targets = {p.stem: p for p in target_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    out = []
    for f in sorted(image_dir.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            target = targets.get(f.stem, target_dir / f"{f.stem}{f.suffix}")
            out.append((f.stem, f, target, Path(depth_dir) / f"{f.stem}.png"))
    if not out:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _image_size(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises several types for a broken file
        raise DataError(f"{path}: unreadable image ({type(exc).__name__})") from None


def check_pairs(candidates: Sequence[tuple[str, Path, Path, Path]], skip_bad: bool = False
                ) -> list[Pair]:
    """Check that every partner exists, opens, and that image, target and depth sizes agree.

    Reads only the file headers. A bad pair raises ``DataError`` naming the file, or with
    ``skip_bad`` is dropped and counted in one warning.
    """
    good, bad = [], []
    for name, image, target, depth in candidates:
        try:
            size = _image_size(image)
            for other in (target, depth):
                other_size = _image_size(other)
                if other_size != size:
                    raise DataError(f"{other}: size {other_size[0]}x{other_size[1]} differs from "
                                    f"{image} ({size[0]}x{size[1]})")
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append(str(exc))
            continue
        good.append(Pair(name, image, target, depth))
    if bad:
        warnings.warn(f"skipped {len(bad)} bad pair(s) (--skip-bad), first: {bad[0]}",
                      stacklevel=2)
    if not good:
        raise DataError("no usable image pairs found")
    return good


# --- reading -----------------------------------------------------------------------------------


def read_mask(path: Path) -> np.ndarray:
    """A cached disparity PNG (16- or 8-bit) min-max normalised to float32 ``HxW`` in [0,1]."""
    try:
        with Image.open(path) as im:
            d = np.asarray(im if im.mode.startswith("I") else im.convert("L"), dtype=np.float64)
    except Exception as exc:
        raise DataError(f"{path}: unreadable depth map ({type(exc).__name__}: {exc})") from None
    lo, hi = d.min(), d.max()
    return ((d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)).astype(np.float32)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


def crop_and_flip(arrays: Sequence[np.ndarray], crop: int | None, rng: np.random.Generator | None
                  ) -> list[np.ndarray]:
    """The same crop and flips for image, target and mask (``HxW[xC]`` arrays).

    Random crop and horizontal/vertical flips with ``rng``; a centre crop without. Images smaller
    than the crop are reflect-padded so a batch stacks.
    """
    h, w = arrays[0].shape[:2]
    if crop is not None and (h < crop or w < crop):
        ph, pw = max(crop - h, 0), max(crop - w, 0)
        arrays = [np.pad(a, [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2), mode="reflect")
                  for a in arrays]
        h, w = arrays[0].shape[:2]
    if crop is not None:
        if rng is None:
            y, x = (h - crop) // 2, (w - crop) // 2
        else:
            y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        arrays = [a[y:y + crop, x:x + crop] for a in arrays]
    if rng is not None:
        if rng.uniform() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        if rng.uniform() < 0.5:
            arrays = [a[::-1] for a in arrays]
    return arrays


def _to_tensors(image: np.ndarray, mask: np.ndarray, target: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
    return chw(image), torch.from_numpy(np.ascontiguousarray(mask))[None], chw(target)


class PairDataset(Dataset):
    """Pairs read from disk. A file that fails to decode raises ``DataError`` naming it, or
    with ``skip_bad`` is replaced by the next pair and counted (``self.skipped``)."""

    def __init__(self, pairs: Sequence[Pair], crop: int | None = None, seed: int = 0,
                 skip_bad: bool = False):
        self.pairs = list(pairs)
        self.crop = crop
        self.seed = seed
        self.skip_bad = skip_bad
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.pairs[index]
        try:
            image, target = load_rgb(p.image), load_rgb(p.target)
        except UserError as exc:  # the one photo reader's error, as training data's
            raise DataError(str(exc)) from None
        mask = read_mask(p.depth)
        for path, arr in ((p.target, target), (p.depth, mask)):
            if arr.shape[:2] != image.shape[:2]:
                raise DataError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from "
                                f"{p.image} ({image.shape[1]}x{image.shape[0]})")
        return image, mask, target

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.pairs)):
            try:
                image, mask, target = self.load((index + attempt) % len(self.pairs))
                break
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                warnings.warn(f"skipping bad pair (--skip-bad): {exc}", stacklevel=2)
        else:
            raise DataError("every pair failed to load")
        rng = None if epoch is None else sample_rng(self.seed, epoch, index)
        image, mask, target = crop_and_flip([image, mask, target], self.crop, rng)
        return _to_tensors(image, mask, target)


class SyntheticDataset(Dataset):
    """Synthetic scenes (``train.synthetic``) rendered once into memory, seeds ``seed*1e6 + i``."""

    def __init__(self, count: int, size: int = 160, crop: int | None = None, seed: int = 0):
        from train.synthetic import make_scene

        self.items = [make_scene(seed * 1_000_003 + i, size, size) for i in range(count)]
        self.crop = crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image, target, mask = self.items[index]
        rng = None if epoch is None else sample_rng(self.seed, epoch, index)
        image, mask, target = crop_and_flip([image, mask, target], self.crop, rng)
        return _to_tensors(image, mask, target)


# --- ordering ----------------------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank sees per epoch (the remainder is dropped)."""
    return n // (batch_size * world_size)


class EpochSampler(Sampler):
    """Keys ``(index, epoch)`` for one rank: a permutation seeded by ``(seed, epoch)``, split
    across ranks, starting after ``skip_batches`` batches (a resumed epoch)."""

    def __init__(self, n: int, batch_size: int, epoch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        per_rank = batches_per_epoch(n, batch_size, world_size) * batch_size
        mine = perm[rank::world_size][:per_rank].tolist()
        self.keys = [(i, epoch) for i in mine[skip_batches * batch_size:]]

    def __iter__(self) -> Iterator:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

