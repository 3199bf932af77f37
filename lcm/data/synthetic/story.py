"""The generative story: classes, glyphs, scenes, companion groups, and where objects go."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def category_ids(classes: tuple[SynthClass, ...] = CLASSES) -> dict[str, int]:
    """Class name -> COCO category id (increasing, with COCO's gaps), for any tier's classes."""
    free = (i for i in range(1, 1000) if i not in _COCO_ID_GAPS)
    return {c.name: next(free) for c in classes}


def story_meta() -> dict:
    """What ``synth_meta.json`` records of this tier's story (beside what every tier has)."""
    return {
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
    }


@dataclass(frozen=True)
class Placed:
    """One drawn object: a glyph and its geometry. Deliberately carries no class."""

    glyph: str
    cx: float
    cy: float
    side: float  # px; the glyph fits in the circle of this diameter
    angle: float  # radians
    rgb: tuple[float, float, float]
    shape: str


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two (x0, y0, x1, y1) boxes over the smaller one's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def place_glyphs(
    glyphs: list[str],
    size: int,
    rng: np.random.Generator,
    table: dict[str, Glyph] = GLYPHS,
    regions: list[tuple[float, float]] | None = None,
    placed_before: list[Placed] | None = None,
) -> list[Placed]:
    """Geometry for each glyph, in draw order; a function of the glyphs only, never classes.

    ``regions``: per glyph, the horizontal band (fractions of the width) its centre may take;
    ``placed_before``: glyphs already placed, which the new ones avoid overlapping."""
    scale = size / REFERENCE_SIZE
    placed: list[Placed] = []
    boxes: list[tuple[float, ...]] = [
        (p.cx - p.side / 2, p.cy - p.side / 2, p.cx + p.side / 2, p.cy + p.side / 2)
        for p in placed_before or []
    ]
    for i, key in enumerate(glyphs):
        g = table[key]
        lo, hi = TINY_SIZE if rng.random() < g.tiny_p else g.size
        side = max(2.0, rng.uniform(lo, hi) * scale)
        x_lo, x_hi = (side / 2, size - side / 2)
        if regions is not None:
            a, b = regions[i]
            x_lo, x_hi = max(x_lo, a * size + side / 2), min(x_hi, b * size - side / 2)
        best, best_score = (0.0, 0.0), np.inf
        for _ in range(_PLACE_TRIES):
            if regions is None:
                cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            else:
                cx, cy = rng.uniform(x_lo, x_hi), rng.uniform(side / 2, size - side / 2)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            score = max((_overlap(box, b) for b in boxes), default=0.0)
            if score < best_score:
                best, best_score = (cx, cy), score
            if score <= _MAX_OVERLAP:
                break
        cx, cy = best
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        rgb = tuple(np.clip(np.asarray(g.rgb) + rng.normal(0.0, 10.0, 3), 0, 255).tolist())
        angle = rng.uniform(0, 2 * np.pi)
        placed.append(Placed(key, float(cx), float(cy), side, angle, rgb, g.shape))
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
