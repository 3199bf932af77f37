"""A probe of what a plain backbone's pooled features hold (``lcm data ceilings --probe``).

A ``gap`` model (ResNet-18 from scratch) is trained briefly on the benchmark's train split and
frozen; its globally pooled features of every image are then fit, per class, by a linear
model (logistic regression) and a small MLP, and scored (AP) on the val split. Where the MLP
beats the linear probe, the features hold the evidence but not linearly: what a head that
combines features (an MLP, a Transformer) has to add.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from lcm.progress import ProgressCallback


@dataclass(frozen=True)
class ProbeRow:
    name: str
    role: str
    linear_ap: float
    mlp_ap: float


def _features(model: torch.nn.Module, shards: Path, image_size: int) -> tuple:
    from lcm.data.shards import eval_loader

    feats, targets = [], []
    loader = eval_loader(shards, batch_size=128, image_size=image_size, num_workers=0)
    with torch.no_grad():
        for batch in loader:
            feats.append(model.backbone(batch.images).mean(dim=(2, 3)).numpy())
            targets.append(batch.targets.numpy())
    return np.concatenate(feats), np.concatenate(targets)


def probe_backbone(
    raw: Path,
    *,
    epochs: int = 3,
    image_size: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> list[ProbeRow]:
    """Train ``gap`` for ``epochs`` on ``raw``'s train split, freeze it, probe every class."""
    from lcm.config import params_from_dict
    from lcm.data.coco import prepare_coco
    from lcm.data.shard_writer import write_shards
    from lcm.data.synthetic.ceilings import _load_meta
    from lcm.engine import fit
    from lcm.train_request import TrainRequest

    raw = Path(raw)
    meta = _load_meta(raw)
    size = image_size or int(meta["args"]["size"])
    role = {c["name"]: c["role"] for c in meta["classes"]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = {}
        for split in ("train", "val"):
            prepare_coco(raw / "annotations" / f"instances_{split}.json",
                         raw / "images" / split, root / "prepared" / split)  # fmt: skip
            write_shards(root / "prepared" / split, raw / "images" / split,
                         root / split, max_side=None, shard_size=1000, workers=1)  # fmt: skip
            shards[split] = root / split
        params = params_from_dict(
            {
                "model": {"arch": "gap", "backbone": "resnet18"},
                "train": {"epochs": epochs, "image_size": size, "batch_size": 64, "lr": 0.002,
                          "seed": seed, "device": "cpu", "num_workers": 0, "ema_decay": None},
                "loss": {"beta": 0.0},
            }
        )  # fmt: skip
        fit(TrainRequest(params, str(shards["train"]), root / "model"),
            progress=(lambda d, t: progress(d, t)) if progress else None)  # fmt: skip
        from lcm.checkpoint import load_for_inference

        loaded = load_for_inference(root / "model", "raw", torch.device("cpu"))
        model = loaded.model.eval()
        x_f, y_f = _features(model, shards["train"], size)
        x_e, y_e = _features(model, shards["val"], size)
    rows = []
    for c, name in enumerate(loaded.meta.classes):
        if y_f[:, c].min() == y_f[:, c].max() or y_e[:, c].max() < 1:
            continue
        aps = []
        for clf in (
            LogisticRegression(max_iter=2000),
            MLPClassifier((64,), max_iter=500, early_stopping=True, random_state=seed),
        ):
            model_c = make_pipeline(StandardScaler(), clf)
            with threadpool_limits(limits=1):
                model_c.fit(x_f, y_f[:, c])
                aps.append(average_precision_score(y_e[:, c], model_c.predict_proba(x_e)[:, 1]))
        rows.append(ProbeRow(name, role.get(name, "?"), float(aps[0]), float(aps[1])))
    return rows


def format_probe_table(rows: list[ProbeRow]) -> str:
    lines = ["| class | role | linear probe AP | MLP probe AP | gain |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.role} | {r.linear_ap:.3f} | {r.mlp_ap:.3f} | "
            f"{r.mlp_ap - r.linear_ap:+.3f} |"
        )
    for role in sorted({r.role for r in rows}):
        g = [r for r in rows if r.role == role]
        lin, mlp = np.mean([r.linear_ap for r in g]), np.mean([r.mlp_ap for r in g])
        lines.append(f"| **mean: {role}** | | {lin:.3f} | {mlp:.3f} | {mlp - lin:+.3f} |")
    return "\n".join(lines) + "\n"
