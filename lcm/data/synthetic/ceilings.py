"""What context alone and appearance alone can reach on the synthetic benchmark.

For each look-alike class (and each tiny class) three logistic regressions are fit on one split
and scored (average precision) on another, from the COCO annotations only:

- **context-only**: the image's *other* labels. The class's look-alike partner is left out too:
  knowing the partner is present is the same ambiguity the glyph poses, not context.
- **appearance-only**: a perfect detector of the class's glyph that cannot see context. For a
  look-alike it fires on both pair members alike (they are drawn identically); for a tiny class
  it misses instances narrower than ``tiny_visible_px`` (recorded in ``synth_meta.json``).
  Features: glyph present, instance count, largest side and mean centre (relative to the image).
- **both**: the two feature sets together, the ceiling a model that uses both can approach.

``measure_background_cue`` adds what the background pixels alone give away (they must hint at
the scene, not name a class); it reads the JPEGs.

``measure_count_ceilings`` asks whether a tier needs a model that combines its evidence: for
every class, a linear model (logistic regression) and a non-linear one (gradient-boosted
trees) on the image's per-glyph counts, which is everything a perfect glyph detector sees.
On the default tier both reach about the same AP; on the interaction tier the look-alikes
need the non-linear one (an XOR of two anchors), while appearance classes stay near 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from lcm.data.manifest import resolve_image
from lcm.errors import DataError
from lcm.io import read_json

logger = logging.getLogger(__name__)

META_FILE = "synth_meta.json"


@dataclass(frozen=True)
class CeilingRow:
    name: str
    kind: str  # "lookalike" or "tiny"
    partner: str | None  # the other member of a look-alike pair
    positives: int  # in the evaluation split
    prevalence: float  # share of evaluation images with the class: the AP of a random score
    # Look-alikes: share of evaluation images showing the pair's glyph that hold this member,
    # the AP of "the glyph is there" alone (the coin flip). None for tiny classes.
    coin_flip: float | None
    context_ap: float
    appearance_ap: float
    both_ap: float
    background_ap: float | None = None  # filled by measure_background_cue


@dataclass(frozen=True)
class _Split:
    path: Path
    images: list[dict]
    labels: np.ndarray  # (N, C) {0, 1}
    anns: list[list[dict]]  # per image, in `images` order


def _read_json(path: Path) -> dict:
    return read_json(path, "missing; generate the benchmark first (lcm data synth)")


def _load_meta(raw_root: Path) -> dict:
    path = raw_root / "annotations" / META_FILE
    meta = _read_json(path)
    for key in ("lookalike_pairs", "tiny_classes", "tiny_visible_px", "image_scenes"):
        if key not in meta:
            raise DataError(f"{path}: no {key!r}; not a synthetic benchmark's metadata")
    return meta


def _load_split(raw_root: Path, split: str, names: list[str]) -> _Split:
    path = raw_root / "annotations" / f"instances_{split}.json"
    coco = _read_json(path)
    try:
        id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
        col = {name: i for i, name in enumerate(names)}
        images = sorted(coco["images"], key=lambda im: im["id"])
        row = {im["id"]: i for i, im in enumerate(images)}
        labels = np.zeros((len(images), len(names)), dtype=np.float64)
        anns: list[list[dict]] = [[] for _ in images]
        for ann in coco["annotations"]:
            r = row[ann["image_id"]]
            labels[r, col[id_to_name[ann["category_id"]]]] = 1.0
            anns[r].append({**ann, "name": id_to_name[ann["category_id"]]})
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed COCO annotations ({exc!r})") from exc
    return _Split(path, images, labels, anns)


def _glyph_features(split: _Split, members: set[str], min_side: float) -> np.ndarray:
    """(N, 5): present, count, largest side, mean centre x, y of the glyph's seen instances."""
    feats = np.zeros((len(split.images), 5))
    for i, (image, anns) in enumerate(zip(split.images, split.anns, strict=True)):
        side = float(max(image["width"], image["height"]))
        seen = [a["bbox"] for a in anns if a["name"] in members and max(a["bbox"][2:]) >= min_side]
        if seen:
            boxes = np.asarray(seen)  # (k, 4)
            centres = (boxes[:, :2] + boxes[:, 2:] / 2).mean(axis=0) / side
            feats[i] = [1.0, len(seen), boxes[:, 2:].max() / side, *centres]
    return feats


def _fit_ap(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # These fits are tiny: BLAS threads only spin against each other (30x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        model.fit(x_fit, y_fit)
        scores = model.predict_proba(x_eval)[:, 1]
    return float(average_precision_score(y_eval, scores))


def _targets(meta: dict) -> list[tuple[str, str, str | None]]:
    rows: list[tuple[str, str, str | None]] = []
    for pair in meta["lookalike_pairs"]:
        a, b = pair["classes"]
        rows += [(a, "lookalike", b), (b, "lookalike", a)]
    rows += [(name, "tiny", None) for name in meta["tiny_classes"]]
    return rows


def measure_ceilings(
    raw_root: Path, *, split_fit: str = "train", split_eval: str = "val"
) -> list[CeilingRow]:
    """Context-only, appearance-only and combined AP per look-alike and tiny class."""
    raw_root = Path(raw_root)
    meta = _load_meta(raw_root)
    names = [c["name"] for c in meta["classes"]]
    fit, ev = (_load_split(raw_root, s, names) for s in (split_fit, split_eval))
    rows: list[CeilingRow] = []
    for name, kind, partner in _targets(meta):
        c = names.index(name)
        keep = [i for i, n in enumerate(names) if n not in (name, partner)]
        # A tiny object below the visibility limit is invisible to the appearance detector.
        members, min_side = (
            ({name, partner}, 0.0) if partner else ({name}, float(meta["tiny_visible_px"]))
        )
        ctx_f, ctx_e = fit.labels[:, keep], ev.labels[:, keep]
        app_f = _glyph_features(fit, members, min_side)
        app_e = _glyph_features(ev, members, min_side)
        y_f, y_e = fit.labels[:, c], ev.labels[:, c]
        if y_f.min() == y_f.max():
            raise DataError(f"{fit.path}: {name!r} is in every image or in none; cannot fit on it")
        if y_e.sum() == 0:
            logger.warning("%s: no positive in %s; no ceiling for it", name, ev.path)
            continue
        rows.append(
            CeilingRow(
                name=name,
                kind=kind,
                partner=partner,
                positives=int(y_e.sum()),
                prevalence=float(y_e.mean()),
                coin_flip=float(y_e[app_e[:, 0] > 0].mean()) if partner else None,
                context_ap=_fit_ap(ctx_f, y_f, ctx_e, y_e),
                appearance_ap=_fit_ap(app_f, y_f, app_e, y_e),
                both_ap=_fit_ap(np.hstack([ctx_f, app_f]), y_f, np.hstack([ctx_e, app_e]), y_e),
            )
        )
    return rows


def _background_features(raw_root: Path, split: str, sp: _Split) -> np.ndarray:
    """(N, 18): mean and sd of RGB over pixels outside every box, and per-quadrant means."""
    feats = []
    for image, anns in zip(sp.images, sp.anns, strict=True):
        path = resolve_image(raw_root / "images" / split, image["file_name"])
        with Image.open(path) as im:
            px = np.asarray(im.convert("RGB"), dtype=np.float64)  # (H, W, 3)
        free = np.ones(px.shape[:2], dtype=bool)
        for x, y, w, h in (a["bbox"] for a in anns):
            # One pixel of margin: JPEG and anti-aliasing bleed colour just outside the box.
            x0, y0 = max(int(x) - 1, 0), max(int(y) - 1, 0)
            free[y0 : int(np.ceil(y + h)) + 1, x0 : int(np.ceil(x + w)) + 1] = False
        hh, ww = free.shape[0] // 2, free.shape[1] // 2
        quads = []
        for sy in (slice(0, hh), slice(hh, None)):
            for sx in (slice(0, ww), slice(ww, None)):
                q = free[sy, sx]
                quads.append(px[sy, sx][q].mean(axis=0) if q.any() else px[sy, sx].mean((0, 1)))
        bg = px[free] if free.any() else px.reshape(-1, 3)
        feats.append(np.concatenate([bg.mean(axis=0), bg.std(axis=0), *quads]))
    return np.asarray(feats)


def measure_background_cue(
    raw_root: Path,
    rows: list[CeilingRow],
    *,
    split_fit: str = "train",
    split_eval: str = "val",
) -> tuple[float | None, list[CeilingRow]]:
    """Scene accuracy from background pixels alone (None with one scene), and ``rows`` with
    ``background_ap`` set."""
    raw_root = Path(raw_root)
    meta = _load_meta(raw_root)
    names = [c["name"] for c in meta["classes"]]
    fit, ev = (_load_split(raw_root, s, names) for s in (split_fit, split_eval))
    x_f = _background_features(raw_root, split_fit, fit)
    x_e = _background_features(raw_root, split_eval, ev)
    try:
        s_f = [meta["image_scenes"][split_fit][str(im["id"])] for im in fit.images]
        s_e = [meta["image_scenes"][split_eval][str(im["id"])] for im in ev.images]
    except KeyError as exc:
        raise DataError(f"{raw_root / 'annotations' / META_FILE}: no scene for {exc}") from exc
    accuracy = None  # a tier with one scene has no scene to guess
    if len(set(s_f)) > 1:
        scene_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        with threadpool_limits(limits=1):
            scene_model.fit(x_f, s_f)
            accuracy = float(scene_model.score(x_e, s_e))
    out = []
    for row in rows:
        c = names.index(row.name)
        ap = _fit_ap(x_f, fit.labels[:, c], x_e, ev.labels[:, c])
        out.append(CeilingRow(**{**row.__dict__, "background_ap": ap}))
    return accuracy, out


def format_ceilings_table(rows: list[CeilingRow]) -> str:
    """Markdown table of the ceilings, one row per class."""
    with_bg = any(r.background_ap is not None for r in rows)
    head = ["class", "kind", "told apart from", "val positives", "prevalence", "coin flip",
            "context-only AP", "appearance-only AP", "both AP"]  # fmt: skip
    if with_bg:
        head.append("background-only AP")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flip = "-" if r.coin_flip is None else f"{r.coin_flip:.3f}"
        cells = [r.name, r.kind, r.partner or "-", str(r.positives), f"{r.prevalence:.3f}", flip,
                 f"{r.context_ap:.3f}", f"{r.appearance_ap:.3f}", f"{r.both_ap:.3f}"]  # fmt: skip
        if with_bg:
            cells.append("-" if r.background_ap is None else f"{r.background_ap:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CountCeiling:
    name: str
    role: str  # the class's role in the story (anchor, lookalike, tiny, member, generic)
    positives: int  # in the evaluation split
    prevalence: float
    linear_ap: float  # logistic regression on the per-glyph counts
    nonlinear_ap: float  # gradient-boosted trees on the same counts

    @property
    def gain(self) -> float:
        return self.nonlinear_ap - self.linear_ap


def _glyph_counts(split: _Split, glyph_of: dict[str, str], glyphs: list[str]) -> np.ndarray:
    """(N, G): how many instances of each glyph an image shows."""
    col = {g: i for i, g in enumerate(glyphs)}
    counts = np.zeros((len(split.images), len(glyphs)))
    for i, anns in enumerate(split.anns):
        for a in anns:
            counts[i, col[glyph_of[a["name"]]]] += 1
    return counts


def measure_count_ceilings(
    raw_root: Path, *, split_fit: str = "train", split_eval: str = "val", seed: int = 0
) -> list[CountCeiling]:
    """Linear and non-linear AP on per-glyph counts, for every class with a positive."""
    raw_root = Path(raw_root)
    meta = _load_meta(raw_root)
    names = [c["name"] for c in meta["classes"]]
    glyph_of = {c["name"]: c["glyph"] for c in meta["classes"]}
    role_of = {c["name"]: c["role"] for c in meta["classes"]}
    glyphs = sorted(set(glyph_of.values()))
    fit, ev = (_load_split(raw_root, s, names) for s in (split_fit, split_eval))
    x_f, x_e = _glyph_counts(fit, glyph_of, glyphs), _glyph_counts(ev, glyph_of, glyphs)
    rows = []
    for c, name in enumerate(names):
        y_f, y_e = fit.labels[:, c], ev.labels[:, c]
        if y_f.min() == y_f.max() or y_e.sum() == 0:
            logger.warning("%s: no positive (or no negative) to fit or score; skipped", name)
            continue
        trees = HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.1, min_samples_leaf=5, random_state=seed
        )
        with threadpool_limits(limits=1):
            trees.fit(x_f, y_f)
            nonlinear = float(average_precision_score(y_e, trees.predict_proba(x_e)[:, 1]))
        rows.append(
            CountCeiling(
                name=name,
                role=role_of[name],
                positives=int(y_e.sum()),
                prevalence=float(y_e.mean()),
                linear_ap=_fit_ap(x_f, y_f, x_e, y_e),
                nonlinear_ap=nonlinear,
            )
        )
    return rows


def format_count_table(rows: list[CountCeiling]) -> str:
    """Markdown table: per class, linear vs non-linear AP on the glyph counts."""
    lines = [
        "| class | role | val positives | prevalence | linear AP | non-linear AP | gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.role} | {r.positives} | {r.prevalence:.3f} | {r.linear_ap:.3f} | "
            f"{r.nonlinear_ap:.3f} | {r.gain:+.3f} |"
        )
    by_role: dict[str, list[CountCeiling]] = {}
    for r in rows:
        by_role.setdefault(r.role, []).append(r)
    for role, group in by_role.items():
        lin = float(np.mean([r.linear_ap for r in group]))
        non = float(np.mean([r.nonlinear_ap for r in group]))
        lines.append(f"| **mean: {role}** | | | | {lin:.3f} | {non:.3f} | {non - lin:+.3f} |")
    return "\n".join(lines) + "\n"
