"""Model directories: weights for inference, and the state to resume training exactly.

A model directory holds
- ``model.json``: architecture, classes, image size, normalisation, the resolved params;
- ``model.safetensors`` (raw weights) and ``ema.safetensors`` (EMA weights; a placeholder
  without tensors when ``train.ema_decay`` is null): safe to load from strangers;
- ``state.pt``: the state to resume training exactly (:mod:`lcm.resume` writes and reads it);
- ``thresholds.json``: per-class thresholds calibrated by ``lcm evaluate`` (optional).

For inference, :func:`load_for_inference` loads all of it at once (weights, meta, thresholds)
and :func:`model_digest` names exactly which weights produced a set of scores.

Every file is written to a temporary name and renamed, so a run killed while saving leaves the
previous checkpoint intact.

Writers and readers of the model directory stay together (a module longer than most) so the
format is defined in one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from lcm.config import FIRST_RECONSTRUCTION, ModelConfig, build_section
from lcm.errors import CheckpointError
from lcm.io import atomic_path, atomic_write_json, read_json
from lcm.runtime import unwrap

MODEL_JSON = "model.json"
RAW_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
NO_EMA = "lcm.no_ema"  # metadata key of the placeholder EMA file of a run without an EMA
THRESHOLDS_FILE = "thresholds.json"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMeta:
    """What inference needs besides the weights (the contents of model.json)."""

    model: ModelConfig
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        from lcm.config import to_dict

        return {
            "format": FORMAT_VERSION,
            "model": to_dict(self.model),
            "classes": list(self.classes),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.extra,
        }


def _atomic(path: Path, write: Any) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s weights, as safetensors stores them (contiguous, unshared;
    the DDP / torch.compile wrapper taken off)."""
    inner = unwrap(module)
    return {k: v.detach().cpu().contiguous().clone() for k, v in inner.state_dict().items()}


def save_model(
    out_dir: Path, model: torch.nn.Module, meta: ModelMeta, ema: torch.nn.Module | None
) -> None:
    save_weights(out_dir, plain_state(model), meta, plain_state(ema) if ema else None)


def save_weights(
    out_dir: Path,
    raw: dict[str, torch.Tensor],
    meta: ModelMeta,
    ema: dict[str, torch.Tensor] | None,
) -> None:
    """Write the raw (and EMA) weights of :func:`plain_state` and model.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / RAW_WEIGHTS, lambda p: save_file(raw, str(p)))
    # Without an EMA the file still exists (a pipeline declares it as an output), holding no
    # tensors and a note that loading it refuses with; it also replaces a stale EMA file.
    ema_meta = None if ema is not None else {NO_EMA: "train.ema_decay was null"}
    _atomic(out_dir / EMA_WEIGHTS, lambda p: save_file(ema or {}, str(p), metadata=ema_meta))
    atomic_write_json(out_dir / MODEL_JSON, meta.to_json())


def load_meta(model_dir: Path) -> ModelMeta:
    path = Path(model_dir) / MODEL_JSON
    missing = f"not found; is {model_dir} a model directory from `lcm train`?"
    raw = read_json(path, missing, CheckpointError)
    try:
        model = build_section(
            ModelConfig, {**FIRST_RECONSTRUCTION, **raw["model"]}, f"{path}:model"
        )
        return ModelMeta(
            model=model,
            classes=tuple(raw["classes"]),
            image_size=int(raw["image_size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            extra={k: v for k, v in raw.items() if k not in _META_KEYS},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed model description ({e!r})") from e


_META_KEYS = {"format", "model", "classes", "image_size", "mean", "std"}


def weights_path(model_dir: Path, which: str) -> Path:
    name = {"raw": RAW_WEIGHTS, "ema": EMA_WEIGHTS}.get(which)
    if name is None:
        raise CheckpointError(f"unknown weights {which!r}; expected 'raw' or 'ema'")
    return Path(model_dir) / name


def load_weights(model: torch.nn.Module, model_dir: Path, which: str = "raw") -> bytes:
    """Load raw or EMA weights into ``model`` (strict: every tensor must match). Returns the
    file's bytes, read once, so a caller can name exactly what it loaded."""
    path = weights_path(model_dir, which)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (this run saved no {which} weights)")
    data = _read(path)
    try:
        state = load(data)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not state and NO_EMA in _safetensors_metadata(data):
        raise CheckpointError(
            f"{path}: this model was trained without an EMA (train.ema_decay: null); "
            "use the raw weights"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        first = str(e).split("size mismatch for ", 1)[-1].splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the architecture in {MODEL_JSON} ({first})"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the architecture in {MODEL_JSON} "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return data


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    try:
        size = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
    except (ValueError, AttributeError):
        return {}


# ------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score images: eval mode, on its device, with what it needs besides."""

    model: torch.nn.Module
    meta: ModelMeta
    weights: str  # raw | ema
    thresholds: np.ndarray  # (C,) float64
    threshold_source: str  # the thresholds file, or "default 0.5" when there is none
    digest: str  # model_digest() of the directory and weights


def load_for_inference(
    model_dir: Path,
    weights: str,
    device: torch.device,
    thresholds: bool = True,
    meta: ModelMeta | None = None,
) -> LoadedModel:
    """Load ``model.json`` (unless its ``meta`` is given, already read), the raw or EMA
    weights and the thresholds of a model directory (``thresholds=False``: 0.5 everywhere,
    for the evaluation that calibrates new ones)."""
    from lcm.models import build_model  # models import torchvision: only when a model is built

    meta = meta if meta is not None else load_meta(model_dir)
    model = build_model(meta.model, len(meta.classes), branch=False)
    data = load_weights(model, model_dir, weights)  # the digest covers these very bytes
    if thresholds:
        values, source = thresholds_or_default(model_dir, meta.classes)
    else:
        values, source = np.full(len(meta.classes), 0.5), DEFAULT_THRESHOLD_SOURCE
    return LoadedModel(
        model=model.to(device).eval(),
        meta=meta,
        weights=weights,
        thresholds=values,
        threshold_source=source,
        digest=_digest(model_dir, weights, data),
    )


def model_digest(model_dir: Path, weights: str) -> str:
    """``sha256:<hex>`` over model.json and the chosen weights file: equal digests mean equal
    scores for equal images (thresholds are recorded separately, per run)."""
    return _digest(model_dir, weights, _read(weights_path(model_dir, weights)))


def _digest(model_dir: Path, weights: str, data: bytes) -> str:
    h = hashlib.sha256()
    meta_path, weights_file = Path(model_dir) / MODEL_JSON, weights_path(model_dir, weights)
    for name, content in ((meta_path.name, _read(meta_path)), (weights_file.name, data)):
        h.update(name.encode() + b"\0")
        h.update(content)
    return "sha256:" + h.hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e


DEFAULT_THRESHOLD_SOURCE = "default 0.5"


def thresholds_or_default(model_dir: Path, classes: Sequence[str]) -> tuple[np.ndarray, str]:
    """The thresholds ``lcm evaluate`` calibrated beside the model (checked against its
    classes), else 0.5 for every class; and where they came from."""
    path = Path(model_dir) / THRESHOLDS_FILE
    if path.is_file():
        return load_thresholds(path, classes), str(path)
    return np.full(len(classes), 0.5), DEFAULT_THRESHOLD_SOURCE


def threshold_sources(model_dir: Path, classes: Sequence[str]) -> list[str]:
    """Per class, where its threshold came from and why: ``<file> (F1-optimal)``,
    ``<file> (no skill ...: default 0.5)``, or ``default 0.5`` without a file."""
    path = Path(model_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return [DEFAULT_THRESHOLD_SOURCE] * len(classes)
    data = read_json(path, "thresholds file not found", CheckpointError)
    reasons = data.get("sources", {}) if isinstance(data, dict) and "format" in data else {}
    return [f"{path} ({reasons[c]})" if c in reasons else str(path) for c in classes]


def save_thresholds(
    path: Path,
    classes: Sequence[str],
    thresholds: np.ndarray,
    sources: Sequence[str] | None = None,
) -> None:
    """Write the per-class thresholds: ``{class name: threshold}``, or with ``sources`` (why
    each was chosen) ``{"format": 2, "thresholds": {...}, "sources": {...}}``."""
    th = np.asarray(thresholds, dtype=np.float64)
    if th.shape != (len(classes),):
        raise ValueError(f"{th.shape} thresholds for {len(classes)} classes")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique to key the thresholds")
    if not np.isfinite(th).all():
        raise ValueError("thresholds must be finite")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {str(c): float(v) for c, v in zip(classes, th, strict=True)}
    if sources is None:
        atomic_write_json(path, values)
        return
    if len(sources) != len(classes):
        raise ValueError(f"{len(sources)} threshold sources for {len(classes)} classes")
    why = dict(zip(map(str, classes), sources, strict=True))
    atomic_write_json(path, {"format": 2, "thresholds": values, "sources": why})


def load_thresholds(path: Path, classes: Sequence[str]) -> np.ndarray:
    """Read thresholds saved by :func:`save_thresholds`, ordered as ``classes``, ``(C,)``.

    Raises CheckpointError naming the file when it is missing, malformed, or keyed by a
    different set of classes than the model's.
    """
    path = Path(path)
    data = read_json(path, "thresholds file not found", CheckpointError)
    if isinstance(data, dict) and data.get("format") == 2:
        data = data.get("thresholds")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object mapping class name to threshold")
    missing = [c for c in classes if c not in data]
    known = set(classes)
    unexpected = [k for k in data if k not in known]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_preview(missing)}")
        if unexpected:
            parts.append(f"unknown {_preview(unexpected)}")
        raise CheckpointError(
            f"{path}: thresholds do not match the model's classes ({'; '.join(parts)})"
        )
    values = []
    for c in classes:
        v = data[c]
        # bool is an int subclass in Python, but true/false is never a threshold.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{path}: threshold for {c!r} is not a finite number: {v!r}")
        values.append(float(v))
    return np.array(values, dtype=np.float64)


def _preview(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_compatible(model_dir: Path, model: ModelConfig, classes: tuple[str, ...]) -> None:
    """Refuse to resume from a checkpoint of another architecture or class list."""
    meta = load_meta(model_dir)
    if meta.model != model:
        diff = {
            k: (getattr(meta.model, k), getattr(model, k))
            for k in model.__dataclass_fields__
            if getattr(meta.model, k) != getattr(model, k)
        }
        raise CheckpointError(
            f"{model_dir}: cannot resume, the checkpoint has another architecture "
            f"(checkpoint vs params: {diff})"
        )
    if meta.classes != classes:
        raise CheckpointError(
            f"{model_dir}: cannot resume, the checkpoint was trained on other classes "
            f"({len(meta.classes)} classes, first {list(meta.classes[:3])}; "
            f"the shards have {len(classes)}, first {list(classes[:3])})"
        )


class CheckpointWriter:
    """Runs checkpoint writes one after another, in a background thread when ``background``.

    A write waits for the previous one, so files are written in order; a caller that calls
    :meth:`wait` before taking its snapshot holds at most one snapshot besides the live state.
    :meth:`close` waits for the last write and re-raises any error a write met (``quiet``:
    logs it instead, for when another error is already on its way). Every file is still
    written atomically, so a run killed during a background write resumes from the previous
    complete checkpoint.
    """

    def __init__(self, background: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background else None
        self._pending: Future[None] | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            write()
        else:
            self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, quiet: bool = False) -> None:
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
            log.exception("a background checkpoint write failed")
        finally:
            if self._pool is not None:
                self._pool.shutdown()
