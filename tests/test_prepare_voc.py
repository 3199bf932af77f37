"""prepare_voc: difficult objects, person parts, hostile XML and broken dataset layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lcm.data.manifest import read_manifest
from lcm.data.prepare import REPORT_FILE
from lcm.data.voc import VOC_CLASSES, prepare_voc
from lcm.errors import DataError
from tests._prepare_fixtures import BILLION_LAUGHS, external_entity_xml, voc_xml, write_voc

C = {name: i for i, name in enumerate(VOC_CLASSES)}


def _by_key(out: Path) -> dict[str, tuple[list[int], list[int], int, int]]:
    m = read_manifest(out)
    return {r.key: (list(r.labels), list(r.ignore), r.width, r.height) for r in m.records()}


def _dataset(root: Path) -> Path:
    return write_voc(
        root,
        {
            # parts carry <name> too (head, hand): they must not become classes or errors
            "000001": voc_xml("000001.jpg", [("person", 0, ["head", "hand"]), ("dog", 0)]),
            "000002": voc_xml("000002.jpg", [("cat", 1)], size=(10, 4)),  # difficult only
            # car both difficult and not -> positive; bottle difficult only -> ignore
            "000003": voc_xml("000003.jpg", [("car", 1), ("bottle", 1), ("car", 0)]),
            "000004": voc_xml("000004.jpg", [], size=None),  # no objects, no size
            "000005": voc_xml(None, [("tvmonitor", 0), ("tvmonitor", 0)]),  # no <filename>
        },
    )


def test_standard_classes_in_standard_order() -> None:
    assert VOC_CLASSES == (
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor",
    )  # fmt: skip


def test_labels_and_ignore_exact(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    out = tmp_path / "out"
    report = prepare_voc(root, "train", out)

    assert (report.n_images, report.n_classes, report.missing) == (5, 20, ())
    assert report.image_root == root / "JPEGImages"
    assert json.loads((out / "classes.json").read_text()) == list(VOC_CLASSES)
    assert _by_key(out) == {
        "000001": (sorted([C["person"], C["dog"]]), [], 8, 6),
        "000002": ([], [C["cat"]], 10, 4),
        "000003": ([C["car"]], [C["bottle"]], 8, 6),
        "000004": ([], [], 0, 0),
        "000005": ([C["tvmonitor"]], [], 8, 6),
    }
    targets = read_manifest(out).targets()
    assert targets[1, C["cat"]] == -1 and targets[1, C["dog"]] == 0
    assert [r.path for r in read_manifest(out).records()] == [f"00000{i}.jpg" for i in range(1, 6)]


def test_filename_from_the_xml_is_used(tmp_path: Path) -> None:
    root = write_voc(
        tmp_path / "VOC",
        {"img_7": voc_xml("photos/seven.jpeg", [("bus", 0)])},
        jpegs=["photos/seven.jpeg"],
    )
    prepare_voc(root, "train", tmp_path / "out")
    (rec,) = read_manifest(tmp_path / "out").records()
    assert (rec.key, rec.path, rec.labels) == ("photos_seven", "photos/seven.jpeg", (C["bus"],))


def test_missing_jpeg_is_reported_and_left_out(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    (root / "JPEGImages" / "000002.jpg").unlink()
    (root / "JPEGImages" / "000004.jpg").unlink()
    out = tmp_path / "out"
    report = prepare_voc(root, "train", out)
    assert report.n_images == 3 and report.missing == ("000002.jpg", "000004.jpg")
    assert sorted(_by_key(out)) == ["000001", "000003", "000005"]
    assert json.loads((out / REPORT_FILE).read_text())["missing"] == ["000002.jpg", "000004.jpg"]
    assert "2 missing image files left out: 000002.jpg, 000004.jpg" in report.summary()


def test_split_file_order_and_subset(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000003\n\n  000001  \n")
    prepare_voc(root, "val", tmp_path / "out")
    assert [r.key for r in read_manifest(tmp_path / "out").records()] == ["000003", "000001"]


@pytest.mark.parametrize(
    ("xml", "needle"),
    [
        (BILLION_LAUGHS, "refused: the XML uses a DTD or entities"),
        (None, "refused: the XML uses a DTD or entities"),  # external entity, built below
        ('<!DOCTYPE annotation SYSTEM "http://x/a.dtd"><annotation/>', "refused"),
        ("<annotation><object><name>dog</name>", "not well-formed XML"),
        ("", "not well-formed XML"),
        ("<root><object><name>dog</name></object></root>", "expected an <annotation> root"),
        (voc_xml("000001.jpg", [("unicorn", 0)]), "unknown class 'unicorn'"),
        (voc_xml("000001.jpg", [("Dog", 0)]), "unknown class 'Dog'"),
        ("<annotation><object><difficult>0</difficult></object></annotation>", "has no <name>"),
        (voc_xml("000001.jpg", [("dog", 2)]), r"<object/difficult> must be an integer in \[0, 1\]"),
        (voc_xml("000001.jpg", [("dog", "yes")]), "<object/difficult> must be an integer"),
        (voc_xml("000001.jpg", size=("5.5", 3)), "<size/width> must be an integer"),
        (voc_xml("000001.jpg", size=(3, "9" * 5000)), "<size/height> must be an integer"),
        (voc_xml("../000001.jpg", [("dog", 0)]), "escapes the image root"),
        (voc_xml("/etc/000001.jpg", [("dog", 0)]), "escapes the image root"),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "external-dtd",
        "truncated",
        "empty",
        "wrong-root",
        "unknown-class",
        "class-case",
        "no-name",
        "difficult-2",
        "difficult-text",
        "float-size",
        "huge-size",
        "filename-parent",
        "filename-absolute",
    ],  # fmt: skip
)
def test_bad_annotation_is_refused_naming_the_file(
    tmp_path: Path, xml: str | None, needle: str
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    text = external_entity_xml(secret) if xml is None else xml
    root = write_voc(tmp_path / "VOC", {"000001": text})
    out = tmp_path / "out"
    with pytest.raises(DataError, match=needle) as info:
        prepare_voc(root, "train", out)
    assert str(root / "Annotations" / "000001.xml") in str(info.value)
    assert "TOP-SECRET" not in str(info.value)
    assert not out.exists()


def test_missing_xml_for_a_listed_id_is_an_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    (root / "Annotations" / "000003.xml").unlink()
    with pytest.raises(DataError, match="annotation file not found") as info:
        prepare_voc(root, "train", tmp_path / "out")
    assert str(root / "Annotations" / "000003.xml") in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("../000001", "path separator or '..'"),
        ("sub/000001", "path separator or '..'"),
        ("sub\\000001", "path separator or '..'"),
        ("000001 1", "one image id per line"),
        ("000001\n000001", "listed twice"),
    ],
)
def test_bad_split_file_lines(tmp_path: Path, line: str, needle: str) -> None:
    root = _dataset(tmp_path / "VOC2007")
    split_file = root / "ImageSets" / "Main" / "train.txt"
    split_file.write_text(line + "\n")
    with pytest.raises(DataError, match=needle) as info:
        prepare_voc(root, "train", tmp_path / "out")
    assert str(split_file) in str(info.value)


def test_bad_layouts(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="split file not found"):
        prepare_voc(root, "trainval", out)
    with pytest.raises(DataError, match="invalid split name"):
        prepare_voc(root, "../train", out)
    with pytest.raises(DataError, match="VOC dataset directory not found"):
        prepare_voc(tmp_path / "nowhere", "train", out)
    (root / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no images"):
        prepare_voc(root, "empty", out)
    for p in (root / "JPEGImages").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="none of the 5 images"):
        prepare_voc(root, "train", out)
    (root / "JPEGImages").rmdir()
    with pytest.raises(DataError, match="image directory not found"):
        prepare_voc(root, "train", out)
    assert not out.exists()


def test_annotation_symlinked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "VOC2007")
    outside = tmp_path / "elsewhere.xml"
    outside.write_text(voc_xml("000002.jpg", [("cat", 0)]))
    (root / "Annotations" / "000002.xml").unlink()
    os.symlink(outside, root / "Annotations" / "000002.xml")
    with pytest.raises(DataError, match="outside"):
        prepare_voc(root, "train", tmp_path / "out")
