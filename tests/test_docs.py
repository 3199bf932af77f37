"""The documentation: the generated CLI page covers what `--help` shows, and the README stays
short with links that resolve (the site itself is built with --strict by `make docs` in CI)."""

from __future__ import annotations

import re
import sys

import typer
from typer.testing import CliRunner

from tests._engine_fixtures import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import gen_cli  # noqa: E402

from cli import app  # noqa: E402


def _help_names(text: str) -> set[str]:
    """Option names and subcommand names in a rich --help screen."""
    names = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text))
    names |= set(re.findall(r"│ (?:\*\s+)?([a-z][\w-]+)\s{2,}", text))  # commands, arguments
    return names


def test_the_cli_page_lists_every_command_and_option_help_shows():
    page = gen_cli.render(app)
    runner = CliRunner()
    root = typer.main.get_command(app)
    seen = 0
    for path, _ in gen_cli.commands(root):
        shown = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert shown.exit_code == 0, (path, shown.output)
        section = page.split(f"## `{' '.join(('lcm', *path))}`", 1)[1].split("\n## `", 1)[0]
        for name in _help_names(shown.output) - {"--help"}:
            if name.startswith("--"):
                assert f"`{name}" in section or f" {name}" in section or f"{name} " in section, (
                    path, name)  # fmt: skip
            else:
                assert f"`{name}" in section or name.upper() in section, (path, name)
        seen += 1
    assert seen >= 25  # every command and group, not a few


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links into the site"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
