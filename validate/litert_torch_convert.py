"""Convert a pickled PyTorch module to TFLite with litert-torch (Google's PyTorch -> LiteRT).

This file runs inside ``.venv-litert-torch`` (made by ``make litert-torch-env``), never in the
project's environment: litert-torch brings its own converter stack, which cannot share a venv with
onnx-tf's TensorFlow 2.15. It imports only the standard library, torch and litert_torch; the
module's own classes (``models.nafnet``, ``models.pipeline``, ``models.dpt``: torch only) come in
through unpickling, with the repository root on ``sys.path``.

``validate/peers.py`` pickles the exact PyTorch module it uses as the reference (same weights,
same config) and runs this script as a subprocess:

    .venv-litert-torch/bin/python validate/litert_torch_convert.py MODEL.pt OUT.tflite \\
        --input-shape 1,H,W,C --outputs 1

The module takes one NCHW tensor; ``litert_torch.to_channel_last_io`` wraps it so the TFLite
input ``[1,H,W,C]`` and the first ``--outputs`` outputs are NHWC, as our own export's are.
Beside OUT.tflite it writes OUT.json: conversion seconds, peak memory, versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="torch.save()d nn.Module (NCHW in)")
    p.add_argument("out", help="the .tflite to write")
    p.add_argument("--input-shape", required=True, help="NHWC input shape, e.g. 1,64,96,4")
    p.add_argument("--outputs", type=int, default=1, help="outputs to make channels-last")
    args = p.parse_args(argv)
    # Run as a file, Python puts validate/ first on sys.path, where profile.py would shadow the
    # standard library's (torch imports cProfile); the repository root goes there instead.
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(ROOT)] + [e for e in sys.path if Path(e or ".").resolve() != here]

    import torch

    shape = tuple(int(d) for d in args.input_shape.split(","))
    module = torch.load(args.model, weights_only=False)
    if not isinstance(module, torch.nn.Module):
        print(f"error: {args.model} holds a {type(module).__name__}, not a torch.nn.Module",
              file=sys.stderr)
        return 2
    module.eval()
    import litert_torch  # after the checks: importing it takes seconds

    wrapped = litert_torch.to_channel_last_io(module, args=[0],
                                              outputs=list(range(args.outputs))).eval()
    sample = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    edge_model = litert_torch.convert(wrapped, (sample,))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    edge_model.export(str(out))
    meta = {"seconds": round(seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "litert_torch": version("litert-torch"), "torch": torch.__version__,
            "input_shape": list(shape), "outputs": args.outputs}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
