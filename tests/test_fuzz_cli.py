"""Fuzzing (hypothesis) of the trace readers and the command line: whatever the file
contents and whatever the arguments, the outcome is exactly

- readers: a trace, or a :class:`TraceFormatError` whose text is one line naming the
  source (``SOURCE:LINE: message``);
- ``memslots``: an exit status in {0, 1, 2, 130} (127 too for ``record``, a command that
  does not exist), no traceback and no ``internal error`` on stderr, and a failure said in
  exactly one line ``memslots CMD: ...``.

The inputs are lines of the real traces (QEMU, strace, JSON Lines v1 and v2) whole and
mutated (cut, spliced, numbers made huge or negative), JSON objects built from the
formats' keys, and random text and bytes. Commands that would run for long (bench, stress,
a random conform run, record) are stood in for by an interruption once their arguments
have been checked: that is where the fuzzing of their arguments ends. Runs in a few
seconds (atheris was not used: coverage-guided fuzzing pays off over minutes of runs, and
CI has seconds for it; the readers' branches are few and driven by the corpus here).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memslots.tools.bench as bench_mod
import memslots.tools.bench_dirty as bench_dirty_mod
import memslots.tools.cli.conform as cli_conform
import memslots.tools.cli.stress as cli_stress
import memslots.tools.record as record_mod
from memslots.tools.cli import SUBCOMMANDS, main
from memslots.tools.traces import (
    FORMATS,
    TraceFormatError,
    load_trace,
    read_embedded_trace,
    read_jsonl,
    read_qemu_log,
    read_strace,
    write_trace,
)

DATA = Path(__file__).parent / "data" / "traces"
#: examples per test: 100 in CI (a few seconds); MEMSLOTS_FUZZ_EXAMPLES=5000 for a long run
SETTINGS = settings(
    max_examples=int(os.environ.get("MEMSLOTS_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def _corpus() -> list[str]:
    lines: list[str] = []
    for name in ("seabios.log", "pci-churn.strace.log", "migrate-dirty-log.log"):
        lines += (DATA / name).read_text().splitlines()[:40]
    v2 = io.StringIO()
    trace = load_trace(list(read_embedded_trace_lines()), source="seabios")
    write_trace(trace, v2, {"name": "fuzz"})
    lines += v2.getvalue().splitlines()
    lines += [
        '{"slot": 1, "flags": 0, "guest_phys_addr": 4096, "memory_size": 4096,'
        ' "userspace_addr": "0x7f0000000000", "result": "EEXIST"}',
        '{"op": "set_user_memory_region", "slot": 0, "flags": 0, "guest_phys_addr": 0,'
        ' "memory_size": 4096, "userspace_addr": 4096}',
        '{"kind": "end", "status": 0, "reason": "exited", "records": 1}',
        "# a comment",
        "",
    ]
    return lines


def read_embedded_trace_lines() -> Iterator[str]:
    """The embedded QEMU trace as lines (``read_embedded_trace`` gives calls)."""
    assert read_embedded_trace()  # the embedded trace is there
    yield from (DATA / "seabios.log").read_text().splitlines(keepends=True)


CORPUS = _corpus()
KEYS = [
    *("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "result", "v2"),
    *("kind", "vm", "format", "version", "op", "guest_memfd", "guest_memfd_offset", "fd"),
    *("size", "pages", "first_page", "num_pages", "cap", "args", "addr", "len", "pid"),
]
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 4096, 2**32 - 1, 2**32, 2**64 - 1, 2**64, -1]),
    st.integers(1, 4000).map(lambda n: int("9" * n)),
)


def _json_value() -> st.SearchStrategy[str]:
    scalar = st.one_of(
        NUMBERS.map(str),
        st.sampled_from(['"0x1000"', '"0x"', '"EEXIST"', '"OK"', "null", "true", "[]", "{}",
                         '"set_user_memory_region"', '"memslots-trace"', "1e400", "-0"]),
        st.text(max_size=8).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
    )  # fmt: skip
    return scalar


@st.composite
def json_line(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=8))
    return "{" + ", ".join(f'"{k}": {draw(_json_value())}' for k in keys) + "}"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["cut", "splice", "number", "char", "dup"]))
        i = draw(st.integers(0, len(line)))
        if op == "cut":
            line = line[:i] + line[draw(st.integers(i, len(line))) :]
        elif op == "splice":
            line = line[:i] + draw(st.sampled_from(CORPUS)) + line[i:]
        elif op == "number":
            line = line[:i] + str(draw(NUMBERS)) + line[i:]
        elif op == "char":
            line = line[:i] + draw(st.text(min_size=1, max_size=3)) + line[i:]
        else:
            line = line + line
    return line


LINE = st.one_of(st.sampled_from(CORPUS), mutated(), json_line(), st.text(max_size=40))
CONTENT = st.one_of(
    st.lists(LINE, max_size=12).map(lambda ls: "\n".join(ls) + "\n"),
    st.lists(st.sampled_from(CORPUS), max_size=30).map("\n".join),
)


def assert_one_line_error(err: str, where: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(where), err


# ----------------------------------------------------------------- the readers


@SETTINGS
@given(CONTENT, st.sampled_from([None, *FORMATS]), st.booleans())
def test_readers_give_a_trace_or_one_line(text: str, fmt: str | None, skip_bad: bool) -> None:
    lines = text.splitlines(keepends=True)
    try:
        trace = load_trace(lines, fmt=fmt, skip_bad=skip_bad, source="fuzz")  # type: ignore[arg-type]
    except TraceFormatError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("fuzz")
    else:
        assert len(trace.records) <= len(lines)
    for reader in (read_qemu_log, read_strace, read_jsonl):
        errors: list[TraceFormatError] = []
        records = list(reader(lines, "fuzz", skip_bad=True, errors=errors))
        assert all("\n" not in str(e) for e in errors)
        assert len(records) + len(errors) <= len(lines)


@SETTINGS
@given(st.binary(max_size=300))
def test_readers_of_any_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t"
        path.write_bytes(data)
        try:
            load_trace(path)
        except TraceFormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path))


# ----------------------------------------------------------------- the command line


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A scratch working directory (``--record``, ``-o`` write there), and the long
    runs stood in for by an interruption once the arguments are checked."""
    monkeypatch.chdir(tmp_path)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    for module, name in ((bench_mod, "run"), (bench_dirty_mod, "run"),
                         (cli_stress, "run_stress"), (cli_conform, "run_conform"),
                         (record_mod, "record")):  # fmt: skip
        monkeypatch.setattr(module, name, interrupted)
    return tmp_path


def check_run(argv: list[str], capsys: pytest.CaptureFixture[str], extra: set[int]) -> int:
    status = main(argv)
    err = capsys.readouterr().err
    assert status in {0, 1, 2, 130} | extra, (argv, status, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if status:
        command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
        where = f"memslots {command}".rstrip()
        if status != 1 or err:  # replay/conform: 1 is a disagreement, reported on stdout
            assert_one_line_error(err, where)
    return status


REPLAY_FLAGS = st.lists(
    st.sampled_from([["--json"], ["--skip-bad"], ["--calls"], ["--impl", "engine"],
                     ["--impl", "array"], ["--format", "qemu"], ["--format", "strace"],
                     ["--format", "jsonl"], ["--record", "out.jsonl"]]),
    max_size=3,
)  # fmt: skip


@SETTINGS
@given(CONTENT | st.binary(max_size=200).map(lambda b: b.decode("latin-1")), REPLAY_FLAGS)
def test_replay_and_conform_of_any_file(
    workdir: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[list[str]]
) -> None:
    path = workdir / "input"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    argv = ["replay", "--no-kvm", *(x for f in flags for x in f), str(path)]
    check_run(argv, capsys, set())
    check_run(["conform", "--replay", str(path)], capsys, set())


TOKENS = st.sampled_from(
    ["--json", "--quick", "--no-progress", "--kvm", "--no-kvm", "--calls", "--skip-bad",
     "--seconds", "--readers", "--seed", "--max-slots", "--fault-rate", "--ops", "--slots",
     "--counts", "--duration", "--repetitions", "--impl", "--scenario", "--cpu", "--dirty",
     "--plot", "--format", "--record", "--replay", "--device", "--max-reproducers",
     "--switch-interval-us", "--no-shrink", "-o", "--pid", "-q", "--", "-", "--version",
     "--help", "0", "1", "-1", "7", "1e9", "nan", "inf", "", "x", "none", "all", "engine",
     "tree,array", "setup", "16,64", "64,16", "jsonl", "qemu", "out.json", "/dev/null",
     "/nonexistent/x", "/dev/kvm", "true", "no-such-command-for-fuzz"]
)  # fmt: skip


@SETTINGS
@given(st.sampled_from([*SUBCOMMANDS, "nosuch", "--version"]), st.lists(TOKENS, max_size=6))
def test_any_arguments_of_any_command(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str, tokens: list[str]
) -> None:
    if command == "conform" and "--replay" not in tokens and "--device" not in tokens:
        tokens = ["--replay", "/dev/null", *tokens]  # stays off the kernel's random run
    check_run([command, *tokens], capsys, {126, 127} if command == "record" else set())
    assert not [p for p in os.listdir(workdir) if p.startswith("/")]
