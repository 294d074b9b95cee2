"""Benchmark documents: the machine line, marked sections of docs/benchmarks.md, and the five
real photos the benchmark tables are measured on. One home for what every table writer needs."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from common.files import write_bytes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def update_section(doc: Path, key: str, body: str) -> None:
    """Replace (or append) the section between <!-- bench:key --> markers."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    write_bytes(doc, text.encode())


def publish_section(doc: str | Path, key: str, body: str) -> None:
    """Print a benchmark section and write it into its marked place in ``doc``."""
    print(body)
    update_section(Path(doc), key, body)
    print(f"Updated {doc} (section {key})")


def write_photos(folder: Path) -> Path:
    """The five scikit-image photos the fused parity goal names, as PNG files."""
    import imageio.v3 as iio
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea",
                                                               "rocket")}
    photos["motorcycle_left"] = skimage.data.stereo_motorcycle()[0]  # the left view
    for name, image in photos.items():
        iio.imwrite(folder / f"{name}.png", image)
    return folder
