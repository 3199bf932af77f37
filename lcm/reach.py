"""Where a label's maps reach on the synthetic benchmark: the paper's Fig. 3 claim, measured.

The paper's attention picture claims that LCM's context maps reach beyond the class's own
object to its context. On the interaction tier that claim is checkable: a look-alike's member
is decided by two *anchor* glyphs drawn in the other half of the image, so a context map that
does its job puts mass on anchor glyphs, while the class-aware map sits on the look-alike's own
glyph.

:func:`anchor_reach` reads a synthetic split in its COCO layout (boxes and each category's
role, ``supercategory``), runs an LCM checkpoint on every image and, per label, averages over
the images where the label is present the share of each map's mass that falls on anchor cells:
the cells of the backbone's feature map (4 x 4 at 128 px) that any anchor glyph's box
overlaps. Both maps are distributions over the cells, so a share is in [0, 1] and the two are
comparable: a ratio above 1 means the context map looks at anchors more than the class-aware
map does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcm.errors import DataError


def _anchor_cells(boxes: list[list[float]], scale: float, h: int, w: int, size: int) -> np.ndarray:
    """(h*w,) bool: feature-map cells that a box (COCO x, y, w, h, scaled) overlaps."""
    cells = np.zeros((h, w), dtype=bool)
    ch, cw = size / h, size / w
    for x, y, bw, bh in boxes:
        x0, y0, x1, y1 = x * scale, y * scale, (x + bw) * scale, (y + bh) * scale
        rows = range(int(y0 // ch), min(h, int(np.ceil(y1 / ch))))
        cols = range(int(x0 // cw), min(w, int(np.ceil(x1 / cw))))
        for r in rows:
            cells[r, list(cols)] = True
    return cells.reshape(-1)


@torch.no_grad()
def anchor_reach(
    model_dir: Path,
    raw: Path,
    split: str = "val",
    *,
    weights: str = "raw",
    max_images: int = 500,
    device: torch.device | None = None,
    progress: Any = None,
) -> dict[str, dict[str, float]]:
    """Per label of the tier: ``{"class_aware": share, "context": share, "images": n}``, the
    mean share of each map's mass on anchor cells over the images (at most ``max_images``,
    in file order) where the label is present."""
    from lcm.data.transforms import decode_image_file, eval_transform, normalize
    from lcm.visualize import _load

    ann_file = Path(raw) / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: not found; --raw must be a synthetic dataset's root "
                        "(lcm data synth)")  # fmt: skip
    doc = json.loads(ann_file.read_text())
    roles = {c["id"]: c.get("supercategory") for c in doc["categories"]}
    names = {c["id"]: c["name"] for c in doc["categories"]}
    if "anchor" not in roles.values():
        raise DataError(f"{ann_file}: no category has the role 'anchor'; anchor reach is "
                        "defined on the interaction tier")  # fmt: skip
    device = device or torch.device("cpu")
    loaded = _load(model_dir, weights, device, "lcm")
    meta = loaded.meta
    classes = list(meta.classes)
    preset = eval_transform(meta.image_size)
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    sums = {c: np.zeros(2) for c in classes}
    counts = dict.fromkeys(classes, 0)
    images = sorted(doc["images"], key=lambda im: im["file_name"])[:max_images]
    root = (Path(raw) / "images" / split).resolve()
    for n, im in enumerate(images, 1):
        path = (root / im["file_name"]).resolve()
        if not path.is_relative_to(root):
            raise DataError(f"{ann_file}: image {im['file_name']!r} lies outside {root}")
        px = preset.pixels(decode_image_file(path.read_bytes()))
        feats = loaded.model.forward_features(
            normalize(px[None].to(device), mean=meta.mean, std=meta.std)
        )
        h, w = feats["class_attention"].shape[-2:]
        anns = by_image.get(im["id"], [])
        anchors = [a["bbox"] for a in anns if roles[a["category_id"]] == "anchor"]
        cells = _anchor_cells(anchors, meta.image_size / im["width"], h, w, meta.image_size)
        cls_map = feats["class_attention"][0].flatten(1).float().cpu().numpy()  # (C, HW)
        ctx_map = feats["context_map"][0].flatten(1).float().cpu().numpy()  # (C, HW)
        for name in {names[a["category_id"]] for a in anns}:
            c = classes.index(name)
            sums[name] += (cls_map[c, cells].sum(), ctx_map[c, cells].sum())
            counts[name] += 1
        if progress:
            progress(n, len(images))
    return {
        name: {"class_aware": float(sums[name][0] / counts[name]),
               "context": float(sums[name][1] / counts[name]), "images": counts[name],
               "role": next(r for i, r in roles.items() if names[i] == name)}
        for name in classes if counts[name]
    }  # fmt: skip


def reach_table(reach: dict[str, dict[str, Any]]) -> str:
    """Markdown: per label, both shares and their ratio; look-alikes first."""
    lines = ["| label | role | images | class-aware map on anchors | context map on anchors | "
             "ratio |", "|---|---|---|---|---|---|"]  # fmt: skip
    order = sorted(reach, key=lambda n: (reach[n]["role"] != "lookalike", n))
    for name in order:
        r = reach[name]
        ratio = r["context"] / r["class_aware"] if r["class_aware"] > 0 else float("inf")
        lines.append(f"| {name} | {r['role']} | {r['images']} | {r['class_aware']:.2f} | "
                     f"{r['context']:.2f} | {ratio:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
