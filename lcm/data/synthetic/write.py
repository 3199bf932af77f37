"""Writing the benchmark in the COCO layout, reproducibly and atomically."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from lcm.data.synthetic import interaction
from lcm.data.synthetic import story as story_module
from lcm.data.synthetic.render import render_image
from lcm.data.synthetic.story import (
    REFERENCE_SIZE,
    TINY_VISIBLE_PX,
)
from lcm.errors import ConfigError, DataError
from lcm.progress import ProgressCallback

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
META_FILE = "synth_meta.json"
SPLITS = ("train", "val")
JPEG_QUALITY = 90
_SPLIT_CODE = {"train": 0, "val": 1}
_MIN_SIZE = 32
TIERS = ("context", "interaction")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_synthetic` wrote."""

    out: Path
    classes: tuple[str, ...]
    images: dict[str, int]
    annotations: dict[str, int]
    lookalike_pairs: tuple[tuple[str, str], ...]
    tiny_classes: tuple[str, ...]


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    index: int
    size: int
    tier: str = "context"


def _make_image(job: _Job) -> tuple[bytes, list[dict], str]:
    """Sample and render one image; everything random comes from its own seed sequence."""
    # One generator per image keyed by (seed, split, index): the output does not depend on the
    # number of worker processes or on the order in which they finish.
    rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, _SPLIT_CODE[job.split], job.index])
    )
    story = _story(job.tier)
    scene, classes, objects = story.sample_image(rng, job.size)
    pixels, boxes = render_image(scene, objects, job.size, rng)  # (S, S, 3) uint8
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    ids = story.category_ids()
    anns = [
        {"category_id": ids[cls], "bbox": box.bbox, "area": box.area}
        for cls, box in zip(classes, boxes, strict=True)
    ]
    return buf.getvalue(), anns, scene.name


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[tuple[bytes, list[dict], str]]:
    if workers <= 1 or len(jobs) < 64:
        yield from map(_make_image, jobs)
        return
    # spawn, not fork: the caller may hold threads (torch, Prefect) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_make_image, jobs, chunksize=64)


def _story(tier: str) -> ModuleType:
    """The module that tells a tier's story: ``story`` (context) or ``interaction``."""
    if tier not in TIERS:
        raise ConfigError(f"synth: unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return story_module if tier == "context" else interaction


def _categories(tier: str) -> list[dict]:
    story = _story(tier)
    ids = story.category_ids()
    return [{"id": ids[c.name], "name": c.name, "supercategory": c.role} for c in story.CLASSES]


def _meta(args: dict, image_scenes: dict[str, dict[str, str]], tier: str) -> dict:
    """``synth_meta.json``: what every tier records, around the tier's own story."""
    story = _story(tier)
    ids = story.category_ids()
    glyph = {c.name: c.glyph for c in story.CLASSES}
    return {
        "generator": "lcm.data.synthetic",
        "version": GENERATOR_VERSION,
        "args": args,
        "reference_size": REFERENCE_SIZE,
        "tiny_visible_px": TINY_VISIBLE_PX * args["size"] / REFERENCE_SIZE,
        **story.story_meta(),
        "classes": [
            {"name": c.name, "category_id": ids[c.name], "role": c.role, "glyph": c.glyph}
            for c in story.CLASSES
        ],
        "glyphs": {
            k: {"shape": g.shape, "rgb": list(g.rgb), "size": list(g.size), "tiny_p": g.tiny_p}
            for k, g in story.GLYPHS.items()
        },
        "lookalike_pairs": [
            {"glyph": glyph[a], "classes": [a, b]} for a, b in story.LOOKALIKE_PAIRS
        ],
        "tiny_classes": list(story.TINY_CLASSES),
        "image_scenes": image_scenes,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _write_benchmark(
    root: Path,
    counts: dict[str, int],
    size: int,
    seed: int,
    workers: int,
    progress: ProgressCallback | None,
    tier: str,
) -> SynthSummary:
    (root / "annotations").mkdir()
    total = sum(counts.values())
    done = 0
    image_id = 0
    ann_id = 0
    n_anns: dict[str, int] = {}
    image_scenes: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True)
        images: list[dict] = []
        annotations: list[dict] = []
        scenes: dict[str, str] = {}
        jobs = [_Job(seed, split, i, size, tier) for i in range(counts[split])]
        for jpeg, anns, scene in _run_jobs(jobs, workers):
            image_id += 1
            file_name = f"{image_id:012d}.jpg"
            (img_dir / file_name).write_bytes(jpeg)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            scenes[str(image_id)] = scene
            for ann in anns:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, **ann, "iscrowd": 0})
            done += 1
            if progress is not None:
                progress(done, total)
        coco = {
            "info": {"description": "lcm synthetic benchmark", "version": GENERATOR_VERSION},
            "images": images,
            "annotations": annotations,
            "categories": _categories(tier),
        }
        _write_json(root / "annotations" / f"instances_{split}.json", coco)
        n_anns[split] = len(annotations)
        image_scenes[split] = scenes
    args = {"n_train": counts["train"], "n_val": counts["val"], "size": size, "seed": seed}
    if tier != "context":  # the default tier's metadata stays byte-identical
        args["tier"] = tier
    _write_json(root / "annotations" / META_FILE, _meta(args, image_scenes, tier))
    story = _story(tier)
    return SynthSummary(
        out=root,
        classes=tuple(c.name for c in story.CLASSES),
        images=dict(counts),
        annotations=n_anns,
        lookalike_pairs=story.LOOKALIKE_PAIRS,
        tiny_classes=story.TINY_CLASSES,
    )


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything that is not an earlier synthetic benchmark (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another output path")
    if any(out.iterdir()) and not (out / "annotations" / META_FILE).is_file():
        raise DataError(
            f"{out}: directory is not empty and holds no annotations/{META_FILE}; refusing to "
            "replace it with the synthetic benchmark (remove it or choose another path)"
        )


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:  # cleanup only: the caller's own error (if any) is what matters
        logger.warning("could not remove temporary directory %s: %s", path, exc)


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name beside ``out`` (same filesystem, so renames are atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; an older benchmark there is removed afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove_tree(old)


def generate_synthetic(
    out: Path,
    *,
    n_train: int = 4000,
    n_val: int = 1000,
    size: int = 96,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    workers: int = 1,
    tier: str = "context",
) -> SynthSummary:
    """Write the synthetic benchmark to ``out`` in COCO layout; byte-identical per arguments.

    ``out/images/{train,val}/*.jpg``, ``out/annotations/instances_{train,val}.json`` and
    ``out/annotations/synth_meta.json``. The tree is built in a temporary directory beside
    ``out`` and renamed into place, so an interrupted run leaves ``out`` as it was.
    ``workers`` > 1 renders in that many spawned processes (the bytes do not depend on it); a
    calling script then needs the usual ``if __name__ == "__main__":`` guard. ``tier``:
    ``context`` (the default story) or ``interaction`` (:mod:`lcm.data.synthetic.interaction`).
    """
    _story(tier)
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"synth: n_train and n_val must be >= 1, got {n_train} and {n_val}")
    if size < _MIN_SIZE:
        raise ConfigError(f"synth: size must be >= {_MIN_SIZE} px, got {size}")
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename
    try:
        counts = {"train": n_train, "val": n_val}
        summary = _write_benchmark(tmp, counts, size, seed, workers, progress, tier)
        _swap_in(tmp, out)
    except BaseException:
        _remove_tree(tmp)
        raise
    logger.info(
        "wrote synthetic benchmark to %s: %d train / %d val images, %d classes",
        out,
        n_train,
        n_val,
        len(summary.classes),
    )
    return SynthSummary(**{**summary.__dict__, "out": out})
