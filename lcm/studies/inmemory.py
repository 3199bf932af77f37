"""Train and score one model on a synthetic tier held in memory: the studies' unit of work.

A tier (:func:`build_tier`) is generated once, prepared like any COCO dataset and decoded and
resized into ``tensors.pt`` (uint8 images and targets of both splits). :func:`train_in_memory`
then trains through the library's trainer (:func:`lcm.trainer.build_trainer` /
:func:`~lcm.trainer.train_step`, the same step ``lcm train`` takes) with random horizontal
flips, and scores the final raw weights on the val split after every epoch, which gives the
learning curves. No JPEG is decoded during training, so a run costs its forward and backward
passes and little else: this is what makes a grid of dozens of runs affordable.

Used by ``lcm ablate`` (:mod:`flows.ablate`) and by ``bench/compare_models.py``.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lcm.config import Params
from lcm.errors import ConfigError, DataError
from lcm.io import atomic_path

TENSORS_FILE = "tensors.pt"


def build_tier(cache: Path, tier: str, n_train: int, n_val: int, size: int, seed: int = 0) -> Path:
    """The tier's benchmark at ``size`` px, decoded once: ``<cache>/<tier>-<n_train>-<n_val>-
    <size>px[-seed<seed>]/tensors.pt`` (uint8 images, targets, class names, each class's role
    in the generative story), drawn by the generator with ``seed``. Reused when it exists;
    written atomically."""
    from lcm.data.coco import prepare_coco
    from lcm.data.manifest import read_manifest, resolve_image, targets_from_lists
    from lcm.data.synthetic import generate_synthetic
    from lcm.data.transforms import decode_image, eval_transform

    root = Path(cache) / f"{tier}-{n_train}-{n_val}-{size}px{f'-seed{seed}' if seed else ''}"
    out = root / TENSORS_FILE
    if out.exists():
        return out
    raw = root / "raw"
    if not (raw / "annotations" / "synth_meta.json").exists():
        generate_synthetic(raw, n_train=n_train, n_val=n_val, size=size, seed=seed, tier=tier,
                           workers=min(8, torch.multiprocessing.cpu_count()))  # fmt: skip
    meta = json.loads((raw / "annotations" / "synth_meta.json").read_text())
    doc: dict[str, Any] = {"roles": {c["name"]: c["role"] for c in meta["classes"]}}
    preset = eval_transform(size)
    for split in ("train", "val"):
        images = raw / "images" / split
        prepared = root / "prepared" / split
        prepare_coco(raw / "annotations" / f"instances_{split}.json", images, prepared)
        manifest = read_manifest(prepared)
        t = manifest.table
        doc[f"{split}_x"] = torch.stack([
            preset.pixels(decode_image(resolve_image(images, p).read_bytes()))
            for p in t.column("path").to_pylist()
        ])  # fmt: skip  # (N, 3, S, S) uint8
        doc[f"{split}_y"] = torch.from_numpy(targets_from_lists(
            t.column("labels").to_pylist(), t.column("ignore").to_pylist(), manifest.num_classes
        ))  # fmt: skip
        doc["classes"] = list(manifest.classes)
    with atomic_path(out) as tmp:
        torch.save(doc, tmp)
    return out


@lru_cache(maxsize=2)
def load_tier(path: str, device: str = "cpu") -> dict[str, Any]:
    """``tensors.pt`` on ``device`` (cached per process: a worker loads a tier once)."""
    if not Path(path).exists():
        raise DataError(f"{path}: no such tier file (built by lcm.studies.inmemory.build_tier)")
    doc = torch.load(path, weights_only=True)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in doc.items()}


def hide_targets(targets: Tensor, missing: float, seed: int) -> Tensor:
    """``targets`` with the partial-label protocol applied (SPEC section 4): each known entry
    hidden (-1) with probability ``missing`` from ``seed``. The same draw, in the same order,
    as :func:`lcm.data.masks.make_mask` on the split's manifest, so a study trains on exactly
    the mask ``lcm data mask`` writes."""
    hide = np.random.default_rng(seed).random(tuple(targets.shape)) < missing
    out = targets.clone()
    out[torch.from_numpy(hide).to(out.device) & (out >= 0)] = -1.0
    return out


def train_point_in_process(params: dict[str, Any], data_file: str, threads: int) -> dict[str, Any]:
    """:func:`train_in_memory` of a params dict on ``threads`` intra-op threads: the entry
    point of a study's spawned run, importable without the orchestration above it."""
    from lcm.config import params_from_dict

    torch.set_num_threads(threads)
    return train_in_memory(params_from_dict(params), data_file)


def train_in_memory(
    params: Params,
    data_file: str | Path,
    *,
    mask_seed: int = 0,
    on_epoch: Any = None,
    score_every: int = 1,
) -> dict[str, Any]:
    """Train ``params`` (model, loss, train sections; ``train.missing`` hides that share of
    the training targets with ``mask_seed``) on a tier file; score after every epoch.

    ``score_every`` > 1 scores the val split only every that many epochs and in each of the
    last five (where convergence is judged); scoring runs in eval mode and draws no random
    numbers, so the final weights and every final metric are the same for any value.

    Returns ``mAP`` (final raw weights), ``curve`` (mAP per scored epoch; ``curve_epochs``
    names the epochs, 1-based), the final CP ... OF1 and
    their top-3 forms, ``per_class`` AP, ``lookalike_AP`` (mean AP of the classes whose role
    in the generative story is ``lookalike``), the same final weights scored on the train
    split with its full labels (``train_mAP``, ``train_lookalike_AP``, ``train_per_class``:
    the gap to the val figures measures memorisation), and for LCM the auxiliary head's
    ``aux_mAP``, ``aux_curve``, ``aux_per_class``; ``seconds`` of training and scoring.
    """
    from lcm.data.transforms import normalize
    from lcm.metrics import evaluate_scores
    from lcm.runtime import seed_everything, select_device
    from lcm.trainer import TensorBatch, build_trainer, train_step

    cfg = params.train
    device = select_device(cfg.device)
    d = load_tier(str(data_file), str(device))
    classes = d["classes"]
    x, y = d["train_x"], d["train_y"]
    if cfg.missing:
        y = hide_targets(y, cfg.missing, mask_seed)
    steps = x.shape[0] // cfg.batch_size
    if steps == 0:
        raise DataError(f"{data_file}: {x.shape[0]} train images, fewer than one batch")
    known = (y >= 0).float()
    priors = ((y == 1).float().sum(0) / known.sum(0).clamp(min=1)).tolist()
    seed_everything(cfg.seed)
    state = build_trainer(params.model, params.loss, cfg, len(classes), steps * cfg.epochs,
                          device, priors=priors)  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    targets = d["val_y"].cpu().numpy()
    if score_every < 1:
        raise ConfigError(f"score_every must be at least 1, got {score_every}")
    curve, aux_curve, curve_epochs = [], [], []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        state.model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        flips = torch.rand(x.shape[0], generator=gen) < 0.5
        for b in range(steps):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            px = x[idx.to(x.device)]
            flip = flips[idx].to(x.device)[:, None, None, None]
            px = torch.where(flip, px.flip(-1), px)
            train_step(state, TensorBatch(normalize(px), y[idx.to(y.device)]))
        if (epoch + 1) % score_every and epoch < cfg.epochs - 5:
            continue  # scoring 500 val images costs about half an epoch of training on a CPU
        main, aux = _score(state, d["val_x"])
        res = evaluate_scores(main, targets, classes)
        curve.append(res.mAP)
        curve_epochs.append(epoch + 1)
        if aux is not None:
            aux_res = evaluate_scores(aux, targets, classes)
            aux_curve.append(aux_res.mAP)
        if on_epoch is not None:
            on_epoch(epoch + 1, res.mAP)
    # The final weights on the train split, scored against its full labels (a partial-label
    # run's hidden targets included): what the model fits, beside what it generalises to.
    train_res = evaluate_scores(_score(state, x)[0], d["train_y"].cpu().numpy(), classes)
    roles = d.get("roles", {})
    row: dict[str, Any] = {
        **res.scalars(),  # mAP and CP ... OF1 (also top-3) of the final weights
        "curve": curve,
        "curve_epochs": curve_epochs,
        "per_class": {c.name: c.ap for c in res.per_class},
        "lookalike_AP": lookalike_ap(res.per_class, roles),
        "train_mAP": train_res.mAP,
        "train_lookalike_AP": lookalike_ap(train_res.per_class, roles),
        "train_per_class": {c.name: c.ap for c in train_res.per_class},
    }
    if aux_curve:
        row |= {"aux_mAP": aux_curve[-1], "aux_curve": aux_curve,
                "aux_per_class": {c.name: c.ap for c in aux_res.per_class}}  # fmt: skip
    row["seconds"] = time.perf_counter() - t0
    return row


def lookalike_ap(per_class: Any, roles: dict[str, str]) -> float | None:
    """Mean AP of the look-alike classes (``None`` when the tier has none with positives)."""
    aps = [c.ap for c in per_class if roles.get(c.name) == "lookalike" and c.ap is not None
           and not math.isnan(c.ap)]  # fmt: skip
    return float(np.mean(aps)) if aps else None


def _score(state: Any, images: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    from lcm.data.transforms import normalize
    from lcm.runtime import autocast

    state.model.eval()
    main, aux = [], []
    with torch.no_grad(), autocast(state.device, state.dtype):
        for lo in range(0, images.shape[0], 256):
            out = state.model(normalize(images[lo : lo + 256]))
            main.append(out.logits.float().cpu())
            if out.aux_logits is not None:
                aux.append(out.aux_logits.float().cpu())
    return torch.cat(main).numpy(), (torch.cat(aux).numpy() if aux else None)
