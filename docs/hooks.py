"""MkDocs hooks: the CLI reference generated from the Typer app before every build, and the
committed figures (bench/results/, studies/) served from where they live in the repository."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("bench/results/**/*.png", "studies/**/*.png")


def on_pre_build(config, **kwargs) -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    import gen_cli

    from cli import app

    (ROOT / "docs" / "cli.md").write_text(gen_cli.render(app))


def on_files(files, config, **kwargs):
    for pattern in FIGURES:
        for path in sorted(ROOT.glob(pattern)):
            if "/data/" in path.as_posix():  # studies/data: caches, not figures
                continue
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
