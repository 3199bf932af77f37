"""Tiny COCO and VOC datasets built on disk for the prepare-stage tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def tiny_jpeg(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format="JPEG")
    return path


def coco_doc() -> dict[str, Any]:
    """A small valid COCO document with the quirks real files have.

    Category ids have gaps and are listed out of order; image ids have gaps; image 7 has only
    a crowd annotation; image 9 has none; image 3 has two annotations of the same class.
    """
    return {
        "info": {"description": "tiny"},
        "categories": [
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 5, "name": "airplane", "supercategory": "vehicle"},
        ],
        "images": [
            {"id": 3, "file_name": "a.jpg", "width": 8, "height": 6},
            {"id": 7, "file_name": "sub/b.jpg", "width": 10, "height": 4},
            {"id": 9, "file_name": "c.jpg", "width": 5, "height": 5},
            {"id": 12, "file_name": "d.jpg", "width": 8, "height": 6},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 18, "iscrowd": 0, "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 3, "category_id": 90, "iscrowd": 0, "bbox": [0, 0, 1, 1]},
            {"id": 3, "image_id": 3, "category_id": 18, "iscrowd": 0, "bbox": [1, 1, 1, 1]},
            {"id": 4, "image_id": 7, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 2, 2]},
            {"id": 5, "image_id": 12, "category_id": 5, "iscrowd": 0, "bbox": [0, 0, 2, 2]},
            {"id": 6, "image_id": 12, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2]},
        ],
    }


# classes sorted by category id: 1 person, 5 airplane, 18 dog, 90 toothbrush
COCO_CLASSES = ["person", "airplane", "dog", "toothbrush"]
COCO_EXPECTED = {  # key -> (labels, width, height)
    "a": ([2, 3], 8, 6),
    "sub_b": ([0], 10, 4),
    "c": ([], 5, 5),
    "d": ([0, 1], 8, 6),
}


def write_coco(
    base: Path, doc: Any, images: Iterable[str] | None = None
) -> tuple[Path, Path, Path]:
    """Write ``doc`` as the annotation file and tiny JPEGs; returns (annotations, images, out).

    ``images`` defaults to every ``file_name`` in a valid document.
    """
    ann, img_root, out = base / "instances.json", base / "images", base / "out"
    img_root.mkdir(parents=True, exist_ok=True)
    ann.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    if images is None:
        images = [im["file_name"] for im in doc["images"]]
    for name in images:
        tiny_jpeg(img_root / name)
    return ann, img_root, out


def voc_xml(
    filename: str | None,
    objects: Sequence[tuple[str, int] | tuple[str, int, Sequence[str]]] = (),
    size: tuple[int, int] | None = (8, 6),
) -> str:
    """A VOC annotation; each object is (name, difficult) or (name, difficult, part names)."""
    parts = ["<annotation>", "<folder>VOC2007</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height>")
        parts.append("<depth>3</depth></size>")
    for obj in objects:
        name, difficult = obj[0], obj[1]
        part_names = obj[2] if len(obj) > 2 else ()
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose>")
        parts.append(f"<truncated>0</truncated><difficult>{difficult}</difficult>")
        parts.append("<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox>")
        for part in part_names:
            parts.append(f"<part><name>{part}</name><bndbox><xmin>1</xmin></bndbox></part>")
        parts.append("</object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc(
    root: Path,
    annotations: dict[str, str],
    split: str = "train",
    jpegs: Iterable[str] | None = None,
    ids: Sequence[str] | None = None,
) -> Path:
    """Lay out ``root`` as ``VOCdevkit/VOC2007``: split file, XMLs and tiny JPEGs.

    ``annotations`` maps image id -> XML text; ``jpegs`` (file names under JPEGImages)
    defaults to ``<id>.jpg`` for every id; ``ids`` (the split file) defaults to the XML ids.
    """
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(text)
    listed = list(annotations) if ids is None else list(ids)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    for name in [f"{i}.jpg" for i in annotations] if jpegs is None else jpegs:
        tiny_jpeg(root / "JPEGImages" / name)
    return root


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><filename>000001.jpg</filename>
<object><name>&lol9;</name><difficult>0</difficult></object></annotation>
"""


def external_entity_xml(target: Path) -> str:
    return f"""<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{target}">]>
<annotation><filename>000001.jpg</filename>
<object><name>&xxe;</name><difficult>0</difficult></object></annotation>
"""
