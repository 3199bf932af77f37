"""What the COCO and VOC prepare stages share: the image check, the report, the final write.

Both stages first turn their annotations into candidate :class:`ImageRecord` rows and only
then call :func:`write_prepared`, which checks the image files, refuses anything that would
make a broken manifest, and writes. A failure anywhere before the write leaves ``out``
untouched.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lcm.data.manifest import ImageRecord, resolve_image, write_manifest
from lcm.errors import DataError
from lcm.io import atomic_write_text

log = logging.getLogger(__name__)

REPORT_FILE = "prepare_report.json"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_MISSING = 5  # how many missing file names the one-line summary spells out


@dataclass(frozen=True)
class PrepareReport:
    """Outcome of a prepare stage.

    ``missing`` lists, in annotation order, the image paths (relative to ``image_root``) that
    the annotations name but that are not on disk; those images are left out of the manifest.
    """

    n_images: int
    n_classes: int
    missing: tuple[str, ...]
    image_root: Path
    out: Path

    def summary(self) -> str:
        head = f"prepared {self.n_images} images, {self.n_classes} classes"
        if not self.missing:
            return head
        shown = ", ".join(self.missing[:_SHOWN_MISSING])
        extra = len(self.missing) - _SHOWN_MISSING
        more = f" ... (+{extra} more)" if extra > 0 else ""
        return (
            f"{head}; {len(self.missing)} missing image files left out: {shown}{more} "
            f"(full list in {self.out / REPORT_FILE})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "n_missing": len(self.missing),
            "image_root": str(self.image_root),
            "missing": list(self.missing),
        }


def check_split_name(root: Path, split: str) -> str:
    """A dataset split name (``train``, ``trainval``, ``val2017``): never a path."""
    if not _SPLIT_NAME.fullmatch(split):
        raise DataError(f"{root}: invalid split name {split!r} (letters, digits, _ and - only)")
    return split


def read_annotation(path: Path) -> bytes:
    """The bytes of an annotation file; a missing or unreadable file is a DataError."""
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: annotation file not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e})") from e


def check_image_root(image_root: Path) -> None:
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image directory not found")


def image_exists(image_root: Path, relpath: str, source: str | Path) -> bool:
    """Whether ``relpath`` is a file under ``image_root``; a symlink out of the root is an error."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{source}: image file name {relpath!r} is not valid UTF-8 text") from e
    # Path.resolve raises RuntimeError on a symlink loop (Python 3.11), and OSError/ValueError
    # on names the OS cannot handle (too long, ...): all of them a problem with the user's files.
    try:
        path = resolve_image(image_root, relpath)  # DataError for a symlink out of the root
        return path.is_file()
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{image_root / relpath}: cannot check the image file ({e})") from e


def _check_keys(records: Sequence[ImageRecord], source: str | Path) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.key in seen:
            if seen[r.key] == r.path:
                raise DataError(f"{source}: image file {r.path!r} is listed more than once")
            raise DataError(
                f"{source}: image files {seen[r.key]!r} and {r.path!r} map to the same sample "
                f"key {r.key!r}; rename one of them"
            )
        seen[r.key] = r.path


def write_prepared(
    out: Path,
    classes: Sequence[str],
    candidates: Sequence[ImageRecord],
    image_root: Path,
    source: str | Path,
) -> PrepareReport:
    """Leave out images not on disk, then write the manifest, ``classes.json`` and the report.

    ``source`` is the annotation file (or directory) named in error messages.
    """
    if not candidates:
        raise DataError(f"{source}: lists no images")
    _check_keys(candidates, source)
    kept: list[ImageRecord] = []
    missing: list[str] = []
    for r in candidates:
        if image_exists(image_root, r.path, source):
            kept.append(r)
        else:
            missing.append(r.path)
    if not kept:
        raise DataError(
            f"{image_root}: none of the {len(candidates)} images listed in {source} were found "
            f"(first: {candidates[0].path!r}); check the image directory"
        )
    report = PrepareReport(len(kept), len(classes), tuple(missing), image_root, out)
    try:
        write_manifest(out, classes, kept)
        atomic_write_text(out / REPORT_FILE, json.dumps(report.to_json(), indent=1) + "\n")
    except OSError as e:
        raise DataError(f"{out}: cannot write the prepared dataset ({e})") from e
    if missing:
        log.warning("%s: %d listed image files not found, left out", source, len(missing))
    log.info("%s -> %s: %s", source, out, report.summary())
    return report
