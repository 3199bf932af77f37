"""dvc.yaml stays complete: every lcm/ and flows/ module a stage's command can import is
among that stage's dependencies, so editing one makes `dvc repro` rerun the stage.

The imports are read from the source (every import statement, also those inside functions),
starting at the CLI command a stage runs and following lcm.* / flows.* modules transitively.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml
from PIL import Image

from lcm.config import DataConfig
from lcm.data.shards import eval_loader, resolve_shards
from tests._engine_fixtures import cli_env, write_params
from tests._prepare_fixtures import voc_xml, write_voc

ROOT = Path(__file__).resolve().parent.parent
FORMATS = typing.get_args(typing.get_type_hints(DataConfig)["format"])


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _command_function(words: list[str]):
    """The Typer callback that `lcm WORDS...` runs."""
    import cli

    group = cli.app
    while True:
        name, words = words[0], words[1:]
        for info in group.registered_commands:
            if (info.name or info.callback.__name__.replace("_", "-")) == name:
                return info.callback
        for sub in group.registered_groups:
            if sub.name == name:
                group = sub.typer_instance
                break
        else:
            raise AssertionError(f"no command {name!r}")


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*parts, node.module] if node.module else parts)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from lcm import checkpoint`
    return {m for m in found if m.split(".")[0] in ("lcm", "flows") and _module_file(m)}


def _closure(start: set[str]) -> set[Path]:
    files: set[Path] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in files:
            continue
        files.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(_imports(ast.parse(path.read_text()), package))
        parts = name.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ too
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return files


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


# What a run prints, never what it writes: editing these reruns nothing.
DISPLAY_ONLY = {ROOT / "lcm" / "errors.py", ROOT / "lcm" / "progress.py"}

STAGES = [name for name, stage in _stages().items() if "lcm " in str(stage.get("cmd", stage))]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_every_module_its_command_imports(stage):
    spec = _stages()[stage]
    spec = spec.get("do", spec)
    start = {"lcm.errors"}
    for fmt in FORMATS:  # `lcm data prepare ${data.format}`: every format the params allow
        cmd = spec["cmd"].replace("${data.format}", fmt)
        words = [w for w in shlex.split(cmd)[1:] if not w.startswith("-")]
        fn = _command_function(words)
        start |= _imports(ast.parse(inspect.getsource(fn).strip()), "cli")
    deps = [d for d in spec["deps"] if "${" not in d or d.startswith(("lcm", "flows"))]
    code = {p for p in _closure(start) if _has_code(p) and p not in DISPLAY_ONLY}
    missing = sorted(str(p.relative_to(ROOT)) for p in code if not _covered(p, deps))
    assert not missing, f"{stage}: dvc.yaml deps lack {missing}"


def _has_code(path: Path) -> bool:
    """A package's __init__ that only documents the package changes no result."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    return any(
        not isinstance(n, (ast.Expr, ast.Assign, ast.ImportFrom))
        or (isinstance(n, ast.ImportFrom) and n.module != "__future__")
        for n in body
    )


# ------------------------------------------------------------------ the pipeline on VOC data
VOC_TRAIN, VOC_TEST = 24, 12
DIFFICULT = ("000000", "dog")  # in trainval: a dog marked difficult and nothing else of its class


def _voc_image(rng: np.random.Generator, labels: list[int]) -> Image.Image:
    arr = np.full((40, 40, 3), 30, np.uint8) + rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
    for c in labels:
        y, x = rng.integers(0, 26, 2)
        arr[y : y + 12, x : x + 12] = (40 * c) % 256, (90 * c) % 256, 255 - 12 * c
    return Image.fromarray(arr)


def _voc_dataset(root: Path) -> Path:
    """A VOC2007-layout root: trainval and test split files, XMLs, 40 px JPEGs; four classes
    appear (person, dog, car, cat), one dog is difficult-only."""
    from lcm.data.voc import VOC_CLASSES

    rng = np.random.default_rng(7)
    used = [VOC_CLASSES.index(n) for n in ("person", "dog", "car", "cat")]
    (root / "JPEGImages").mkdir(parents=True)
    annotations = {}
    for i in range(VOC_TRAIN + VOC_TEST):
        image_id = f"{i:06d}"
        labels = [c for c in used if rng.random() < 0.4] or [used[i % 4]]
        objects = [(VOC_CLASSES[c], 0) for c in labels]
        if image_id == DIFFICULT[0]:
            labels = [VOC_CLASSES.index("person")]
            objects = [("person", 0), (DIFFICULT[1], 1)]
        _voc_image(rng, labels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        annotations[image_id] = voc_xml(f"{image_id}.jpg", objects, size=(40, 40))
    ids = list(annotations)
    write_voc(root, annotations, split="trainval", jpegs=[], ids=ids[:VOC_TRAIN])
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[VOC_TRAIN:]) + "\n")
    return root


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_on_voc(tmp_path, prefect_api):
    """`dvc repro predict` on a VOC layout: prepare, shard, mask, train, evaluate, predict."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("lcm", "flows"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("cli.py", "dvc.yaml"):
        shutil.copy(ROOT / name, project / name)
    _voc_dataset(project / "data" / "raw" / "voc")
    splits = {
        "train": {"name": "trainval", "images": "JPEGImages"},
        "val": {"name": "test", "images": "JPEGImages"},
    }
    write_params(  # the repo's params (every section dvc.yaml names), tiny model, VOC data
        project / "params.yaml",
        base=yaml.safe_load((ROOT / "params.yaml").read_text()),
        data={"name": "voc", "format": "voc", "raw": "data/raw/voc", "splits": splits},
        shard={"max_side": 64, "shard_size": 10},
        mask={"missing": [0.5], "seed": 0},
        train={"epochs": 1, "missing": 0.5},
        evaluate={"batch_size": 16, "weights": "raw"},
        predict={"run_id": "val", "batch_size": 16, "weights": "raw"},
    )
    env = cli_env(tmp_path, prefect_api)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site-cache")
    env["DVC_NO_ANALYTICS"] = "1"

    def dvc(*args: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        assert res.returncode == 0, f"dvc {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    dvc("init", "--no-scm", "-q")
    with open(project / ".dvc" / "config", "a") as f:
        f.write((ROOT / ".dvc" / "config").read_text())
    dvc("repro", "predict")
    assert not (project / "data" / "raw" / "synth").exists()  # the synthetic stage did not run

    from lcm.data.manifest import read_manifest
    from lcm.data.masks import read_mask
    from lcm.data.voc import VOC_CLASSES

    manifest = read_manifest(project / "data" / "prepared" / "voc" / "train")
    assert manifest.table.num_rows == VOC_TRAIN
    loader = eval_loader(
        resolve_shards(project / "data" / "shards" / "voc" / "train"),
        batch_size=8, image_size=32, num_workers=0,
    )  # fmt: skip
    targets = {k: t for b in loader for k, t in zip(b.keys, b.targets.tolist(), strict=True)}
    assert len(targets) == VOC_TRAIN
    first = targets[DIFFICULT[0]]
    assert first[VOC_CLASSES.index(DIFFICULT[1])] == -1  # difficult-only: unknown
    assert first[VOC_CLASSES.index("person")] == 1
    assert first[VOC_CLASSES.index("cat")] == 0
    assert len(read_mask(project / "data" / "masks" / "voc" / "train" / "missing-0.5.parquet"))

    metrics = json.loads((project / "metrics" / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == VOC_TEST
    con = duckdb.connect(str(project / "predictions" / "voc.duckdb"), read_only=True)
    try:
        (n_rows,) = con.execute("SELECT count(*) FROM predictions WHERE run_id = 'val'").fetchone()
    finally:
        con.close()
    assert n_rows == VOC_TEST * len(VOC_CLASSES)
    assert "up to date" in dvc("repro", "predict")  # nothing left stale
