"""dvc.yaml stays complete: every lcm/ and flows/ module a stage's command can import is
among that stage's dependencies, so editing one makes `dvc repro` rerun the stage.

The imports are read from the source (every import statement, also those inside functions),
starting at the CLI command a stage runs and following lcm.* / flows.* modules transitively.
"""

from __future__ import annotations

import ast
import inspect
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


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
    words = [w for w in shlex.split(spec["cmd"])[1:] if not w.startswith("-")]
    fn = _command_function(words)
    start = _imports(ast.parse(inspect.getsource(fn).strip()), "cli") | {"lcm.errors"}
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
