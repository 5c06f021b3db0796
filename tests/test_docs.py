"""The documentation stays true: every fenced code block of README.md and docs/*.md that
is Python, a ``memslots`` command or a trace is run (its shown output compared), parsed,
or marked as not runnable here with a reason; every subcommand has its section; every
page is in the site; nothing points outside the repository. (``make docs`` builds the
site with warnings as errors, so broken references fail there.)

A block is classified by an HTML comment on the line just before it (invisible on the
page), else by its language and content:

``<!-- not-run: REASON -->``
    not run here, for the reason given (one is required);
``<!-- parse-only: REASON -->``
    a synopsis or a recipe: each ``memslots`` line is parsed by the command line's parser
    (placeholders in capitals stand for a value, ``[...]`` for optional parts, ``a|b``
    for a choice), not run;
``<!-- needs: kvm -->``, ``<!-- needs: matplotlib -->``
    run where that is available, skipped (saying so) elsewhere;
``<!-- output -->``
    what the runnable block before it prints, compared exactly.

Unmarked: ``python`` blocks run; ``sh`` and ``console`` blocks run their ``memslots``
lines (other lines, such as ``make`` and ``pip``, set up the checkout and are not run);
``text`` blocks of ``$ memslots ...`` lines run each and compare what follows;
``json`` blocks and blocks of QEMU or strace lines are read as traces (a whole trace with
its header is replayed, and must agree). Anything else must be marked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from memslots.kvm import kvm_available
from memslots.tools.cli import SUBCOMMANDS, build_parser, main
from memslots.tools.traces import load_trace

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: the widest line a code block may have (the site shows about 88 columns)
WIDTH = 88

_FENCE = re.compile(
    r"^(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.S | re.M
)
_MARK = re.compile(r"<!--\s*(?P<kind>not-run|parse-only|needs|output)\s*:?\s*(?P<text>.*?)\s*-->")


@dataclasses.dataclass
class Block:
    """A fenced code block of a page: where, its language, its text and its mark."""

    page: Path
    line: int
    info: str
    body: str
    mark: str = ""
    mark_text: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` (directives such as ``{toctree}`` excluded),
    each with the mark of the HTML comment just before it."""
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        info = m.group("info").strip()
        if info.startswith("{"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.fullmatch(before.strip())
        line = text.count("\n", 0, m.start()) + 1
        kind_, why = (mark.group("kind"), mark.group("text")) if mark else ("", "")
        out.append(Block(page, line, info, m.group("body"), kind_, why))
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def _commands(body: str) -> Iterator[list[str]]:
    """The ``memslots`` command lines of a shell block, as argument lists (continuation
    lines joined, comments and a ``$`` prompt dropped)."""
    console = body.startswith("$ ")  # then the lines without a prompt are output
    for line in body.replace("\\\n", " ").splitlines():
        if console and not line.startswith("$ "):
            continue
        line = line.strip().removeprefix("$ ")
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[:3] == ["python", "-m", "memslots"]:
            words = ["memslots", *words[3:]]
        if words[0].endswith("/memslots"):
            words[0] = "memslots"
        if words[0] == "memslots":
            yield words[1:]


def kind(b: Block) -> str:
    """What the test does with a block: run, parse, output, skip, trace or unknown."""
    if b.mark in ("not-run", "parse-only", "output"):
        return b.mark
    if b.info == "python":
        return "python"
    if b.info in ("sh", "console") or (b.info == "text" and b.body.startswith("$ ")):
        return "shell" if any(_commands(b.body)) else "setup"
    if b.info in ("json", "jsonl") or re.search(r"kvm_set_user_memory |ioctl\(\d+, KVM_", b.body):
        return "trace"
    return "unknown"


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_every_block_is_run_or_marked_with_a_reason(block: Block) -> None:
    k = kind(block)
    assert k != "unknown", f"{block.where}: mark it <!-- not-run: why --> or make it runnable"
    if block.mark in ("not-run", "parse-only"):
        assert len(block.mark_text) > 3, f"{block.where}: the mark needs its reason"
    if block.mark == "needs":
        assert block.mark_text in ("kvm", "matplotlib"), f"{block.where}: needs what?"
    if k == "output":
        previous = ALL[ALL.index(block) - 1]
        assert previous.page == block.page and kind(previous) in ("python", "shell"), (
            f"{block.where}: an output block follows the block it is the output of"
        )


@pytest.mark.parametrize(
    "block",
    [b for b in ALL if b.info in ("python", "sh", "console") and b.mark != "output"],
    ids=lambda b: b.where,
)
def test_code_is_wrapped_for_the_site(block: Block) -> None:
    long = [line for line in block.body.splitlines() if len(line) > WIDTH]
    assert not long, f"{block.where}: lines over {WIDTH} columns: {long}"


# ----------------------------------------------------------------- running the blocks


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory to run examples in, holding the files they name:
    ``qemu.jsonl`` (a recorded trace: the whole-trace example of docs/trace-format.md)."""
    monkeypatch.chdir(tmp_path)
    example = next(b for b in ALL if b.page.name == "trace-format.md" and kind(b) == "trace"
                   and '"kind": "end"' in b.body)  # fmt: skip
    (tmp_path / "qemu.jsonl").write_text(example.body)
    return tmp_path


def _needs(block: Block) -> None:
    if block.mark != "needs":
        return
    if block.mark_text == "kvm" and not kvm_available():
        pytest.skip(f"{block.where} needs /dev/kvm, which is not available here")
    if block.mark_text == "matplotlib" and importlib.util.find_spec("matplotlib") is None:
        pytest.skip(f"{block.where} needs matplotlib, which is not installed")


def _output_of(block: Block) -> str | None:
    i = ALL.index(block)
    after = ALL[i + 1] if i + 1 < len(ALL) else None
    return after.body if after is not None and after.mark == "output" else None


RUNNABLE = [b for b in ALL if kind(b) in ("python", "shell")]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_the_examples_run_and_print_what_the_page_shows(
    block: Block, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _needs(block)
    out = io.StringIO()
    if kind(block) == "python":
        with contextlib.redirect_stdout(out):
            exec(compile(block.body, block.where, "exec"), {"__name__": "__doc_example__"})
        printed = out.getvalue()
    else:
        printed = ""
        for argv in _commands(block.body):
            status = main(argv)
            got, err = capsys.readouterr()
            assert status == 0, f"{block.where}: memslots {' '.join(argv)}: {err}"
            printed += got
        if block.body.startswith("$ "):  # a console: the shown output follows each command
            lines = block.body.splitlines()
            console = "".join(ln + "\n" for ln in lines if not ln.startswith("$ "))
            assert _normal(printed) == _normal(console), block.where
    shown = _output_of(block)
    if shown is not None:
        assert printed == shown, f"{block.where} prints other than the page shows"


def _normal(text: str) -> str:
    """Output with what differs between machines made equal: the build and the Python."""
    text = re.sub(r"compiled build \(mypyc\)|pure-Python build", "BUILD", text)
    return re.sub(r"Python \d+\.\d+\.\d+", "Python X", text)


PARSED = [b for b in ALL if kind(b) == "parse-only"]


@pytest.mark.parametrize("block", PARSED, ids=[b.where for b in PARSED])
def test_synopses_name_real_options(block: Block) -> None:
    lines = list(_commands(block.body.replace("[", " ").replace("]", " ")))
    assert lines, f"{block.where}: a parse-only block without a memslots command"
    for argv in lines:
        words = []
        for w in argv:
            if w == "|" or re.fullmatch(r"\d?>>?", w):  # a pipe, a redirection: the end
                break
            if w != "...":
                words.append(w.split("|")[0] if "|" in w else w)  # a|b: one of them
        words = ["1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", w) else w for w in words]
        if words and words[0] in SUBCOMMANDS:
            try:
                build_parser([words[0]]).parse_args(words)
            except SystemExit:
                pytest.fail(f"{block.where}: memslots {' '.join(argv)} does not parse")


TRACES = [b for b in ALL if kind(b) == "trace"]


@pytest.mark.parametrize("block", TRACES, ids=[b.where for b in TRACES])
def test_the_trace_examples_read_and_replay(
    block: Block, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = block.body.splitlines(keepends=True)
    if block.info == "json" and not block.body.lstrip().startswith(('{"kind"', '{"slot"')):
        with contextlib.suppress(ValueError):  # an object on several lines: the header
            lines = [json.dumps(json.loads(block.body)) + "\n"]
    trace = load_trace(lines, source=block.where)
    if trace.header is None:
        assert trace.records, f"{block.where}: no record read"
        calls = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
        assert len(trace.records) >= len(calls) - 1, f"{block.where}: lines left unread"
        return
    if trace.records:  # a whole trace: it replays, and agrees
        path = workdir / "example.jsonl"
        path.write_text(block.body)
        assert main(["replay", "--no-kvm", str(path)]) == 0, capsys.readouterr().out


def test_the_vmm_of_the_library_guide_has_the_lines_it_says() -> None:
    text = (DOCS / "library.md").read_text()
    said = re.search(r"A (\d+)-line VMM", text)
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert said and code
    lines = [ln for ln in code.group(1).splitlines() if ln.strip()]
    assert len(lines) == int(said.group(1)), f"the VMM has {len(lines)} lines"


def test_the_pages_link_each_other() -> None:
    """A page named in the text of another is a link to it, not plain text."""
    plain = re.compile(r"(?<![\[(/])`?(docs/)?(?P<page>[a-z-]+)\.md`?(?![)\]])")
    names = {p.stem for p in DOCS.glob("*.md")}
    for page in PAGES:
        text = _FENCE.sub("", page.read_text())  # code blocks may name files
        for number, line in enumerate(text.splitlines(), 1):
            for m in plain.finditer(line):
                if m.group("page") in names:
                    pytest.fail(f"{page.name}:{number}: {m.group(0)} is not a link")


# ----------------------------------------------------------------- the site


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


def test_the_environment_is_left_as_found() -> None:
    assert Path.cwd() != ROOT or os.environ.get("MEMSLOTS_TRACEBACK") is None
