"""The interaction tier: which look-alike a glyph is depends on a non-additive combination of
two context anchors (``lcm data synth --tier interaction``; the README's dataset card).

- Four *anchors*, each present in an image with probability 0.5, independently.
- Four *look-alike pairs*; each pair's glyph is present with probability 0.5. When it is, the
  object is member A if **exactly one** of the pair's two anchors is present, member B if both
  or neither are (an XOR). Pair k reads anchors k and k+1 (mod 4), so every anchor serves two
  pairs.
- Anchors are drawn in one half of the image (left or right, drawn per image) and glyphs in
  the other, so a model must relate distant positions; images default to 128 px, which a
  ResNet-18 turns into a 4 x 4 final map.

Because the anchors are independent coin flips, each anchor alone carries no information
about the member (its correlation with the XOR is exactly zero): a model additive in the
labels or glyph counts cannot beat the coin flip on the pair members, while any model that
combines the two anchors can reach AP 1. ``lcm data ceilings`` measures both.
"""

from __future__ import annotations

import numpy as np

from lcm.data.synthetic import story
from lcm.data.synthetic.story import (
    Glyph,
    Placed,
    Scene,
    SynthClass,
    place_glyphs,
)

DEFAULT_SIZE = 128
ANCHOR_P = 0.5
GLYPH_P = 0.5
TINT = (140.0, 138.0, 134.0)
SCENE = Scene("interaction", TINT, ())  # type: ignore[arg-type]  # no companion groups

_ANCHOR, _LOOK = (15.0, 22.0), (12.0, 18.0)  # side ranges in px at 96 px
GLYPHS: dict[str, Glyph] = {
    "orange hexagon": Glyph("hexagon", "orange", _ANCHOR),
    "blue frame": Glyph("frame", "blue", _ANCHOR),
    "magenta star": Glyph("star", "magenta", _ANCHOR),
    "black frame": Glyph("frame", "black", _ANCHOR),
    "teal ring": Glyph("ring", "teal", _LOOK),
    "yellow disc": Glyph("disc", "yellow", _LOOK),
    "white pill": Glyph("pill", "white", _LOOK),
    "brown bar": Glyph("bar", "brown", _LOOK),
}
ANCHORS: tuple[tuple[str, str], ...] = (
    ("kettle", "orange hexagon"), ("car", "blue frame"),
    ("flower", "magenta star"), ("monitor", "black frame"),
)  # fmt: skip
# (member A: exactly one anchor present, member B: both or neither), glyph, anchor indices
PAIRS: tuple[tuple[tuple[str, str], str, tuple[int, int]], ...] = (
    (("cup", "tyre"), "teal ring", (0, 1)),
    (("lemon", "ball"), "yellow disc", (1, 2)),
    (("mouse", "stapler"), "white pill", (2, 3)),
    (("bread", "plank"), "brown bar", (3, 0)),
)

CLASSES: tuple[SynthClass, ...] = (
    *(SynthClass(name, glyph, "anchor") for name, glyph in ANCHORS),
    *(SynthClass(m, glyph, "lookalike") for members, glyph, _ in PAIRS for m in members),
)
LOOKALIKE_PAIRS: tuple[tuple[str, str], ...] = tuple(members for members, _, _ in PAIRS)
TINY_CLASSES: tuple[str, ...] = ()


def category_ids() -> dict[str, int]:
    return story.category_ids(CLASSES)


def member(pair: int, anchors_present: np.ndarray) -> str:
    """The class of pair ``pair``'s glyph given which anchors are present (the XOR rule)."""
    (a, b), _, (i, j) = PAIRS[pair]
    return a if bool(anchors_present[i]) != bool(anchors_present[j]) else b


def sample_image(rng: np.random.Generator, size: int) -> tuple[Scene, list[str], list[Placed]]:
    """Scene, classes in draw order, and their placed glyphs for one image."""
    present = rng.random(len(ANCHORS)) < ANCHOR_P
    shown = rng.random(len(PAIRS)) < GLYPH_P
    anchors = [ANCHORS[i][0] for i in np.flatnonzero(present)]
    members = [member(k, present) for k in np.flatnonzero(shown)]
    left = rng.random() < 0.5  # the anchors' half
    near, far = ((0.0, 0.5), (0.5, 1.0)) if left else ((0.5, 1.0), (0.0, 0.5))
    glyph = {c.name: c.glyph for c in CLASSES}
    placed = place_glyphs([glyph[a] for a in anchors], size, rng, GLYPHS, [near] * len(anchors))
    placed += place_glyphs(
        [glyph[m] for m in members], size, rng, GLYPHS, [far] * len(members), placed
    )
    return SCENE, anchors + members, placed


def story_meta() -> dict:
    """What ``synth_meta.json`` records of this tier's story."""
    return {
        "tier": "interaction",
        "scenes": [{"name": SCENE.name, "tint": list(TINT), "groups": []}],
        "generic": [],
        "rules": [
            {
                "classes": list(members),
                "glyph": glyph,
                "anchors": [ANCHORS[i][0] for i in anchors],
                "rule": f"{members[0]} when exactly one anchor is present, else {members[1]}",
            }
            for members, glyph, anchors in PAIRS
        ],
        "anchor_p": ANCHOR_P,
        "glyph_p": GLYPH_P,
    }
