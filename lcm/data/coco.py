"""Prepare stage for COCO-format annotations (``instances_*.json``) -> manifest + classes.

The JSON is read with the standard library and checked field by field, so a malformed file
ends in a :class:`DataError` naming the file and the JSON path of the problem (for example
``annotations[17].category_id``) instead of an assertion or a bare ``KeyError``.

Labels: an image's positives are the classes of all its annotations, crowd regions included
(a crowd of people still shows people). Images without annotations stay, all negative. The
class index is the rank of the category id among the sorted ids, so COCO's gaps (ids 1..90
for 80 classes) and the order of ``categories`` in the file do not matter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm.data.manifest import ImageRecord, make_key, safe_relpath
from lcm.data.prepare import (
    PrepareReport,
    check_image_root,
    check_split_name,
    read_annotation,
    write_prepared,
)
from lcm.errors import DataError

_MAX_SIDE = 2**31 - 1  # the manifest stores width/height as int32


class _Json:
    """Typed access to a parsed JSON document; every failure names the file and JSON path."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> DataError:
        return DataError(f"{self.source}: {where}: {problem}")

    def field(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing key {key!r}")
        return obj[key]

    def as_obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {_kind(value)}")
        return value

    def as_list(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {_kind(value)}")
        return value

    def as_int(self, value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
        # bool is an int subclass in Python, but `true` is never a valid id or size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_kind(value)} {_short(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(where, f"{value} is out of range [{lo}, {hi}]")
        return value

    def as_str(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {_kind(value)} {_short(value)}")
        return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _load(annotations: Path) -> Any:
    data = read_annotation(annotations)
    try:
        return json.loads(data)
    # ValueError covers JSONDecodeError, bad UTF-8 and integers too long to convert;
    # RecursionError a document nested deeper than the parser's stack.
    except (ValueError, RecursionError) as e:
        raise DataError(f"{annotations}: not valid JSON ({e})") from e


def _categories(j: _Json, doc: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """Category id -> class index (rank of the id), and class names in index order."""
    names: dict[int, str] = {}
    for i, raw in enumerate(j.as_list(j.field(doc, "categories", "top level"), "categories")):
        where = f"categories[{i}]"
        cat = j.as_obj(raw, where)
        cid = j.as_int(j.field(cat, "id", where), f"{where}.id")
        name = j.as_str(j.field(cat, "name", where), f"{where}.name")
        if cid in names:
            raise j.fail(f"{where}.id", f"duplicate category id {cid}")
        names[cid] = name
    if not names:
        raise j.fail("categories", "no categories listed")
    ids = sorted(names)
    return {cid: rank for rank, cid in enumerate(ids)}, [names[cid] for cid in ids]


def _images(j: _Json, doc: dict[str, Any]) -> dict[int, tuple[str, int, int]]:
    """Image id -> (relative path, width, height), in file order."""
    images: dict[int, tuple[str, int, int]] = {}
    for i, raw in enumerate(j.as_list(j.field(doc, "images", "top level"), "images")):
        where = f"images[{i}]"
        img = j.as_obj(raw, where)
        iid = j.as_int(j.field(img, "id", where), f"{where}.id")
        name = j.as_str(j.field(img, "file_name", where), f"{where}.file_name")
        size = [j.as_int(img.get(k, 0), f"{where}.{k}", 0, _MAX_SIDE) for k in ("width", "height")]
        if iid in images:
            raise j.fail(f"{where}.id", f"duplicate image id {iid}")
        path = safe_relpath(name, f"{j.source}: {where}.file_name")
        images[iid] = (path, size[0], size[1])
    return images


def _positives(
    j: _Json, doc: dict[str, Any], images: dict[int, Any], class_of: dict[int, int]
) -> dict[int, set[int]]:
    """Image id -> positive class indices, from every annotation (crowd ones included)."""
    positives: dict[int, set[int]] = {iid: set() for iid in images}
    for i, raw in enumerate(j.as_list(j.field(doc, "annotations", "top level"), "annotations")):
        where = f"annotations[{i}]"
        ann = j.as_obj(raw, where)
        iid = j.as_int(j.field(ann, "image_id", where), f"{where}.image_id")
        cid = j.as_int(j.field(ann, "category_id", where), f"{where}.category_id")
        if iid not in positives:
            raise j.fail(f"{where}.image_id", f"image id {iid} is not listed under 'images'")
        if cid not in class_of:
            raise j.fail(
                f"{where}.category_id", f"category id {cid} is not listed under 'categories'"
            )
        positives[iid].add(class_of[cid])
    return positives


def coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """(annotations file, image directory) of ``split`` in a COCO-layout root:
    ``annotations/instances_<split>.json`` and ``images/<split>/``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: COCO dataset directory not found")
    split = check_split_name(root, split)
    return root / "annotations" / f"instances_{split}.json", root / "images" / split


def prepare_coco(annotations: Path, images: Path, out: Path) -> PrepareReport:
    """Turn a COCO ``instances_*.json`` and its image directory into a prepared split in ``out``.

    Image files named by the annotations but absent from ``images`` are left out and listed in
    the report; everything else that is wrong raises :class:`DataError` before ``out`` is
    touched.
    """
    annotations, images, out = Path(annotations), Path(images), Path(out)
    check_image_root(images)
    j = _Json(annotations)
    doc = j.as_obj(_load(annotations), "top level")
    class_of, classes = _categories(j, doc)
    entries = _images(j, doc)
    positives = _positives(j, doc, entries, class_of)
    candidates = [
        ImageRecord(make_key(path), path, tuple(sorted(positives[iid])), (), width, height)
        for iid, (path, width, height) in entries.items()
    ]
    return write_prepared(out, classes, candidates, images, annotations)
