"""The package's structure: every collective lives in ``syncnorm/distributed.py``, and the Layout
section of docs/development.md lists every top-level folder and every package module that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "syncnorm"


def _torch_distributed_uses(path: Path) -> list[str]:
    """``line: what`` for every import of ``torch.distributed`` (any submodule) and every
    ``torch.distributed`` attribute access in one module (docstrings and comments do not count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [a.name for a in node.names]
            if module.startswith("torch.distributed") or (module == "torch" and "distributed" in names):
                found.append(f"{node.lineno}: from {module} import {', '.join(names)}")
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
              and node.value.id == "torch"):
            found.append(f"{node.lineno}: torch.distributed")
    return found


def test_only_distributed_py_talks_to_torch_distributed():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        uses = _torch_distributed_uses(path)
        if uses and path != PACKAGE / "distributed.py":
            offenders[str(path.relative_to(REPO))] = uses
    assert not offenders, f"torch.distributed outside syncnorm/distributed.py: {offenders}"
    # the check itself finds what it looks for
    assert _torch_distributed_uses(PACKAGE / "distributed.py")[0].endswith("import torch.distributed")


def _layout_entries() -> dict[str, str]:
    """The Layout block of docs/development.md as ``{path: description}``; an indented line continues
    the entry above."""
    text = (REPO / "docs" / "development.md").read_text()
    match = re.search(r"^## Layout\n.*?```\n(.*?)```", text, flags=re.S | re.M)
    assert match, "docs/development.md has no '## Layout' section with a code block"
    entries: dict[str, str] = {}
    path = None
    for line in match.group(1).splitlines():
        if line[:1].strip():
            path, _, text = line.partition(" ")
            entries[path] = text
        elif path is not None:
            entries[path] += " " + line.strip()
    return entries


def _existing() -> list[str]:
    """Every top-level folder with tracked-looking content (not hidden, not a run output) and every
    module and subpackage of the package, as the Layout names them (``syncnorm/app/models/``)."""
    skip = {"logs", "outputs", "multirun", "wandb", "lightning_logs", "build", "dist", "syncnorm"}
    found = [f"{p.name}/" for p in sorted(REPO.iterdir())
             if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in skip
             and not p.name.endswith(".egg-info")]
    for path in sorted(PACKAGE.rglob("*")):
        if "__pycache__" in path.parts or path.name == "__init__.py":
            continue
        if path.is_dir():
            found.append(path.relative_to(REPO).as_posix() + "/")
        elif path.suffix == ".py":
            found.append(path.relative_to(REPO).as_posix())
    return found


def test_layout_lists_every_folder_and_module():
    entries = _layout_entries()
    missing = []
    for item in _existing():
        folder, _, name = item.rstrip("/").rpartition("/")
        stem = Path(name).stem
        listed = item in entries or (folder and re.search(rf"(?<![\w.]){re.escape(stem)}(?![\w])",
                                                          entries.get(folder + "/", "")))
        if not listed:
            missing.append(item)
    assert not missing, f"docs/development.md's Layout section does not list: {missing}"
    existing = _existing()
    assert {"benchmarks/", "conf/", "syncnorm/app/", "syncnorm/app/models/", "syncnorm/layers/"} <= set(existing)
    assert not [p for p in entries if p.rstrip("/") and not (REPO / p).exists()], "Layout names a path that is gone"
