"""The PyTorch reference of an export, rebuilt from its manifest.

A manifest names the model kind, the NAFNet weights (a checkpoint, or the random seed) and, for
the fused model, the depth net's record: enough to rebuild the exact PyTorch model an exported
file must match. Parity, benchmarks, renders and reports all start from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from models.nafnet import load_nafnet, random_nafnet
from models.pipeline import BokehPipeline


def control_arrays(controls: dict[str, float]) -> dict[str, np.ndarray]:
    """Control values as the model's ``[1,1,1,1]`` float32 inputs."""
    return {k: np.full((1, 1, 1, 1), v, np.float32) for k, v in controls.items()}


def reference_model(manifest: dict, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """The PyTorch NAFNet the export came from: --checkpoint, else the manifest's weights."""
    weights = manifest.get("weights", {})
    path = checkpoint or weights.get("checkpoint")
    if path:
        return load_nafnet(path, manifest.get("nafnet_config"))
    return random_nafnet(manifest["nafnet_config"], weights.get("random_seed") or 0)


def reference_pipeline(manifest: dict, checkpoint: str | Path | None = None) -> BokehPipeline:
    """The PyTorch reference of a fused export: the depth net its manifest names (an old
    export's ``dpt`` record too), its NAFNet, the depth net's input size and normalisation."""
    from models.depth import depth_record_of, model_from_record

    depth = depth_record_of(manifest)
    return BokehPipeline(model_from_record(depth), reference_model(manifest, checkpoint),
                         tuple(depth["input_size"]), tuple(depth["mean"]),
                         tuple(depth["std"])).eval()


def reference_key(manifest: dict, checkpoint: str | Path | None = None) -> str:
    """What decides the PyTorch reference of a manifest: files with the same key share one."""
    import json

    return json.dumps([manifest["model"], str(checkpoint or ""), manifest.get("weights"),
                       manifest.get("nafnet_config"), manifest.get("depth") or
                       manifest.get("dpt")], sort_keys=True, default=str)


class Reference:
    """PyTorch outputs, NHWC, for both roles a stage can play: NAFNet alone or the fused model."""

    def __init__(self, manifest: dict, checkpoint: str | Path | None = None):
        self.kind = manifest["model"]
        self._mask: tuple[np.ndarray, torch.Tensor] | None = None  # last photo and its mask
        if self.kind == "nafnet":
            self.nafnet = reference_model(manifest, checkpoint)
        elif self.kind == "bokeh":
            self.pipeline = reference_pipeline(manifest, checkpoint)
            self.nafnet = self.pipeline.nafnet
        else:
            raise UserError(f"no PyTorch reference for model kind {self.kind!r}")

    @torch.no_grad()
    def run(self, x: np.ndarray,
            controls: dict[str, float] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Per role, the stage input and the expected named outputs for one parity input;
        with ``controls`` (focus, strength) the fused model's input is a dict of named arrays
        and NAFNet's input carries the focus-remapped mask."""
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        if self.kind == "nafnet":
            return {"nafnet": {"input": x, "output": nhwc(self.nafnet(t))}}
        if self._mask is None or self._mask[0] is not x:  # one depth pass per photo
            self._mask = (x, self.pipeline.depth_mask(t))
        mask = self._mask[1]
        controls = controls or {}
        nafnet_in = self.pipeline.nafnet_input(t, mask, controls.get("focus"))
        nafnet_out = self.nafnet(nafnet_in)
        bokeh = self.pipeline.finish(t, nafnet_out, controls.get("strength"))
        return {
            "nafnet": {"input": nhwc(nafnet_in), "output": nhwc(nafnet_out)},
            "bokeh": {"input": {"photo": x, **control_arrays(controls)} if controls else x,
                      "bokeh": nhwc(bokeh), "mask": nhwc(mask)},
        }


class BokehOutput(torch.nn.Module):
    """The reference pipeline with one output, so the timer treats it like any engine."""

    def __init__(self, pipeline: torch.nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, photo: torch.Tensor) -> torch.Tensor:
        return self.pipeline(photo)[0]


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A PyTorch NCHW tensor as the NHWC array the TFLite files take and give."""
    return np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))
