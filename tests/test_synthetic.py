"""The synthetic benchmark: COCO layout, determinism, atomic writes and its generative story."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from lcm.data.synthetic import (
    CLASSES,
    GLYPHS,
    LOOKALIKE_PAIRS,
    SCENES,
    TINY_CLASSES,
    generate_synthetic,
    glyph_of,
    place_glyphs,
    render_image,
)
from lcm.data.synthetic.ceilings import (
    CeilingRow,
    format_ceilings_table,
    measure_background_cue,
    measure_ceilings,
)
from lcm.errors import ConfigError, DataError

SMALL = {"n_train": 200, "n_val": 100, "size": 64, "seed": 3}
SPLITS = ("train", "val")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "synth"
    generate_synthetic(out, **SMALL, workers=1)
    return out


@pytest.fixture(scope="module")
def moderate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moderate") / "synth"
    generate_synthetic(out, n_train=1500, n_val=600, size=48, seed=11, workers=2)
    return out


def test_layout_and_coco_schema(small: Path) -> None:
    assert sorted(p.name for p in (small / "annotations").iterdir()) == [
        "instances_train.json",
        "instances_val.json",
        "synth_meta.json",
    ]
    for split in SPLITS:
        doc = _coco(small, split)
        assert {"images", "annotations", "categories"} <= doc.keys()
        for im in doc["images"]:
            assert set(im) == {"id", "file_name", "width", "height"}
            with Image.open(small / "images" / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"]) == (64, 64)
        for ann in doc["annotations"]:
            assert set(ann) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
            assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4
        files = sorted(p.name for p in (small / "images" / split).iterdir())
        assert files == sorted(im["file_name"] for im in doc["images"])
        coco = COCO(str(small / "annotations" / f"instances_{split}.json"))  # the reference reader
        assert len(coco.getImgIds()) == SMALL[f"n_{split}"]
    cats = _coco(small, "train")["categories"]
    ids = [c["id"] for c in cats]
    assert len(cats) == len(CLASSES) >= 20
    assert ids == sorted(set(ids)) and ids[-1] > len(ids)  # increasing, with gaps like COCO's
    assert {c["supercategory"] for c in cats} == {
        "anchor",
        "lookalike",
        "tiny",
        "member",
        "generic",
    }


def test_counts_ids_and_meta(small: Path) -> None:
    train, val = _coco(small, "train"), _coco(small, "val")
    assert (len(train["images"]), len(val["images"])) == (200, 100)
    image_ids = [im["id"] for doc in (train, val) for im in doc["images"]]
    ann_ids = [a["id"] for doc in (train, val) for a in doc["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    meta = json.loads((small / "annotations" / "synth_meta.json").read_text())
    assert meta["args"] == SMALL
    assert len(meta["scenes"]) >= 5
    assert [p["classes"] for p in meta["lookalike_pairs"]] == [list(p) for p in LOOKALIKE_PAIRS]
    assert meta["tiny_classes"] == list(TINY_CLASSES) and len(TINY_CLASSES) >= 1
    by_role = {c["name"]: c["supercategory"] for c in train["categories"]}
    assert all(by_role[n] == "lookalike" for p in LOOKALIKE_PAIRS for n in p)
    assert all(by_role[n] == "tiny" for n in TINY_CLASSES)
    for split, doc in (("train", train), ("val", val)):
        scenes = meta["image_scenes"][split]
        assert sorted(scenes) == sorted(str(im["id"]) for im in doc["images"])
        assert set(scenes.values()) <= {s.name for s in SCENES}


def test_boxes_inside_images_and_object_counts(small: Path) -> None:
    for split in SPLITS:
        doc = _coco(small, split)
        size = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = size[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= width and y + h <= height
            assert 0 < ann["area"] <= w * h
        per_image = Counter(a["image_id"] for a in doc["annotations"])
        counts = [per_image[i] for i in size]
        assert min(counts) >= 1 and max(counts) <= 6
        assert len(set(counts)) >= 4  # a spread of busy and sparse images


def test_tiny_classes_are_mostly_tiny(small: Path) -> None:
    doc = _coco(small, "train")
    tiny_ids = {c["id"] for c in doc["categories"] if c["name"] in TINY_CLASSES}
    sides = [max(a["bbox"][2:]) for a in doc["annotations"] if a["category_id"] in tiny_ids]
    limit = 7 * 64 / 96  # 3-6 px at 96 px, plus a pixel of anti-aliasing
    assert len(sides) > 20 and np.mean(np.asarray(sides) <= limit) > 0.6


def test_same_arguments_same_bytes_whatever_the_workers(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_synthetic(again, **SMALL, workers=2)
    assert _tree_bytes(again) == _tree_bytes(small)
    other = tmp_path / "other"
    generate_synthetic(other, **{**SMALL, "seed": 4}, workers=1)
    a, b = _tree_bytes(other), _tree_bytes(small)
    assert a.keys() == b.keys()
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert sum(a[k] != b[k] for k in a if k.endswith(".jpg")) > 250


def test_glyph_table_makes_only_the_pairs_identical() -> None:
    paired = {name for pair in LOOKALIKE_PAIRS for name in pair}
    assert len(LOOKALIKE_PAIRS) >= 3
    for a, b in LOOKALIKE_PAIRS:
        assert glyph_of(a) == glyph_of(b)
    others = [c.glyph for c in CLASSES if c.name not in paired]
    pair_glyphs = {glyph_of(a) for a, _ in LOOKALIKE_PAIRS}
    assert len(set(others)) == len(others) and not pair_glyphs & set(others)
    assert all(GLYPHS[glyph_of(n)].tiny_p >= 0.5 for n in TINY_CLASSES)


@pytest.mark.parametrize("pair", LOOKALIKE_PAIRS, ids=lambda p: "-".join(p))
def test_pair_members_render_pixel_identically(pair: tuple[str, str]) -> None:
    a, b = pair
    scene = next(s for s in SCENES if any(m == a for g in s.groups for m, _ in g.members))
    anchor = next(g.members[0][0] for g in scene.groups if any(m == a for m, _ in g.members))
    pixels = []
    for member in (a, b):
        rng = np.random.default_rng(123)
        placed = place_glyphs([glyph_of(anchor), glyph_of(member)], 64, rng)
        img, boxes = render_image(scene, placed, 64, rng)
        pixels.append((img, [bx.bbox for bx in boxes]))
    assert np.array_equal(pixels[0][0], pixels[1][0]) and pixels[0][1] == pixels[1][1]
    # ...while a class with its own glyph in the same place does change the image.
    rng = np.random.default_rng(123)
    placed = place_glyphs([glyph_of(anchor), glyph_of(anchor)], 64, rng)
    assert not np.array_equal(render_image(scene, placed, 64, rng)[0], pixels[0][0])


def test_pair_members_share_size_distribution(moderate: Path) -> None:
    doc = _coco(moderate, "train")
    name = {c["id"]: c["name"] for c in doc["categories"]}
    sides: dict[str, list[float]] = {}
    for ann in doc["annotations"]:
        sides.setdefault(name[ann["category_id"]], []).append(max(ann["bbox"][2:]))
    for a, b in LOOKALIKE_PAIRS:
        assert abs(np.mean(sides[a]) - np.mean(sides[b])) < 1.0  # px, at 48 px images


def test_ceilings_tell_the_story(moderate: Path) -> None:
    rows = measure_ceilings(moderate)
    assert {r.name for r in rows} == {n for p in LOOKALIKE_PAIRS for n in p} | set(TINY_CLASSES)
    for r in rows:
        assert r.positives > 0 and 0 < r.prevalence < 0.5
        if r.kind == "lookalike":
            # Context names the member; the glyph alone is close to a coin flip.
            assert r.context_ap >= 0.85, r
            assert r.appearance_ap <= 0.7, r
            assert r.coin_flip is not None and abs(r.appearance_ap - r.coin_flip) < 0.1, r
            assert r.both_ap >= 0.95, r
        else:
            assert r.context_ap >= r.appearance_ap + 0.3, r
    accuracy, with_bg = measure_background_cue(moderate, rows)
    # The tint hints at the scene (chance 1/6) but does not name it, let alone a class.
    assert 0.3 < accuracy < 0.85
    assert all(r.background_ap is not None and r.background_ap < r.context_ap for r in with_bg)
    table = format_ceilings_table(with_bg)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows) and "context-only AP" in lines[0]
    assert "background-only AP" in lines[0]


def test_format_table_without_background() -> None:
    rows = [
        CeilingRow("cup", "lookalike", "tyre", 10, 0.1, 0.52, 0.95, 0.5, 1.0),
        CeilingRow("bee", "tiny", None, 12, 0.12, None, 0.9, 0.3, 0.93),
    ]
    table = format_ceilings_table(rows)
    assert "background" not in table
    assert "| cup | lookalike | tyre | 10 | 0.100 | 0.520 | 0.950 | 0.500 | 1.000 |" in table
    assert "| bee | tiny | - | 12 | 0.120 | - | 0.900 | 0.300 | 0.930 |" in table


def test_interrupted_run_leaves_previous_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    args = {"n_train": 20, "n_val": 10, "size": 32, "workers": 1}
    generate_synthetic(out, **args)
    before = _tree_bytes(out)

    def stop(done: int, total: int) -> None:
        if done == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, **args, seed=9, progress=stop)
    assert _tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temporary left over
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "fresh", **args, progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_replaces_an_earlier_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    args = {"n_train": 20, "n_val": 10, "size": 32, "workers": 1}
    generate_synthetic(out, **args, seed=1)
    seen: list[tuple[int, int]] = []
    summary = generate_synthetic(out, **args, seed=2, progress=lambda d, t: seen.append((d, t)))
    meta = json.loads((out / "annotations" / "synth_meta.json").read_text())
    assert meta["args"]["seed"] == 2 and summary.out == out
    assert summary.images == {"train": 20, "val": 10}
    assert sum(summary.annotations.values()) == sum(
        len(_coco(out, s)["annotations"]) for s in SPLITS
    )
    assert seen[-1] == (30, 30) and len(seen) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing"):
        generate_synthetic(out, n_train=5, n_val=5, size=32, workers=1)
    assert (out / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize(
    "kwargs", [{"size": 16}, {"n_train": 0}, {"n_val": -1}], ids=["size", "n_train", "n_val"]
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "synth", **{"n_train": 5, "n_val": 5, "size": 32, **kwargs})


def test_ceilings_name_a_missing_metadata_file(small: Path, tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_bytes(
        (small / "annotations" / "instances_train.json").read_bytes()
    )
    with pytest.raises(DataError, match="synth_meta.json"):
        measure_ceilings(tmp_path)


# ------------------------------------------------------------------------ the interaction tier
@pytest.fixture(scope="module")
def interaction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interaction") / "synth"
    generate_synthetic(out, n_train=800, n_val=300, size=64, seed=5, workers=2, tier="interaction")
    return out


def test_interaction_tier_same_bytes_per_seed(interaction: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    generate_synthetic(again, n_train=800, n_val=300, size=64, seed=5, tier="interaction")
    generate_synthetic(other, n_train=800, n_val=300, size=64, seed=6, tier="interaction")
    files = sorted(p.relative_to(interaction) for p in interaction.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((interaction / f).read_bytes() == (again / f).read_bytes() for f in files)
    first = Path("images/train/000000000001.jpg")
    assert (interaction / first).read_bytes() != (other / first).read_bytes()
    meta = json.loads((interaction / "annotations" / "synth_meta.json").read_text())
    assert meta["tier"] == "interaction" and meta["args"]["tier"] == "interaction"


def test_interaction_tier_follows_the_xor_rule_with_glyphs_apart(interaction: Path) -> None:
    from lcm.data.synthetic.interaction import ANCHORS, PAIRS

    anchors = [name for name, _ in ANCHORS]
    for split in ("train", "val"):
        coco = _coco(interaction, split)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        by_image: dict[int, list[tuple[str, list[float]]]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append((names[a["category_id"]], a["bbox"]))
        for objects in by_image.values():
            present = {n for n, _ in objects}
            for (a, b), _, (i, j) in PAIRS:
                xor = (anchors[i] in present) != (anchors[j] in present)
                assert not (a in present and not xor) and not (b in present and xor)
            left = [box[0] + box[2] / 2 < 32 for n, box in objects if n in anchors]
            right = [box[0] + box[2] / 2 < 32 for n, box in objects if n not in anchors]
            assert len(set(left)) <= 1 and len(set(right)) <= 1  # each kind in one half
            if left and right:
                assert left[0] != right[0]  # anchors and glyphs in opposite halves


def test_count_ceilings_separate_the_tiers(interaction: Path, moderate: Path) -> None:
    from lcm.data.synthetic.ceilings import format_count_table, measure_count_ceilings

    rows = measure_count_ceilings(interaction)
    looks = [r for r in rows if r.role == "lookalike"]
    assert len(looks) == 8 and all(r.nonlinear_ap >= r.linear_ap + 0.3 for r in looks)
    assert all(r.linear_ap > 0.97 and r.nonlinear_ap > 0.97 for r in rows if r.role == "anchor")
    context = [r for r in measure_count_ceilings(moderate) if r.role == "lookalike"]
    assert all(abs(r.nonlinear_ap - r.linear_ap) < 0.1 for r in context)  # nothing to combine
    assert "**mean: lookalike**" in format_count_table(rows)
