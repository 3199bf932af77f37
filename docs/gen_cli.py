"""The CLI reference page, generated from the Typer app itself (so it cannot drift).

    python docs/gen_cli.py docs/cli.md        # `make docs` runs it before mkdocs

Walks the click command tree behind ``cli.app``: every command and group in order, its help,
its usage line and every parameter it takes (name, flags, type, default, help), as one
Markdown page.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple, Any]]:
    """(path, command) of every command under ``group``, depth first, in declaration order
    (Typer's own copy of click: its objects are duck-typed here)."""
    out = [(path, group)]
    if hasattr(group, "commands"):
        for name, sub in group.commands.items():
            if not getattr(sub, "hidden", False):
                out += commands(sub, (*path, name))
    return out


def _param_row(param: Any, ctx: Any) -> str | None:
    """The parameter as ``--help`` shows it: its names and metavar, and its help (with the
    default and "required" as Typer adds them)."""
    if getattr(param, "hidden", False) or param.name == "help":
        return None
    record = param.get_help_record(ctx)
    if record is None:  # an argument: its name, and the help Typer keeps for it
        names, text = param.name.upper(), getattr(param, "help", None) or ""
        text += " (required)" if param.required else ""
    else:
        names, text = record
    text = " ".join(text.split()).replace("|", "\\|")
    return f"| `{names}` | {text} |"


def render(app: typer.Typer) -> str:
    root = typer.main.get_command(app)
    lines = ["# Command-line reference", "",
             "Generated from the `lcm` Typer app by `docs/gen_cli.py` when the site is built; "
             "every command and option below is what `lcm ... --help` shows.", ""]  # fmt: skip
    for path, cmd in commands(root):
        name = " ".join(("lcm", *path))
        lines += [f"## `{name}`", ""]
        if cmd.help:
            lines += [cmd.help.strip().split("\b")[0].strip(), ""]
        ctx = cmd.context_class(cmd, info_name=name)
        lines += ["```", cmd.get_usage(ctx).replace("Usage: ", ""), "```", ""]
        rows = [r for r in (_param_row(p, ctx) for p in cmd.params) if r]
        if rows:
            lines += ["| parameter | help |", "|---|---|", *rows, ""]
        if hasattr(cmd, "commands"):
            subs = [n for n, c in cmd.commands.items() if not getattr(c, "hidden", False)]
            lines += ["Commands: " + ", ".join(f"`{n}`" for n in subs), ""]
    return "\n".join(lines)


def main() -> None:
    from cli import app

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "cli.md"
    out.write_text(render(app))


if __name__ == "__main__":
    main()
