"""ONNX export for serving: normalised images -> sigmoid scores, any batch size.

The graph takes ``images``, float32 ``(B, 3, S, S)`` already resized to the model's square
size and normalised with its mean / std, and returns ``scores``, float32 ``(B, C)`` in
[0, 1]. ``B`` is dynamic. The preprocessing and the class names travel in the file's
metadata (``lcm.classes``, ``lcm.image_size``, ``lcm.mean``, ``lcm.std``, ``lcm.weights``,
``lcm.model_sha256``), so a server needs nothing but the ``.onnx`` file.

:func:`export_onnx` checks the exported graph with onnxruntime against PyTorch on random
images (batches of 1 and 3 by default) and refuses to leave a file behind whose scores differ
by more than ``tolerance``. onnx, onnxscript and onnxruntime come with the ``onnx`` extra.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lcm.checkpoint import load_for_inference
from lcm.errors import ConfigError, LcmError
from lcm.io import atomic_path

log = logging.getLogger(__name__)

OPSET = 18


class ExportError(LcmError):
    """The exported graph is missing, unloadable or disagrees with PyTorch."""


class _Scores(nn.Module):
    """The model as images -> sigmoid scores (the logits' other outputs dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.model(images).logits)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    classes: int
    image_size: int
    max_abs_diff: dict[int, float]  # batch size -> max |onnxruntime - PyTorch|


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'lcm[onnx]'"
        ) from None


def export_onnx(
    model_dir: Path,
    out: Path,
    weights: str = "raw",
    check_batches: Sequence[int] = (1, 3),
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export ``model_dir``'s ``weights`` to ``out`` and check it against PyTorch."""
    _require_onnx()
    import onnx

    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights must be raw or ema, got {weights!r}")
    loaded = load_for_inference(Path(model_dir), weights, torch.device("cpu"), thresholds=False)
    meta = loaded.meta
    net = _Scores(loaded.model).eval()
    size = meta.image_size
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        try:
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["scores"],
                dynamic_shapes={"images": {0: batch}},
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; name the model and stop
            raise ExportError(f"{model_dir}: torch.onnx.export failed ({e})") from e
        proto = program.model_proto
        extra = {
            "lcm.classes": json.dumps(list(meta.classes)),
            "lcm.image_size": str(size),
            "lcm.mean": json.dumps(list(meta.mean)),
            "lcm.std": json.dumps(list(meta.std)),
            "lcm.weights": weights,
            "lcm.model_sha256": loaded.digest,
        }
        for key, value in extra.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(tmp))
        diffs = check_onnx(tmp, net, size, check_batches)
        worst = max(diffs.values())
        if not worst < tolerance:
            raise ExportError(
                f"{out}: onnxruntime and PyTorch disagree by {worst:.2e} (> {tolerance:.0e}); "
                "nothing written"
            )
    log.info("exported %s (%s weights) -> %s", model_dir, weights, out)
    return ExportResult(out, len(meta.classes), size, diffs)


def check_onnx(path: Path, net: nn.Module, size: int, batches: Sequence[int]) -> dict[int, float]:
    """Max |onnxruntime - PyTorch| of the scores on random images, per batch size."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot load the exported graph ({e})") from e
    gen = torch.Generator().manual_seed(0)
    diffs: dict[int, float] = {}
    for b in batches:
        images = torch.randn(b, 3, size, size, generator=gen)
        with torch.no_grad():
            expected = net(images).numpy()
        (got,) = session.run(["scores"], {"images": images.numpy()})
        if got.shape != expected.shape:
            raise ExportError(
                f"{path}: batch {b} gave shape {got.shape}, expected {expected.shape}"
            )
        diffs[b] = float(np.abs(got - expected).max())
    return diffs
