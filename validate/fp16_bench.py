"""The fp16 arithmetic table of `make bench` (issue 19): what a phone GPU computing in fp16 does to
every phone model, measured op by op here (export/arith.py).

Per depth net of depth_bench.NETS and per weights (random; stress: models/stress.py, trained-like
magnitudes), one fused export (fp32 and fp16 files; the NAFNet conversion is shared by the nets
of one weights kind), then each file under the ``fp16`` and ``fp16-acc16`` policies against the
fp32 run of the same file, on every bench photo: the worst bokeh and mask PSNR and the non-finite
values, with the first op that made one. NAFNet alone is measured the same way (its input: the
photo and the fp32 mask of the fused model). The magnitudes the weights reach are measured too
(``stress.residual_peaks`` on the first photo).

    python -m validate.fp16_bench --height 1024 --width 1536 --doc docs/benchmarks.md

A part of the table (some nets, weights, files or policies) goes to its own section of the
document (``--section``), so a partial run never replaces the whole table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cli import name_list, positive_int, run_command
from common.files import read_json, write_json

POLICIES = ("fp16", "fp16-acc16")
WEIGHTS = ("random", "stress")
FILES = ("fp32", "fp16")


@dataclass(frozen=True)
class Plan:
    """What to measure: the table's rows (nets x weights x files) and columns (policies)."""

    nets: tuple[str, ...]
    weights: tuple[str, ...] = WEIGHTS
    files: tuple[str, ...] = FILES
    policies: tuple[str, ...] = POLICIES
    short_side: int | None = None  # the depth nets' input short side (None: each net's own)
    photos: int | None = None  # the first N bench photos (None: all five)


def stress_checkpoints(folder: Path, nets: tuple[str, ...], seed: int = 0) -> dict[str, Path]:
    """State dicts of the stress NAFNet (``"nafnet"``) and of each net, written once."""
    from models import stress
    from models.depth import load_depth_model
    from models.nafnet import PAPER_CONFIG, random_nafnet

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("nafnet", *nets):
        path = folder / f"{name}_stress.pt"
        if not path.is_file():
            model = (stress.stress_nafnet(random_nafnet(PAPER_CONFIG, seed)) if name == "nafnet"
                     else stress.stress_depth(load_depth_model(name, seed=seed)))
            torch.save(model.state_dict(), path)
        files[name] = path
    return files


def ensure_exports(root: Path, height: int, width: int, plan: Plan,
                   echo: Callable[[str], None] = print) -> dict[tuple[str, str], Path]:
    """``root/WEIGHTS/NET``: a fused fp32 + fp16 export of each net with each kind of weights
    the plan names, exported when missing or of another size."""
    from export.pipeline import NAFNET_ARTIFACTS, ExportOptions, export
    from models.depth import depth_net

    nets, short_side = plan.nets, plan.short_side

    checkpoints = stress_checkpoints(root / "weights", nets)
    folders = {}
    for weights in plan.weights:
        source = None
        for net in nets:
            out = root / weights / net
            manifest = out / "bokeh_fp32.manifest.json"
            done = manifest.is_file() and (out / "bokeh_fp16.tflite").is_file() and (
                read_json(manifest)["height"], read_json(manifest)["width"]) == (height, width)
            side = None if short_side is None else max(1, round(
                short_side / depth_net(net).multiple)) * depth_net(net).multiple
            if not done:
                echo(f"{weights}/{net}: exporting at {height}x{width} to {out}")
                stressed = weights == "stress"
                export(ExportOptions(
                    out, height, width, checkpoint=checkpoints["nafnet"] if stressed else None,
                    depth=net, depth_weights=checkpoints[net] if stressed else None,
                    depth_short_side=side, variants=("fp32", "fp16"), overwrite=True,
                    gpu_check=False, reuse_nafnet=source), echo=lambda s: None)
            folders[weights, net] = out
            if source is None and all((out / a).exists() for a in NAFNET_ARTIFACTS):
                source = out
    return folders


def read_photos(folder: Path, height: int, width: int, limit: int | None = None
                ) -> dict[str, np.ndarray]:
    """The bench photos as ``[1, H, W, 3]`` float32 in [0, 1], fitted to the model size."""
    from common.images import fit_to_size, load_rgb

    paths = sorted(folder.glob("*.png"))[:limit]
    return {p.stem: fit_to_size(load_rgb(p), height, width)[0][None].astype(np.float32)
            for p in paths}


def _input_name(path: Path) -> str:
    from export.runner import make_interpreter

    return make_interpreter(path).get_input_details()[0]["name"]


def worst_reports(path: Path, inputs: list[np.ndarray], policies: tuple[str, ...]
                  ) -> dict[str, dict]:
    """Per policy: the worst PSNR per output and the total non-finite values over ``inputs``
    (the policies share one fp32 run per input)."""
    from export.arith import arithmetic_reports

    name = _input_name(path)
    worst: dict[str, dict] = {p: {"outputs": {}, "first_nonfinite": None} for p in policies}
    for x in inputs:
        for policy, report in arithmetic_reports(path, {name: x}, policies).items():
            into = worst[policy]
            into["first_nonfinite"] = into["first_nonfinite"] or report["first_nonfinite"]
            for out, r in report["outputs"].items():
                w = into["outputs"].setdefault(out, {"psnr_db": float("inf"), "nonfinite": 0})
                w["nonfinite"] += r["nonfinite"]
                w["psnr_db"] = min(w["psnr_db"], -1.0 if r["psnr_db"] is None else r["psnr_db"])
    return worst


def measure(root: Path, height: int, width: int, photos: Path, plan: Plan,
            echo: Callable[[str], None] = print) -> dict:
    """Every row of the table the plan names (see the module docstring)."""
    from export.pipeline import load_generator
    from export.runner import run_tflite
    from models import stress
    from models.depth import depth_record_of, model_from_record

    folders = ensure_exports(root, height, width, plan, echo)
    checkpoints = stress_checkpoints(root / "weights", plan.nets)
    images = read_photos(photos, height, width, plan.photos)
    rows, peaks = [], {}
    for (weights, net), folder in folders.items():
        record = depth_record_of(read_json(folder / "bokeh_fp32.manifest.json"))
        first = next(iter(images.values()))
        small = torch.nn.functional.interpolate(torch.from_numpy(first).permute(0, 3, 1, 2),
                                                size=tuple(record["input_size"]), mode="bilinear")
        mean, std = (torch.tensor(record[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        depth = model_from_record(record)
        peaks[f"{weights}/{net}"] = stress.residual_peaks(depth, (small - mean) / std)
        nafnet_inputs = []
        for x in images.values():
            mask = run_tflite(folder / "bokeh_fp32.tflite", x)["mask"]
            nafnet_inputs.append(np.concatenate([x, mask], axis=-1))
        if (weights, "nafnet") not in {(r["weights"], r["model"]) for r in rows}:
            nafnet, _ = load_generator(checkpoints["nafnet"] if weights == "stress" else None)
            peaks[f"{weights}/nafnet"] = stress.residual_peaks(
                nafnet, torch.from_numpy(nafnet_inputs[0]).permute(0, 3, 1, 2))
            targets = [("nafnet", "nafnet", nafnet_inputs)]
        else:
            targets = []
        targets.append((net, "bokeh", list(images.values())))
        for model, prefix, inputs in targets:
            for variant in plan.files:
                start = time.monotonic()
                results = worst_reports(folder / f"{prefix}_{variant}.tflite", inputs,
                                        plan.policies)
                for policy, result in results.items():
                    rows.append({"model": model, "weights": weights, "file": variant,
                                 "policy": policy, **result,
                                 "seconds": round(time.monotonic() - start, 1)})
                    echo(f"{weights}/{model} {variant} file, {policy}: " + ", ".join(
                        f"{k} {v['psnr_db']:.1f} dB, {v['nonfinite']} non-finite"
                        for k, v in result["outputs"].items()))
    return {"height": height, "width": width, "short_side": plan.short_side,
            "policies": list(plan.policies), "photos": list(images), "rows": rows,
            "peaks": peaks}


def markdown(result: dict, command: str) -> str:
    """The table for docs/benchmarks.md."""
    lines = [
        f"{result['height']}x{result['width']}, worst of {len(result['photos'])} photo(s) "
        f"({', '.join(result['photos'])}); depth-net input short side: "
        f"{result['short_side'] or 'each net’s own'}. PSNR (dB, peak 1) of each output under "
        "the policy against the fp32 run of the same file (export/arith.py); targets: bokeh "
        ">= 40, mask >= 35, NAFNet >= 40, no non-finite value.", "",
        f"Command: `{command}`", "",
        "| model | weights | file | " + " | ".join(
            f"{p}: bokeh / mask | {p} non-finite" for p in result["policies"]) + " |",
        "|---|---|---|" + "---|---|" * len(result["policies"])]
    keyed = {(r["model"], r["weights"], r["file"], r["policy"]): r for r in result["rows"]}
    for model, weights, variant in dict.fromkeys(
            (r["model"], r["weights"], r["file"]) for r in result["rows"]):
        cells = []
        for policy in result["policies"]:
            outs = keyed[model, weights, variant, policy]["outputs"]
            cells.append(" / ".join(f"{o['psnr_db']:.1f}" for o in outs.values()))
            cells.append(str(sum(o["nonfinite"] for o in outs.values())))
        lines.append(f"| {model} | {weights} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Largest |value| reached on the first photo (residual stream; GroupNorm "
              "inputs), PyTorch:", ""]
    lines += [f"- {key}: " + ", ".join(f"{k} {v:.0f}" for k, v in p.items())
              for key, p in result["peaks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m validate.fp16_bench") -> int:
    from validate.depth_bench import NETS

    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=positive_int, default=1024)
    p.add_argument("--width", type=positive_int, default=1536)
    p.add_argument("--nets", default=",".join(NETS), help="depth nets (%(default)s)")
    p.add_argument("--depth-short-side", type=positive_int,
                   help="depth-net input short side, rounded to each net's multiple (default: "
                        "each net's own)")
    p.add_argument("--weights", default=",".join(WEIGHTS),
                   help="comma-separated weights kinds (default: %(default)s)")
    p.add_argument("--files", default=",".join(FILES),
                   help="comma-separated files of each export (default: %(default)s)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated arithmetic policies (default: %(default)s)")
    p.add_argument("--photos", type=positive_int, help="use only the first N bench photos")
    p.add_argument("--dir", default="build/bench-fp16", help="exports (%(default)s)")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update")
    p.add_argument("--section", default="fp16",
                   help="the marked section of --doc to write (default: %(default)s; give a "
                        "partial run its own)")
    args = p.parse_args(argv)
    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])

    def body() -> int:
        from models.depth import DEPTH_NETS
        from validate.doc import publish_section, write_photos

        plan = Plan(name_list(args.nets, "nets", tuple(DEPTH_NETS)),
                    name_list(args.weights, "weights", WEIGHTS),
                    name_list(args.files, "files", FILES),
                    name_list(args.policies, "policies", POLICIES), args.depth_short_side,
                    args.photos)
        root = Path(args.dir)
        photos = write_photos(root / "photos")
        result = measure(root, args.height, args.width, photos, plan)
        write_json(root / f"{args.section}_table.json", result)
        publish_section(args.doc, args.section, markdown(result, command))
        return 0

    return run_command(prog, body)


if __name__ == "__main__":
    sys.exit(main())
