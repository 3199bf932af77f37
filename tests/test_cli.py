"""The `lcm` command line end to end: data stages, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from tests._engine_fixtures import cli_env, lcm_cmd
from tests._prepare_fixtures import COCO_EXPECTED, coco_doc, write_coco


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        lcm_cmd(*args), env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_data_stages_chain(tmp_path):
    ann, images, prepared = write_coco(tmp_path, coco_doc())
    done = run(
        tmp_path,
        "data",
        "prepare",
        "coco",
        "--annotations",
        str(ann),
        "--images",
        str(images),
        "--out",
        str(prepared),
    )
    assert done.returncode == 0, done.stderr
    assert "prepared 4 images, 4 classes" in done.stdout
    table = pq.read_table(prepared / "manifest.parquet").to_pydict()
    assert dict(zip(table["key"], table["labels"], strict=True)) == {
        k: v[0] for k, v in COCO_EXPECTED.items()
    }

    shards = tmp_path / "shards"
    done = run(
        tmp_path,
        "data",
        "shard",
        "--prepared",
        str(prepared),
        "--images",
        str(images),
        "--out",
        str(shards),
        "--shard-size",
        "3",
        "--workers",
        "1",
    )
    assert done.returncode == 0, done.stderr
    info = json.loads((shards / "_info.json").read_text())
    assert info["total"] == 4 and [s["count"] for s in info["shards"]] == [3, 1]

    masks = tmp_path / "masks"
    done = run(
        tmp_path,
        "data",
        "mask",
        "--prepared",
        str(prepared),
        "--missing",
        "0.5",
        "--missing",
        "0.25",
        "--seed",
        "1",
        "--out",
        str(masks),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("realised") == 2
    assert sorted(p.name for p in masks.iterdir()) == [
        "missing-0.25.parquet",
        "missing-0.5.parquet",
    ]


def test_prepare_coco_from_the_root_and_split_name(tmp_path):
    """--root R --split S reads R/annotations/instances_S.json and R/images/S/."""
    ann, images, _ = write_coco(tmp_path / "flat", coco_doc())
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    ann.rename(root / "annotations" / "instances_val2017.json")
    (root / "images").mkdir()
    images.rename(root / "images" / "val2017")
    done = run(tmp_path, "data", "prepare", "coco", "--root", str(root), "--split", "val2017",
               "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "prepared 4 images, 4 classes" in done.stdout
    line = one_error_line(run(tmp_path, "data", "prepare", "coco", "--root", str(root),
                              "--split", "../val2017", "--out", str(tmp_path / "o2")))  # fmt: skip
    assert "invalid split name" in line and not (tmp_path / "o2").exists()
    line = one_error_line(run(tmp_path, "data", "prepare", "coco", "--out", str(tmp_path / "o3")))
    assert "give --root and --split, or --annotations" in line


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["images"][0].update(file_name="../escape.jpg"), "escapes the image root"),
        (lambda d: d["annotations"][0].update(image_id=404), "404"),
        (lambda d: d.pop("categories"), "categories"),
    ],
)
def test_bad_coco_is_one_line_and_writes_nothing(tmp_path, mutate, fragment):
    doc = coco_doc()
    mutate(doc)
    ann, images, out = write_coco(tmp_path, doc, images=["a.jpg", "sub/b.jpg", "c.jpg", "d.jpg"])
    line = one_error_line(
        run(
            tmp_path,
            "data",
            "prepare",
            "coco",
            "--annotations",
            str(ann),
            "--images",
            str(images),
            "--out",
            str(out),
        )
    )
    assert fragment in line and str(ann) in line
    assert not out.exists()


def test_missing_metrics_file_for_summary(tmp_path):
    line = one_error_line(run(tmp_path, "summary", str(tmp_path / "nope.json")))
    assert "nope.json" in line


def test_report_model_json_within_paper_tolerance(tmp_path):
    done = run(tmp_path, "report", "model", "--json")
    assert done.returncode == 0, done.stderr
    rep = json.loads(done.stdout)
    # the size goal for the default: the paper's 69.7M +- 3%, at most Q2L's 36.6 GMACs
    assert abs(rep["params"] / 69.7e6 - 1) <= 0.03 and rep["gmacs"] <= 36.6
    assert abs(rep["gmacs"] / 35.8 - 1) <= 0.03
    assert {"params", "gmacs"} <= set(rep["baseline"]) and {"params", "gmacs"} <= set(rep["head"])
