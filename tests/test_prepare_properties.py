"""Property: whatever the annotation files hold, preparing ends in success or a DataError.

Never a KeyError/TypeError/RecursionError from deep inside, and a refused input never leaves
output behind.
"""

from __future__ import annotations

import json
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lcm.data.coco import prepare_coco
from lcm.data.manifest import read_manifest
from lcm.data.prepare import PrepareReport
from lcm.data.voc import VOC_CLASSES, prepare_voc
from lcm.errors import DataError
from tests._prepare_fixtures import coco_doc, tiny_jpeg, voc_xml

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Keys and names that the readers look for, so generated documents reach past the first check.
COCO_KEYS = ["images", "annotations", "categories", "id", "file_name", "width", "height"]
COCO_KEYS += ["image_id", "category_id", "iscrowd", "name"]
FILE_NAMES = ["a.jpg", "sub/b.jpg", "c.jpg", "../a.jpg", "/a.jpg", "C:a.jpg", "", ".", "a\x00"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(FILE_NAMES)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(COCO_KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name in ("a.jpg", "sub/b.jpg", "c.jpg", "d.jpg", "000001.jpg"):
        tiny_jpeg(root / name)
    return root


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """Makes a fresh directory per example (a function-scoped tmp_path is shared by them all)."""
    base = tmp_path_factory.mktemp("examples")
    return lambda: Path(tempfile.mkdtemp(dir=base))


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a tuple of keys/indices (the root is ``()``)."""
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def mutated_coco(draw: st.DrawFn) -> Any:
    """A valid document with a few edits: a deleted key/item, or a value of the wrong type."""
    doc: Any = coco_doc()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(_paths(doc)))
        if not where:
            doc = draw(json_values)
            continue
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(json_values)
    return doc


def _encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


coco_bytes = st.one_of(
    json_values.map(_encode),
    mutated_coco().map(_encode),
    st.binary(max_size=200),
    st.integers(0, 400).map(lambda n: _encode(coco_doc())[:n]),  # truncated
)


def _check_outcome(run, out: Path, named: list[Path]) -> None:
    try:
        report = run()
    except DataError as e:
        event("refused")
        assert any(str(p) in str(e) for p in named), f"error names no input file: {e}"
        assert not out.exists(), "a refused input left output behind"
    else:
        event("prepared")
        assert isinstance(report, PrepareReport)
        assert len(read_manifest(out)) == report.n_images > 0


@SETTINGS
@given(data=coco_bytes)
def test_any_coco_bytes_end_in_success_or_data_error(
    data: bytes, image_dir: Path, scratch: Callable[[], Path]
) -> None:
    base = scratch()
    ann, out = base / "instances.json", base / "out"
    ann.write_bytes(data)
    _check_outcome(lambda: prepare_coco(ann, image_dir, out), out, [ann, image_dir])


def test_deep_nesting_is_a_data_error(tmp_path: Path, image_dir: Path) -> None:
    ann = tmp_path / "deep.json"
    ann.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="not valid JSON"):
        prepare_coco(ann, image_dir, tmp_path / "out")


XML_TAGS = ["annotation", "object", "name", "difficult", "size", "width", "height", "filename"]
XML_TAGS += ["part", "bndbox"]
READ_TAGS = {"annotation", "filename", "size", "width", "height", "object", "name", "difficult"}
xml_texts = st.sampled_from([*VOC_CLASSES, "head", "0", "1", "2", "-1", "x", "", "000001.jpg"])
xml_texts |= st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<&"), max_size=6)


@st.composite
def xml_element(draw: st.DrawFn, depth: int = 0) -> ET.Element:
    """An element of VOC-like tags, nested at random; its text may hold control characters."""
    elem = ET.Element(draw(st.sampled_from(XML_TAGS)))
    if depth >= 3 or draw(st.booleans()):
        elem.text = draw(xml_texts)
    else:
        elem.extend(draw(st.lists(xml_element(depth + 1), max_size=3)))
    return elem


xml_tree = xml_element().map(lambda e: ET.tostring(e, encoding="unicode"))


@st.composite
def mutated_voc(draw: st.DrawFn) -> bytes:
    """A valid annotation with a few elements' text replaced, deleted, or given extra children."""
    root = ET.fromstring(voc_xml("000001.jpg", [("person", 0, ["head"]), ("dog", 1), ("cat", 0)]))
    for _ in range(draw(st.integers(1, 3))):
        parents = {child: parent for parent in root.iter() for child in parent}
        elems = list(root.iter())
        if draw(st.booleans()):  # half the time, one of the elements the reader looks at
            elems = [e for e in elems if e.tag in READ_TAGS]
        target = draw(st.sampled_from(elems))
        op = draw(st.sampled_from(["text", "delete", "insert"]))
        if op == "text":
            target.text = draw(xml_texts)
        elif op == "delete" and target in parents:
            parents[target].remove(target)
        else:
            target.append(draw(xml_element()))
    return ET.tostring(root)


@st.composite
def broken_voc(draw: st.DrawFn) -> bytes:
    """A valid annotation with one line dropped or replaced: mostly not well-formed."""
    lines = voc_xml("000001.jpg", [("person", 0, ["head"]), ("dog", 1)]).split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    if draw(st.booleans()):
        lines[i] = draw(xml_tree)
    else:
        del lines[i]
    return "\n".join(lines).encode()


voc_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    xml_tree.map(str.encode),
    mutated_voc(),
    broken_voc(),
    st.integers(0, 600).map(lambda n: voc_xml("000001.jpg", [("dog", 0)]).encode()[:n]),
)


@SETTINGS
@given(data=voc_bytes)
def test_any_voc_xml_ends_in_success_or_data_error(
    data: bytes, image_dir: Path, scratch: Callable[[], Path]
) -> None:
    root, out = scratch(), scratch() / "out"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").symlink_to(image_dir, target_is_directory=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    xml = root / "Annotations" / "000001.xml"
    xml.write_bytes(data)
    _check_outcome(lambda: prepare_voc(root, "train", out), out, [xml, root])
