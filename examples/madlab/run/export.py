"""``export``: one self-contained safetensors file with the adapters merged into the backbone.

The file holds the whole detector's weights (backbone with ``lora_vit.merge_lora`` applied,
so every adapted layer is a plain ``nn.Linear`` again, and the head) and, in its metadata,
the training config, the backbone's spec and architecture (:mod:`.architecture`), the dev
thresholds and the training summary. ``test`` and ``predict`` load it like a model file; it
needs neither the backbone folder nor ``lora_vit``'s adapter classes, and runs at the base
backbone's speed. Merging happens in float32 and is checked: the merged logits must equal the
unmerged ones on a probe batch (within :data:`MERGE_TOLERANCE`), or nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from lora_vit import merge_lora

from ..io.files import write_atomically
from ..model.architecture import describe_backbone
from ..model.checkpoint import CheckpointError
from .detector import EXPORT_FORMAT, Detector

__all__ = ["MERGE_TOLERANCE", "export_detector"]

MERGE_TOLERANCE = 1e-4  # max |merged - unmerged| logit on the probe batch


def export_detector(detector: Detector, output: str | os.PathLike[str], probe: torch.Tensor | None = None) -> dict:
    """Merge ``detector``'s adapters and write the export file atomically.

    Args:
        detector: Loaded from a model file (not already an export).
        output: The ``.safetensors`` file to write.
        probe: Normalised ``B x 3 x S x S`` images to compare merged and unmerged logits on;
            random ones by default.

    Returns:
        A summary: the output path, its size, the largest logit difference on the probe.

    Raises:
        CheckpointError: If the input is already an export, the output is the input file, or the
            merged logits differ from the unmerged ones by more than :data:`MERGE_TOLERANCE`.
    """
    output = Path(output)
    if detector.exported:
        raise CheckpointError(f"{detector.path} is already an export; export a model file written by train")
    if output.resolve() == detector.path.resolve():
        raise CheckpointError(f"--output {output} is the model file itself; choose another path")
    model = detector.model.float().eval()
    size = detector.image_size
    if probe is None:
        probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    with torch.no_grad():
        before = model(probe).double()
    architecture = describe_backbone(model.backbone, model.spec)
    if detector.config.use_lora:
        merge_lora(model)
    with torch.no_grad():
        gap = float((model(probe).double() - before).abs().max())
    if not gap <= MERGE_TOLERANCE:
        raise CheckpointError(f"merging changed the logits by {gap:.3g} (> {MERGE_TOLERANCE}); nothing written")
    meta = {key: detector.metadata[key] for key in ("config", "strategy", "threshold", "thresholds", "training",
                                                    "shortcut_thresholds", "lora_vit_version", "split")
            if key in detector.metadata}
    meta.update({
        "format": EXPORT_FORMAT,
        "backbone": {**detector.metadata["backbone"], "spec": model.spec.to_dict(), "architecture": architecture},
        "exported_from": str(detector.path),
        "merge_check": {"max_abs_logit_difference": gap, "probe_images": len(probe)},
    })
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomically(output, safetensors_bytes(state, metadata={"madlab": json.dumps(meta)}))
    return {"output": str(output), "bytes": output.stat().st_size, "max_abs_logit_difference": gap,
            "tensors": len(state)}


def summary_line(result: dict[str, Any]) -> str:
    return (f"exported {result['output']} ({result['bytes'] / 2**20:.1f} MiB, {result['tensors']} tensors);"
            f" merged vs unmerged logits differ by at most {result['max_abs_logit_difference']:.2e}")
