"""The documentation: it builds with warnings as errors, the API reference covers every public name,
every page is reachable, and nothing links outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

import syncnorm
import syncnorm.callbacks

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_docs_build_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "syncnorm" / "index.html").read_text()
    assert "convert_norms" in api and "SyncBatchNorm" in api  # the reference was generated


def test_api_reference_lists_every_public_name():
    reference = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))
    documented = set(re.findall(r"^::: ([\w.]+)", reference, flags=re.M))
    public = {f"syncnorm.{n}" for n in syncnorm.__all__ if not n.startswith("__")}
    public |= {f"syncnorm.callbacks.{n}" for n in syncnorm.callbacks.__all__}
    assert not public - documented, f"missing from docs/api: {sorted(public - documented)}"
    assert len(public) > 20  # the check sees the real lists


def test_every_page_is_in_the_nav_and_nothing_links_outside_the_repository():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python", "#"))
    pages = set(_nav_pages(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == pages, (on_disk ^ pages)
    texts = [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "launch").rglob("*.md")]
    offenders = [str(p.relative_to(REPO)) for p in texts if "../shared" in p.read_text() or "API.md" in p.read_text()]
    assert not offenders, offenders
