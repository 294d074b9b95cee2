"""The representative dataset: photos preprocessed exactly as the fused model's ``photo`` input.

Post-training quantization picks each activation's range from what the model sees during
calibration, so the samples must look like real input: RGB float32 ``[1, H, W, 3]`` in [0, 1],
fitted to the static size the way `validate parity` fits photos (``common.images.fit_to_size``).
The order is deterministic (sorted files, seeded crops), so two exports calibrate identically.

Sources: an image folder (``CALIB_DIR``, e.g. EBB! originals), else an embedded set of
scikit-image's offline photos plus synthetic scenes. Crops and flips of the sources fill up
``num_samples``. The held-out photos used for the accuracy table are never calibration sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from common.errors import UserError
from common.images import fit_to_size, list_images, load_rgb

DEFAULT_SAMPLES = 32
# scikit-image photos that load offline (0.26), split once so calibration never sees held-out
# scenes. The stereo pair is one scene: both views stay on the calibration side.
CALIBRATION_PHOTOS = ("astronaut", "stereo_motorcycle:0", "stereo_motorcycle:1")
HELD_OUT_PHOTOS = ("coffee", "chelsea", "rocket")
SYNTHETIC_SCENES = 3


@dataclass
class Source:
    """A calibration photo, loaded when a sample needs it: 32 EBB! originals held as float
    would take 600 MB for the whole export."""

    label: str
    load: Callable[[], np.ndarray]  # -> HxWx3 float32 in [0, 1]


def skimage_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as float32 HxWx3 in [0, 1] ("name:i" picks a view)."""
    import skimage.data

    base, _, view = name.partition(":")
    data = getattr(skimage.data, base)()
    if view:
        data = data[int(view)]
    return np.asarray(data, dtype=np.float32) / 255.0


def synthetic_scene(seed: int, height: int = 512, width: int = 768) -> np.ndarray:
    """The all-in-focus input of one of the trainer's synthetic scenes (train/synthetic.py):
    photo and generated textures at known depths, the activation ranges a photo exercises."""
    from train.synthetic import make_scene

    return make_scene(seed, height, width)[0]


def embedded_sources() -> list[Source]:
    """scikit-image calibration photos, then synthetic scenes, always in this order."""
    photos = [Source(f"skimage:{n}", partial(skimage_photo, n)) for n in CALIBRATION_PHOTOS]
    scenes = [Source(f"synthetic:{i}", partial(synthetic_scene, i))
              for i in range(SYNTHETIC_SCENES)]
    return photos + scenes


def folder_sources(folder, limit: int) -> list[Source]:
    """Up to ``limit`` readable photos spread evenly over the folder's sorted file list.

    Unreadable files are skipped; a folder with none readable is an error naming the folder.
    """
    files = list_images(folder)
    step = max(1, len(files) // max(1, limit))
    order = files[::step] + [f for i, f in enumerate(files) if i % step]
    sources, problems = [], []
    for path in order:
        if len(sources) == limit:
            break
        try:
            load_rgb(path)  # readable now, so the export fails before its long stages if not
            sources.append(Source(path.name, partial(load_rgb, path)))
        except UserError as exc:
            problems.append(str(exc))
    if not sources:
        raise UserError(f"{folder}: none of its {len(files)} image files is a readable RGB "
                        f"photo (first problem: {problems[0]})")
    return sources


def _view(image: np.ndarray, height: int, width: int, k: int, rng: np.random.Generator
          ) -> np.ndarray:
    """View ``k`` of a source: 0 is the whole photo fitted to size (what inference sees); later
    views are seeded crops of 50-90% of the covering size, every second one mirrored."""
    if k == 0:
        return fit_to_size(image, height, width)[0]
    h, w = image.shape[:2]
    cover = min(h / height, w / width)
    scale = rng.uniform(0.5, 0.9)
    ch, cw = max(1, round(height * cover * scale)), max(1, round(width * cover * scale))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[top : top + ch, left : left + cw]
    pil = Image.fromarray(np.clip(crop * 255.0 + 0.5, 0, 255).astype(np.uint8))
    out = np.asarray(pil.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    return out[:, ::-1] if k % 2 else out


def _sources(calib_dir, num_samples: int) -> list[Source]:
    if num_samples < 1:
        raise UserError(f"calibration needs at least one sample, not {num_samples}")
    return folder_sources(calib_dir, num_samples) if calib_dir else embedded_sources()


def iter_samples(sources: list[Source], height: int, width: int, num_samples: int,
                 seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Labelled ``[1, H, W, 3]`` float32 inputs in [0, 1], made one at a time, same every run."""
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        source, k = sources[i % len(sources)], i // len(sources)
        image = _view(source.load(), height, width, k, rng)
        yield f"{source.label}#{k}", np.ascontiguousarray(image[None], np.float32)


def calibration_samples(height: int, width: int, num_samples: int = DEFAULT_SAMPLES,
                        calib_dir=None, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """All ``num_samples`` labelled inputs at once (tests, inspection)."""
    return list(iter_samples(_sources(calib_dir, num_samples), height, width, num_samples,
                             seed))


def representative_dataset(height: int, width: int, num_samples: int = DEFAULT_SAMPLES,
                           calib_dir=None, seed: int = 0) -> Callable[[], Iterator[list]]:
    """What the TFLite converter calls: a fresh generator of ``[photo]`` lists each time."""
    return calibration_set(height, width, num_samples, calib_dir, seed).dataset


def held_out_images(height: int, width: int) -> list[tuple[str, np.ndarray]]:
    """The accuracy table's photos, fitted to size; disjoint from every calibration source."""
    return [(f"skimage:{n}", fit_to_size(skimage_photo(n), height, width)[0][None].copy())
            for n in HELD_OUT_PHOTOS]


@dataclass
class CalibrationSet:
    """The converter's representative dataset and the manifest's record of where it came from."""

    dataset: Callable[[], Iterator[list]]
    first_sample: np.ndarray
    record: dict


def calibration_set(height: int, width: int, num_samples: int = DEFAULT_SAMPLES,
                    calib_dir=None, seed: int = 0) -> CalibrationSet:
    """Check the sources now (a bad folder fails here, before any conversion); the samples
    are made again, identically, each time the converter asks."""
    sources = _sources(calib_dir, num_samples)

    def generate() -> Iterator[list[np.ndarray]]:
        for _, x in iter_samples(sources, height, width, num_samples, seed):
            yield [x]

    source = (str(calib_dir) if calib_dir else
              f"embedded: scikit-image {', '.join(CALIBRATION_PHOTOS)} + "
              f"{SYNTHETIC_SCENES} synthetic scenes")
    used = sources[:num_samples]
    record = {"source": source, "samples": num_samples, "seed": seed,
              "sources": sorted(s.label for s in used), "held_out": list(HELD_OUT_PHOTOS)}
    first = next(iter_samples(sources, height, width, 1, seed))[1]
    return CalibrationSet(generate, first, record)
