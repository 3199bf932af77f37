"""Prepare stage for PASCAL VOC (``VOCdevkit/VOC2007`` layout) -> manifest + classes.

Image ids come from ``ImageSets/Main/<split>.txt``; each id's ``Annotations/<id>.xml`` gives
its objects. Labels follow the VOC evaluation convention: a class present only as
``difficult`` objects is neither positive nor negative (it goes to ``ignore``, target -1);
a class with at least one non-difficult object is positive. Only top-level ``object/name``
elements are classes: a person's ``part`` elements (head, hand, foot) carry ``name`` too.

The XML is parsed with defusedxml with DTDs forbidden, so entity expansion bombs and external
entities are refused before any expansion happens.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET

from lcm.data.manifest import ImageRecord, make_key, resolve_image, safe_relpath
from lcm.data.prepare import (
    PrepareReport,
    check_image_root,
    check_split_name,
    read_annotation,
    write_prepared,
)
from lcm.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
_UINT = re.compile(r"[0-9]+")
_MAX_SIDE = 2**31 - 1  # the manifest stores width/height as int32


def _inside(root: Path, relpath: str) -> Path:
    """``root / relpath``, refusing a symlink that leads out of the dataset root."""
    try:
        return resolve_image(root, relpath)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise DataError(f"{root / relpath}: cannot resolve the path ({e})") from e


def _read_ids(root: Path, split: str) -> list[str]:
    rel = f"ImageSets/Main/{check_split_name(root, split)}.txt"
    path = _inside(root, rel)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{root / rel}: split file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{root / rel}: cannot read the split file ({e})") from e
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) > 1:
            raise DataError(f"{root / rel}:{lineno}: expected one image id per line, got {line!r}")
        image_id = tokens[0]
        if "/" in image_id or "\\" in image_id or ".." in image_id or "\x00" in image_id:
            raise DataError(
                f"{root / rel}:{lineno}: image id {image_id!r} contains a path separator or '..'"
            )
        if image_id in seen:
            raise DataError(f"{root / rel}:{lineno}: image id {image_id!r} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids


def _parse_xml(path: Path) -> ET.Element:
    data = read_annotation(path)
    try:
        root = SafeET.fromstring(data, forbid_dtd=True)
    except defusedxml.DefusedXmlException as e:
        raise DataError(
            f"{path}: refused: the XML uses a DTD or entities, which VOC annotations never "
            f"need ({type(e).__name__})"
        ) from e
    except ET.ParseError as e:
        raise DataError(f"{path}: not well-formed XML ({e})") from e
    if root.tag != "annotation":
        raise DataError(f"{path}: expected an <annotation> root element, got <{root.tag}>")
    return root


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "").strip() if elem is not None else ""


def _uint(elem: ET.Element | None, path: Path, where: str, hi: int) -> int:
    """A non-negative integer element; an absent or empty element counts as 0."""
    text = _text(elem)
    if not text:
        return 0
    # the length check keeps int() away from digit strings too long to convert
    if not _UINT.fullmatch(text) or len(text) > len(str(hi)) or int(text) > hi:
        raise DataError(f"{path}: <{where}> must be an integer in [0, {hi}], got {text!r}")
    return int(text)


def _labels(root: ET.Element, path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(positive, ignore) class indices from the top-level objects."""
    positive: set[int] = set()
    difficult_only: set[int] = set()
    # findall("object") only looks at direct children, so part/name never counts.
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj.find("name"))
        if not name:
            raise DataError(f"{path}: object #{k} has no <name>")
        if name not in _CLASS_INDEX:
            raise DataError(
                f"{path}: object #{k} has unknown class {name!r}; "
                "expected one of the 20 VOC classes"
            )
        cls = _CLASS_INDEX[name]
        if _uint(obj.find("difficult"), path, "object/difficult", 1):
            difficult_only.add(cls)
        else:
            positive.add(cls)
    return tuple(sorted(positive)), tuple(sorted(difficult_only - positive))


def _record(root: Path, image_id: str) -> ImageRecord:
    path = _inside(root, f"Annotations/{image_id}.xml")
    xml = _parse_xml(path)
    filename = _text(xml.find("filename"))
    relpath = safe_relpath(filename, path) if filename else f"{image_id}.jpg"
    size = xml.find("size")
    width = _uint(size.find("width") if size is not None else None, path, "size/width", _MAX_SIDE)
    height = _uint(
        size.find("height") if size is not None else None, path, "size/height", _MAX_SIDE
    )
    labels, ignore = _labels(xml, path)
    return ImageRecord(make_key(relpath), relpath, labels, ignore, width, height)


def prepare_voc(root: Path, split: str, out: Path, images: Path | None = None) -> PrepareReport:
    """Turn one split of a VOC dataset (``root`` = e.g. ``VOCdevkit/VOC2007``) into ``out``.

    Manifest paths are relative to ``images`` (default ``root / "JPEGImages"``; the report's
    ``image_root``). A listed id without its XML is an error; one without its JPEG is left out
    and reported.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{root}: VOC dataset directory not found")
    image_root = Path(images) if images is not None else root / "JPEGImages"
    check_image_root(image_root)
    ids = _read_ids(root, split)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    candidates = [_record(root, image_id) for image_id in ids]
    return write_prepared(out, VOC_CLASSES, candidates, image_root, split_file)
