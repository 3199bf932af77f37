"""The built-in synthetic benchmark, written in the real COCO layout.

Generative story (the dataset card in the README tells it in full):

- Every image has one of six *scenes*. A scene owns two *companion groups*; an image shows one
  or both of them (plus, sometimes, a generic object that belongs to no scene). A group has an
  *anchor* (almost always present) and one or two members that follow it.
- Four *look-alike pairs* share one glyph: same shape, same colour, same size, position and
  rotation distribution. The renderer only ever sees glyphs, never classes, so the two members
  are pixel-identical in the same context; only their companions (and, weakly, the scene) tell
  them apart.
- Three *tiny* classes are mostly drawn 3-6 px wide (at 96 px), too small to recognise, but
  they follow their anchor like any other member.
- Backgrounds are tinted per scene, with per-image jitter large enough that the tint is a hint
  shared by a whole scene (several classes), never a label.

``annotations/synth_meta.json`` records the story (pairs, tiny classes, scenes, each image's
scene, the arguments) so :mod:`lcm.data.ceilings` and later studies can name them.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lcm.errors import ConfigError, DataError
from lcm.progress import ProgressCallback

logger = logging.getLogger(__name__)

# ---- the story ------------------------------------------------------------------------------
REFERENCE_SIZE = 96  # glyph sizes below are pixels at this image side; they scale with it
MAX_OBJECTS = 6
TWO_GROUPS_P = 0.5  # an image shows both of its scene's groups, else one
EXTRA_INSTANCE_P = 0.15  # a present class shows a second instance
EXTRA_TINY_P = 0.3
TINY_SIZE = (3.0, 6.0)
# Ceilings treat a tiny object narrower than this (at 96 px) as unseen by an appearance model.
TINY_VISIBLE_PX = 8.0
TINT_JITTER = 20.0  # per-channel sd of an image's tint around its scene's: scenes overlap
_PLACE_TRIES = 25
_MAX_OVERLAP = 0.35  # placement retries until boxes overlap less than this share of the smaller
_SUPERSAMPLE = 3

_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 160, 60), "lime": (165, 230, 60), "teal": (20, 150, 150),
    "cyan": (70, 225, 245), "blue": (40, 80, 220), "navy": (25, 35, 115),
    "purple": (140, 50, 190), "magenta": (220, 50, 170), "pink": (250, 150, 190),
    "brown": (125, 75, 30), "olive": (115, 125, 30), "white": (245, 245, 245),
    "black": (20, 20, 20),
}  # fmt: skip

_ANCHOR, _MEMBER, _LOOK, _SMALL, _GENERIC = (22, 36), (13, 24), (14, 24), (8, 11), (11, 20)


@dataclass(frozen=True)
class Glyph:
    """How a class is drawn. Look-alike pairs point at one Glyph, hence draw identically."""

    shape: str
    colour: str
    size: tuple[float, float]  # side range in px at REFERENCE_SIZE
    tiny_p: float = 0.0  # probability of being drawn at TINY_SIZE instead

    @property
    def rgb(self) -> tuple[int, int, int]:
        return _PALETTE[self.colour]


GLYPHS: dict[str, Glyph] = {
    f"{colour} {shape}": Glyph(shape, colour, size, tiny_p)
    for shape, colour, size, tiny_p in [
        ("hexagon", "orange", _ANCHOR, 0.0), ("square", "red", _ANCHOR, 0.0),
        ("frame", "blue", _ANCHOR, 0.0), ("diamond", "navy", _ANCHOR, 0.0),
        ("star", "magenta", _ANCHOR, 0.0), ("disc", "green", _ANCHOR, 0.0),
        ("semicircle", "purple", _ANCHOR, 0.0), ("crescent", "pink", _ANCHOR, 0.0),
        ("frame", "black", _ANCHOR, 0.0), ("square", "green", _ANCHOR, 0.0),
        ("square", "blue", _ANCHOR, 0.0), ("triangle", "lime", _ANCHOR, 0.0),
        ("triangle", "orange", _MEMBER, 0.0), ("cross", "red", _MEMBER, 0.0),
        ("ring", "teal", _LOOK, 0.0), ("disc", "yellow", _LOOK, 0.0),
        ("pill", "white", _LOOK, 0.0), ("bar", "brown", _LOOK, 0.0),
        ("diamond", "white", _SMALL, 0.8), ("ellipse", "black", _SMALL, 0.8),
        ("plus", "cyan", _SMALL, 0.8),
        ("chevron", "black", _GENERIC, 0.0), ("hexagon", "olive", _GENERIC, 0.0),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class SynthClass:
    name: str
    glyph: str
    role: str  # anchor | lookalike | tiny | member | generic (written as COCO supercategory)


CLASSES: tuple[SynthClass, ...] = tuple(
    SynthClass(name, glyph, role)
    for name, glyph, role in [
        ("kettle", "orange hexagon", "anchor"), ("cup", "teal ring", "lookalike"),
        ("toaster", "red square", "anchor"), ("bread", "brown bar", "lookalike"),
        ("crumb", "white diamond", "tiny"),
        ("car", "blue frame", "anchor"), ("tyre", "teal ring", "lookalike"),
        ("sign", "navy diamond", "anchor"), ("cone", "orange triangle", "member"),
        ("flower", "magenta star", "anchor"), ("bee", "black ellipse", "tiny"),
        ("tree", "green disc", "anchor"), ("lemon", "yellow disc", "lookalike"),
        ("umbrella", "purple semicircle", "anchor"), ("ball", "yellow disc", "lookalike"),
        ("shell", "pink crescent", "anchor"), ("crab", "red cross", "member"),
        ("monitor", "black frame", "anchor"), ("mouse", "white pill", "lookalike"),
        ("binder", "green square", "anchor"), ("stapler", "white pill", "lookalike"),
        ("toolbox", "blue square", "anchor"), ("screw", "cyan plus", "tiny"),
        ("saw", "lime triangle", "anchor"), ("plank", "brown bar", "lookalike"),
        ("bird", "black chevron", "generic"), ("bag", "olive hexagon", "generic"),
    ]
)  # fmt: skip

# COCO's own category-id gaps, so the prepare step's id -> rank mapping is exercised.
_COCO_ID_GAPS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[tuple[str, float], ...]  # (class, probability of being present)


@dataclass(frozen=True)
class Scene:
    name: str
    tint: tuple[float, float, float]  # background RGB around which each image jitters
    groups: tuple[Group, Group]


def _g(name: str, *members: tuple[str, float]) -> Group:
    return Group(name, members)


# Anchors 0.98: a look-alike or tiny member occasionally shows up without its anchor, and a
# member misses 3-6% of the time, so context alone is strong but not perfect.
SCENES: tuple[Scene, ...] = (
    Scene("kitchen", (168, 150, 124), (
        _g("tea", ("kettle", 0.98), ("cup", 0.97)),
        _g("breakfast", ("toaster", 0.98), ("bread", 0.97), ("crumb", 0.94)))),
    Scene("street", (126, 126, 132), (
        _g("parking", ("car", 0.98), ("tyre", 0.97)),
        _g("crossing", ("sign", 0.98), ("cone", 0.8)))),
    Scene("garden", (118, 144, 106), (
        _g("flowerbed", ("flower", 0.98), ("bee", 0.94)),
        _g("orchard", ("tree", 0.98), ("lemon", 0.97)))),
    Scene("beach", (178, 168, 132), (
        _g("games", ("umbrella", 0.98), ("ball", 0.97)),
        _g("shore", ("shell", 0.98), ("crab", 0.8)))),
    Scene("office", (138, 140, 162), (
        _g("desk", ("monitor", 0.98), ("mouse", 0.97)),
        _g("filing", ("binder", 0.98), ("stapler", 0.97)))),
    Scene("workshop", (148, 126, 106), (
        _g("bench", ("toolbox", 0.98), ("screw", 0.94)),
        _g("carpentry", ("saw", 0.98), ("plank", 0.97)))),
)  # fmt: skip
GENERIC: tuple[tuple[str, float], ...] = (("bird", 0.2), ("bag", 0.2))

_BY_NAME = {c.name: c for c in CLASSES}
LOOKALIKE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a.name, b.name)
    for i, a in enumerate(CLASSES)
    for b in CLASSES[i + 1 :]
    if a.role == "lookalike" and a.glyph == b.glyph
)
TINY_CLASSES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.role == "tiny")


def glyph_of(name: str) -> str:
    return _BY_NAME[name].glyph


def _lookalike_glyphs(group: Group) -> set[str]:
    return {_BY_NAME[m].glyph for m, _ in group.members if _BY_NAME[m].role == "lookalike"}


def category_ids() -> dict[str, int]:
    """Class name -> COCO category id (increasing, with COCO's gaps)."""
    free = (i for i in range(1, 1000) if i not in _COCO_ID_GAPS)
    return {c.name: next(free) for c in CLASSES}


@dataclass(frozen=True)
class Placed:
    """One drawn object: a glyph and its geometry. Deliberately carries no class."""

    glyph: str
    cx: float
    cy: float
    side: float  # px; the glyph fits in the circle of this diameter
    angle: float  # radians
    rgb: tuple[float, float, float]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two (x0, y0, x1, y1) boxes over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def place_glyphs(glyphs: list[str], size: int, rng: np.random.Generator) -> list[Placed]:
    """Geometry for each glyph, in draw order; a function of the glyphs only, never classes."""
    scale = size / REFERENCE_SIZE
    placed: list[Placed] = []
    boxes: list[tuple[float, ...]] = []
    for key in glyphs:
        g = GLYPHS[key]
        lo, hi = TINY_SIZE if rng.random() < g.tiny_p else g.size
        side = max(2.0, rng.uniform(lo, hi) * scale)
        best, best_score = (0.0, 0.0), np.inf
        for _ in range(_PLACE_TRIES):
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            score = max((_overlap(box, b) for b in boxes), default=0.0)
            if score < best_score:
                best, best_score = (cx, cy), score
            if score <= _MAX_OVERLAP:
                break
        cx, cy = best
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        rgb = tuple(np.clip(np.asarray(g.rgb) + rng.normal(0.0, 10.0, 3), 0, 255).tolist())
        placed.append(Placed(key, float(cx), float(cy), side, rng.uniform(0, 2 * np.pi), rgb))
    return placed


def sample_image(rng: np.random.Generator, size: int) -> tuple[Scene, list[str], list[Placed]]:
    """Scene, classes in draw order, and their placed glyphs for one image."""
    scene = SCENES[rng.integers(len(SCENES))]
    n_groups = 2 if rng.random() < TWO_GROUPS_P else 1
    groups = [scene.groups[i] for i in rng.permutation(len(scene.groups))[:n_groups]]
    if len(groups) == 2 and _lookalike_glyphs(groups[0]) & _lookalike_glyphs(groups[1]):
        # Two members of a pair in one image would let "two such glyphs" name both of them.
        groups = groups[:1]
    classes: list[str] = []
    for group in groups:
        draws = rng.random(len(group.members))
        present = [m for (m, p), d in zip(group.members, draws, strict=True) if d < p]
        classes += present or [group.members[0][0]]
    strays = [m for m, p in GENERIC if rng.random() < p]
    extra_p = [EXTRA_TINY_P if _BY_NAME[c].role == "tiny" else EXTRA_INSTANCE_P for c in classes]
    extras = [c for c, p in zip(classes, extra_p, strict=True) if rng.random() < p]
    objects = (classes + strays + extras)[:MAX_OBJECTS]
    objects = [objects[i] for i in rng.permutation(len(objects))]
    return scene, objects, place_glyphs([glyph_of(c) for c in objects], size, rng)


# ---- rendering (glyphs only) ----------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape on rotated coordinates in the unit disc."""
    au, av = np.abs(u), np.abs(v)
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 0.9
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if shape == "square":
        return np.maximum(au, av) <= 0.66
    if shape == "frame":
        m = np.maximum(au, av)
        return (m <= 0.68) & (m >= 0.4)
    if shape == "diamond":
        return au + av <= 0.92
    if shape == "triangle":
        return (v <= 0.47) & (np.sqrt(3) * au - v <= 0.94)
    if shape == "hexagon":
        return (av <= 0.8) & (np.sqrt(3) * au + av <= 1.6)
    if shape == "star":
        return r <= 0.55 + 0.38 * np.cos(5 * np.arctan2(v, u))
    if shape == "crescent":
        return (r <= 0.9) & (np.hypot(u - 0.4, v) > 0.7)
    if shape == "semicircle":
        return (r <= 0.92) & (v <= 0.2)
    if shape == "ellipse":
        return (u / 0.9) ** 2 + (v / 0.5) ** 2 <= 1
    if shape == "pill":
        return np.hypot(np.maximum(au - 0.5, 0), v) <= 0.4
    if shape == "bar":
        return (au <= 0.92) & (av <= 0.3)
    if shape == "plus":
        return ((au <= 0.28) & (av <= 0.9)) | ((av <= 0.28) & (au <= 0.9))
    if shape == "cross":
        return _shape_mask("plus", (u + v) / np.sqrt(2), (u - v) / np.sqrt(2))
    if shape == "chevron":
        d = v - 0.8 * au
        return (au <= 0.8) & (d >= -0.5) & (d <= -0.05)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Box:
    bbox: list[float]  # COCO [x, y, w, h] of the drawn pixels
    area: float  # covered pixels (anti-aliased)


def _coverage(obj: Placed, size: int) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of one glyph: top-left corner and alpha (h, w)."""
    half = obj.side / 2
    x0, y0 = max(int(np.floor(obj.cx - half)), 0), max(int(np.floor(obj.cy - half)), 0)
    x1, y1 = min(int(np.ceil(obj.cx + half)), size), min(int(np.ceil(obj.cy + half)), size)
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    du = ((np.arange(x0, x1)[:, None] + offs).ravel() - obj.cx) / half  # (w*SS,)
    dv = ((np.arange(y0, y1)[:, None] + offs).ravel() - obj.cy) / half  # (h*SS,)
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    u = c * du[None, :] + s * dv[:, None]  # (h*SS, w*SS)
    v = -s * du[None, :] + c * dv[:, None]
    mask = _shape_mask(GLYPHS[obj.glyph].shape, u, v)
    alpha = mask.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    return x0, y0, alpha


def _interp(size: int, n: int) -> np.ndarray:
    """(size, n) bilinear weights that stretch an n-point grid over size pixels."""
    t = (np.arange(size) + 0.5) / size * (n - 1)
    return np.clip(1 - np.abs(t[:, None] - np.arange(n)[None, :]), 0, None)


def _background(tint: tuple[float, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(tint, dtype=np.float64) + rng.normal(0.0, TINT_JITTER, 3)
    w = _interp(size, 4)
    rows = np.tensordot(w, rng.normal(0.0, 12.0, (4, 4, 3)), axes=(1, 0))  # (S, 4, 3)
    blotches = (rows.transpose(0, 2, 1) @ w.T).transpose(0, 2, 1)  # (S, S, 3)
    theta, amp = rng.uniform(0, 2 * np.pi), rng.normal(0.0, 12.0)
    pos = (np.arange(size) + 0.5) / size - 0.5
    ramp = amp * (np.cos(theta) * pos[None, :] + np.sin(theta) * pos[:, None])  # (S, S)
    return (base + blotches + ramp[..., None]).astype(np.float32)


def render_image(
    scene: Scene, objects: list[Placed], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[Box]]:
    """Pixels (S, S, 3) uint8 and one box per object; later objects occlude earlier ones."""
    img = _background(scene.tint, size, rng)  # (S, S, 3)
    boxes: list[Box] = []
    for obj in objects:
        x0, y0, alpha = _coverage(obj, size)
        h, w = alpha.shape
        patch = img[y0 : y0 + h, x0 : x0 + w]
        patch += alpha[..., None] * (np.asarray(obj.rgb) - patch)
        rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
        bbox = [float(x0 + cols[0]), float(y0 + rows[0]), float(cols[-1] - cols[0] + 1),
                float(rows[-1] - rows[0] + 1)]  # fmt: skip
        boxes.append(Box(bbox, round(float(alpha.sum()), 2)))
    img += 5.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), boxes


GENERATOR_VERSION = 1
META_FILE = "synth_meta.json"
SPLITS = ("train", "val")
JPEG_QUALITY = 90
_SPLIT_CODE = {"train": 0, "val": 1}
_MIN_SIZE = 32


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_synthetic` wrote."""

    out: Path
    classes: tuple[str, ...]
    images: dict[str, int]
    annotations: dict[str, int]
    lookalike_pairs: tuple[tuple[str, str], ...]
    tiny_classes: tuple[str, ...]


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    index: int
    size: int


def _make_image(job: _Job) -> tuple[bytes, list[dict], str]:
    """Sample and render one image; everything random comes from its own seed sequence."""
    # One generator per image keyed by (seed, split, index): the output does not depend on the
    # number of worker processes or on the order in which they finish.
    rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, _SPLIT_CODE[job.split], job.index])
    )
    scene, classes, objects = sample_image(rng, job.size)
    pixels, boxes = render_image(scene, objects, job.size, rng)  # (S, S, 3) uint8
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    ids = category_ids()
    anns = [
        {"category_id": ids[cls], "bbox": box.bbox, "area": box.area}
        for cls, box in zip(classes, boxes, strict=True)
    ]
    return buf.getvalue(), anns, scene.name


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[bytes, list[dict], str]]:
    if workers <= 1 or len(jobs) < 64:
        yield from map(_make_image, jobs)
        return
    # spawn, not fork: the caller may hold threads (torch, Prefect) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_make_image, jobs, chunksize=64)


def _categories() -> list[dict]:
    ids = category_ids()
    return [{"id": ids[c.name], "name": c.name, "supercategory": c.role} for c in CLASSES]


def _meta(args: dict, image_scenes: dict[str, dict[str, str]]) -> dict:
    ids = category_ids()
    size = args["size"]
    return {
        "generator": "lcm.data.synthetic",
        "version": GENERATOR_VERSION,
        "args": args,
        "reference_size": REFERENCE_SIZE,
        "tiny_visible_px": TINY_VISIBLE_PX * size / REFERENCE_SIZE,
        "scenes": [
            {
                "name": s.name,
                "tint": list(s.tint),
                "groups": [
                    {"name": g.name, "members": [{"class": m, "p": p} for m, p in g.members]}
                    for g in s.groups
                ],
            }
            for s in SCENES
        ],
        "generic": [{"class": m, "p": p} for m, p in GENERIC],
        "classes": [
            {"name": c.name, "category_id": ids[c.name], "role": c.role, "glyph": c.glyph}
            for c in CLASSES
        ],
        "glyphs": {
            k: {"shape": g.shape, "rgb": list(g.rgb), "size": list(g.size), "tiny_p": g.tiny_p}
            for k, g in GLYPHS.items()
        },
        "lookalike_pairs": [{"glyph": glyph_of(a), "classes": [a, b]} for a, b in LOOKALIKE_PAIRS],
        "tiny_classes": list(TINY_CLASSES),
        "image_scenes": image_scenes,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _write_benchmark(
    root: Path,
    counts: dict[str, int],
    size: int,
    seed: int,
    workers: int,
    progress: ProgressCallback | None,
) -> SynthSummary:
    (root / "annotations").mkdir()
    total = sum(counts.values())
    done = 0
    image_id = 0
    ann_id = 0
    n_anns: dict[str, int] = {}
    image_scenes: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True)
        images: list[dict] = []
        annotations: list[dict] = []
        scenes: dict[str, str] = {}
        jobs = [_Job(seed, split, i, size) for i in range(counts[split])]
        for jpeg, anns, scene in _run_jobs(jobs, workers):
            image_id += 1
            file_name = f"{image_id:012d}.jpg"
            (img_dir / file_name).write_bytes(jpeg)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            scenes[str(image_id)] = scene
            for ann in anns:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, **ann, "iscrowd": 0})
            done += 1
            if progress is not None:
                progress(done, total)
        coco = {
            "info": {"description": "lcm synthetic benchmark", "version": GENERATOR_VERSION},
            "images": images,
            "annotations": annotations,
            "categories": _categories(),
        }
        _write_json(root / "annotations" / f"instances_{split}.json", coco)
        n_anns[split] = len(annotations)
        image_scenes[split] = scenes
    args = {"n_train": counts["train"], "n_val": counts["val"], "size": size, "seed": seed}
    _write_json(root / "annotations" / META_FILE, _meta(args, image_scenes))
    return SynthSummary(
        out=root,
        classes=tuple(c.name for c in CLASSES),
        images=dict(counts),
        annotations=n_anns,
        lookalike_pairs=LOOKALIKE_PAIRS,
        tiny_classes=TINY_CLASSES,
    )


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything that is not an earlier synthetic benchmark (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another output path")
    if any(out.iterdir()) and not (out / "annotations" / META_FILE).is_file():
        raise DataError(
            f"{out}: directory is not empty and holds no annotations/{META_FILE}; refusing to "
            "replace it with the synthetic benchmark (remove it or choose another path)"
        )


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:  # cleanup only: the caller's own error (if any) is what matters
        logger.warning("could not remove temporary directory %s: %s", path, exc)


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside ``out`` (same filesystem, so renames are atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; an older benchmark there is removed afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove_tree(old)


def generate_synthetic(
    out: Path,
    *,
    n_train: int = 4000,
    n_val: int = 1000,
    size: int = 96,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    workers: int = 1,
) -> SynthSummary:
    """Write the synthetic benchmark to ``out`` in COCO layout; byte-identical per arguments.

    ``out/images/{train,val}/*.jpg``, ``out/annotations/instances_{train,val}.json`` and
    ``out/annotations/synth_meta.json``. The tree is built in a temporary directory beside
    ``out`` and renamed into place, so an interrupted run leaves ``out`` as it was.
    ``workers`` > 1 renders in that many spawned processes (the bytes do not depend on it); a
    calling script then needs the usual ``if __name__ == "__main__":`` guard.
    """
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"synth: n_train and n_val must be >= 1, got {n_train} and {n_val}")
    if size < _MIN_SIZE:
        raise ConfigError(f"synth: size must be >= {_MIN_SIZE} px, got {size}")
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename
    try:
        counts = {"train": n_train, "val": n_val}
        summary = _write_benchmark(tmp, counts, size, seed, workers, progress)
        _swap_in(tmp, out)
    except BaseException:
        _remove_tree(tmp)
        raise
    logger.info(
        "wrote synthetic benchmark to %s: %d train / %d val images, %d classes",
        out,
        n_train,
        n_val,
        len(summary.classes),
    )
    return SynthSummary(**{**summary.__dict__, "out": out})
