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
scene, the arguments) so :mod:`lcm.data.synthetic.ceilings` and later studies can name them.
"""

from lcm.data.synthetic.render import render_image
from lcm.data.synthetic.story import (
    CLASSES,
    GLYPHS,
    LOOKALIKE_PAIRS,
    SCENES,
    TINY_CLASSES,
    category_ids,
    glyph_of,
    place_glyphs,
    sample_image,
)
from lcm.data.synthetic.write import META_FILE, SPLITS, generate_synthetic

__all__ = [
    "CLASSES",
    "GLYPHS",
    "LOOKALIKE_PAIRS",
    "META_FILE",
    "SCENES",
    "SPLITS",
    "TINY_CLASSES",
    "category_ids",
    "generate_synthetic",
    "glyph_of",
    "place_glyphs",
    "render_image",
    "sample_image",
]
