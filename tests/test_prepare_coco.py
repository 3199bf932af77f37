"""prepare_coco: labels, classes, missing files, and every way an annotation file can be wrong."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from lcm.data.coco import prepare_coco
from lcm.data.manifest import read_manifest
from lcm.data.prepare import REPORT_FILE, PrepareReport
from lcm.errors import DataError
from tests._prepare_fixtures import COCO_CLASSES, COCO_EXPECTED, coco_doc, tiny_jpeg, write_coco


def _by_key(out: Path) -> dict[str, tuple[list[int], list[int], int, int]]:
    m = read_manifest(out)
    return {r.key: (list(r.labels), list(r.ignore), r.width, r.height) for r in m.records()}


def test_labels_classes_and_sizes_exact(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc())
    report = prepare_coco(ann, images, out)

    assert report == PrepareReport(4, 4, (), images, out)
    assert json.loads((out / "classes.json").read_text()) == COCO_CLASSES
    got = _by_key(out)
    assert got == {k: (lab, [], w, h) for k, (lab, w, h) in COCO_EXPECTED.items()}
    paths = [r.path for r in read_manifest(out).records()]
    assert paths == ["a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"]  # file order, nested path kept
    assert json.loads((out / REPORT_FILE).read_text()) == {
        "n_images": 4,
        "n_classes": 4,
        "n_missing": 0,
        "image_root": str(images),
        "missing": [],
    }
    assert report.summary() == "prepared 4 images, 4 classes"


def test_labels_agree_with_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    ann, images, out = write_coco(tmp_path, coco_doc())
    prepare_coco(ann, images, out)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        coco = COCO(str(ann))
    cat_ids = sorted(coco.getCatIds())
    expected = {}
    for iid in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid], iscrowd=None))
        name = coco.loadImgs([iid])[0]["file_name"]
        expected[name] = sorted({cat_ids.index(a["category_id"]) for a in anns})
    assert {r.path: list(r.labels) for r in read_manifest(out).records()} == expected
    assert [c["name"] for c in coco.loadCats(cat_ids)] == COCO_CLASSES


def test_missing_image_files_are_reported_and_left_out(tmp_path: Path) -> None:
    doc = coco_doc()
    ann, images, out = write_coco(tmp_path, doc, images=["a.jpg", "d.jpg"])
    report = prepare_coco(ann, images, out)

    assert report.n_images == 2
    assert report.missing == ("sub/b.jpg", "c.jpg")
    assert sorted(_by_key(out)) == ["a", "d"]
    assert "2 missing image files left out: sub/b.jpg, c.jpg" in report.summary()
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["missing"] == ["sub/b.jpg", "c.jpg"] and saved["n_missing"] == 2


def test_summary_lists_the_first_few_and_counts_the_rest(tmp_path: Path) -> None:
    doc = coco_doc()
    doc["images"] = [{"id": i, "file_name": f"m{i}.jpg"} for i in range(8)] + [
        {"id": 100, "file_name": "here.jpg"}
    ]
    doc["annotations"] = []
    ann, images, out = write_coco(tmp_path, doc, images=["here.jpg"])
    report = prepare_coco(ann, images, out)
    assert report.summary().startswith(
        "prepared 1 images, 4 classes; 8 missing image files left out: "
        "m0.jpg, m1.jpg, m2.jpg, m3.jpg, m4.jpg ... (+3 more)"
    )
    assert len(json.loads((out / REPORT_FILE).read_text())["missing"]) == 8
    assert _by_key(out) == {"here": ([], [], 0, 0)}  # no size in the JSON -> 0


def test_no_image_found_at_all_is_an_error(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc(), images=[])
    with pytest.raises(DataError, match="none of the 4 images"):
        prepare_coco(ann, images, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["annotations"].append({"image_id": 999, "category_id": 1}), "image id 999"),
        (
            lambda d: d["annotations"].append({"image_id": 3, "category_id": 2}),
            r"annotations\[6\]\.category_id: category id 2",
        ),
        (lambda d: d["images"].append({"id": 3, "file_name": "z.jpg"}), "duplicate image id 3"),
        (lambda d: d["categories"].append({"id": 5, "name": "x"}), "duplicate category id 5"),
    ],
    ids=["unknown-image", "unknown-category", "dup-image", "dup-category"],
)
def test_inconsistent_ids_are_errors(tmp_path: Path, mutate, needle: str) -> None:
    doc = coco_doc()
    mutate(doc)
    ann, images, out = write_coco(tmp_path, doc, images=["a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"])
    with pytest.raises(DataError, match=needle) as info:
        prepare_coco(ann, images, out)
    assert str(ann) in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "name", ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "C:\\x.jpg", "c:/x.jpg", "..\\x.jpg"]
)
def test_file_names_escaping_the_image_root_are_refused(tmp_path: Path, name: str) -> None:
    doc = coco_doc()
    doc["images"][1]["file_name"] = name
    ann, images, out = write_coco(tmp_path, doc, images=["a.jpg", "c.jpg", "d.jpg"])
    tiny_jpeg(tmp_path / "x.jpg")  # the escape target exists: refusal is not "file missing"
    with pytest.raises(DataError, match="escapes the image root") as info:
        prepare_coco(ann, images, out)
    assert repr(name) in str(info.value) and str(ann) in str(info.value)
    assert not out.exists()


def test_symlink_out_of_the_image_root_is_refused(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc(), images=["a.jpg", "sub/b.jpg", "d.jpg"])
    outside = tiny_jpeg(tmp_path / "elsewhere" / "secret.jpg")
    os.symlink(outside, images / "c.jpg")
    with pytest.raises(DataError, match="outside the image root"):
        prepare_coco(ann, images, out)
    assert not out.exists()


def test_symlink_inside_the_image_root_is_followed(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc(), images=["a.jpg", "sub/b.jpg", "d.jpg"])
    os.symlink(images / "a.jpg", images / "c.jpg")
    assert prepare_coco(ann, images, out).n_images == 4


def test_file_names_mapping_to_one_key_are_an_error(tmp_path: Path) -> None:
    doc = coco_doc()
    doc["images"][2]["file_name"] = "a.png"  # same key "a" as a.jpg
    ann, images, out = write_coco(tmp_path, doc)
    with pytest.raises(DataError, match="same sample key 'a'"):
        prepare_coco(ann, images, out)
    doc["images"][2]["file_name"] = "a.jpg"
    ann, images, out = write_coco(tmp_path, doc)
    with pytest.raises(DataError, match="'a.jpg' is listed more than once"):
        prepare_coco(ann, images, out)
    assert not out.exists()


def _set(path: list, value):
    def mutate(d):
        target = d
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value

    return mutate


def _delete(path: list):
    def mutate(d):
        target = d
        for k in path[:-1]:
            target = target[k]
        del target[path[-1]]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (_set(["images"], "a.jpg"), "images: expected a list, got a string"),
        (_delete(["annotations"]), "top level: missing key 'annotations'"),
        (_delete(["categories"]), "top level: missing key 'categories'"),
        (_set(["categories"], []), "categories: no categories listed"),
        (_set(["images", 0, "id"], True), r"images\[0\]\.id: expected an integer, got a boolean"),
        (_set(["images", 1, "id"], 7.0), r"images\[1\]\.id: expected an integer, got float"),
        (_set(["images", 1, "id"], "7"), r"images\[1\]\.id: expected an integer, got a string"),
        (_set(["images", 2], [9, "c.jpg"]), r"images\[2\]: expected an object, got a list"),
        (_delete(["images", 2, "file_name"]), r"images\[2\]: missing key 'file_name'"),
        (_set(["images", 2, "file_name"], 5), r"images\[2\]\.file_name: expected a string"),
        (_set(["images", 2, "file_name"], ""), "invalid image file name ''"),
        (_set(["images", 2, "file_name"], "\udcff.jpg"), "is not valid UTF-8 text"),
        (_set(["images", 0, "width"], -1), r"images\[0\]\.width: -1 is out of range"),
        (_set(["images", 0, "height"], 2**40), r"images\[0\]\.height: \d+ is out of range"),
        (
            _set(["images", 0, "height"], None),
            r"images\[0\]\.height: expected an integer, got null",
        ),
        (
            _delete(["annotations", 4, "category_id"]),
            r"annotations\[4\]: missing key 'category_id'",
        ),
        (_set(["annotations", 0, "image_id"], [3]), r"annotations\[0\]\.image_id: expected an int"),
        (
            _set(["categories", 1, "name"], None),
            r"categories\[1\]\.name: expected a string, got null",
        ),
        (_set(["categories", 1], "person"), r"categories\[1\]: expected an object, got a string"),
    ],
)
def test_wrong_types_and_missing_keys_name_the_json_path(
    tmp_path: Path, mutate, where: str
) -> None:
    doc = coco_doc()
    mutate(doc)
    ann, images, out = write_coco(tmp_path, doc, images=["a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"])
    with pytest.raises(DataError, match=where) as info:
        prepare_coco(ann, images, out)
    assert str(info.value).startswith(f"{ann}: ")
    assert not out.exists()


@pytest.mark.parametrize(
    "text",
    ["", "{", "[1, 2]", '"images"', "null", '{"images": [}', b'{"images": "\xff"}'],
    ids=["empty", "truncated", "list", "string", "null", "syntax", "bad-utf8"],
)
def test_not_a_coco_document(tmp_path: Path, text: str | bytes) -> None:
    ann, images, out = write_coco(tmp_path, "", images=[])
    if isinstance(text, bytes):
        ann.write_bytes(text)
    else:
        ann.write_text(text)
    with pytest.raises(DataError, match="not valid JSON|top level: expected an object") as info:
        prepare_coco(ann, images, out)
    assert str(ann) in str(info.value)


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc())
    with pytest.raises(DataError, match="annotation file not found"):
        prepare_coco(tmp_path / "nope.json", images, out)
    with pytest.raises(DataError, match=f"{tmp_path / 'no-images'}: image directory not found"):
        prepare_coco(ann, tmp_path / "no-images", out)


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path: Path) -> None:
    ann, images, out = write_coco(tmp_path, coco_doc())
    prepare_coco(ann, images, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = coco_doc()
    bad["annotations"].append({"image_id": 4242, "category_id": 1})
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="4242"):
        prepare_coco(ann, images, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
