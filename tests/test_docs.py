"""The user guide stays true: its example runs and prints what the page says, every
subcommand has its section, and nothing in the repository points outside it. (``make
docs`` builds the site with warnings as errors, so broken references fail there.)"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from memslots.tools.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_library_guide_example_prints_what_it_says() -> None:
    text = (DOCS / "library.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    shown = re.search(r"```python\n.*?```\n\n```text\n(.*?)```", text, re.S)
    assert code and shown
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.group(1), str(DOCS / "library.md"), "exec"), {})
    assert out.getvalue() == shown.group(1)


def test_every_subcommand_has_its_section() -> None:
    text = (DOCS / "cli.md").read_text()
    for name in SUBCOMMANDS:
        assert f"## `memslots {name}`" in text
        assert f"```{{memslots-help}} {name}" in text


def test_every_page_is_in_the_site() -> None:
    index = (DOCS / "index.md").read_text()
    entries = [line for block in re.findall(r"```\{toctree\}\n(.*?)```", index, re.S)
               for line in block.splitlines() if line and not line.startswith(":")]  # fmt: skip
    assert "cli" in entries and "api/index" in entries
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert page.stem in entries, f"{page.name} is in no toctree of docs/index.md"


def test_nothing_points_outside_the_repository() -> None:
    pattern = re.compile(r"\.\./shared|/work/|shared/SPEC|SPEC\.md|SPEC section|reference section"
                         r"|the reference material|reference/kvm")  # fmt: skip
    roots = ["README.md", "docs", "src", "examples", "benchmarks", "tests", "Makefile",
             "pyproject.toml", "setup.py"]  # fmt: skip
    hits = []
    for root in roots:
        path = ROOT / root
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.suffix in {".py", ".md", ".rst", ".toml", ".txt", ""} and f.is_file():
                if f == Path(__file__).resolve():
                    continue
                for number, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                    if pattern.search(line):
                        hits.append(f"{f.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
