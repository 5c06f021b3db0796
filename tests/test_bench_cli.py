"""``memslots bench``, ``bench --dirty``, ``stress`` and the examples: every numeric option
has a range, options a mode does not use are refused, numbers come with their spread and
a verdict only from enough repetitions, tables have their titles and notes as plain
lines, and long runs report progress on a standard error that is no terminal."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from memslots.constants import KVM_USER_MEM_SLOTS_X86
from memslots.tools import bench as bench_mod
from memslots.tools.bench import (
    OPS,
    BenchConfig,
    BenchResults,
    SweepPoint,
    cpu_ranges,
    run,
)
from memslots.tools.cli import main
from memslots.tools.cli.bench import criteria_lines, print_results
from memslots.tools.cli.progress import LineProgress

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _must_not_run(*args: object, **kwargs: object) -> Any:
    raise AssertionError("the benchmark ran")


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err[:-1]


# --- ranges ------------------------------------------------------------------------------
def test_cpu_ranges_in_the_kernels_cpulist_format() -> None:
    assert cpu_ranges({0, 1}) == "0-1"
    assert cpu_ranges({0}) == "0"
    assert cpu_ranges({0, 2, 3, 4, 7}) == "0,2-4,7"


def test_bench_cpu_must_be_an_available_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_mod, "run", _must_not_run)
    cpus = os.sched_getaffinity(0)
    absent = max(cpus) + 1
    for value in (str(absent), "-1"):
        assert main(["bench", "--cpu", value]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert _one_line(err) == (
            f"memslots bench: error: --cpu {value}: not an available CPU ({cpu_ranges(cpus)})"
        )
    with pytest.raises(ValueError, match="not an available CPU"):
        BenchConfig(cpu=absent).validate()


def test_bench_numeric_options_have_ranges(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_mod, "run", _must_not_run)
    for argv, message in (
        (["--slots", "3"], "argument --slots: 3: must be in 4..32764"),
        (["--slots", "32765"], "argument --slots: 32765: must be in 4..32764"),
        (["--counts", "4,99999"], "slot counts must be in 4..32764"),
        (["--repetitions", "0"], "repetitions must be in 1..1000"),
        (["--duration", "61"], "duration must be in (0, 60]"),
        (["--dirty", "--repetitions", "0"], "repetitions must be in 1..1000, not 0"),
        (["--dirty", "--repetitions", "1001"], "repetitions must be in 1..1000, not 1001"),
    ):
        assert main(["bench", *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and message in _one_line(err), (argv, err)


def test_bench_dirty_refuses_the_options_it_does_not_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from memslots.tools import bench_dirty

    monkeypatch.setattr(bench_dirty, "run", _must_not_run)
    for option in (["--impl", "tree"], ["--scenario", "setup"], ["--slots", "16"],
                   ["--counts", "16"], ["--duration", "1"], ["--cpu", "0"], ["--cpu", "none"],
                   ["--plot", "x.png"]):  # fmt: skip
        assert main(["bench", "--dirty", *option]) == 2, option
        out, err = capsys.readouterr()
        assert out == ""
        assert _one_line(err).startswith(
            f"memslots bench: error: --dirty does not use {option[0]} "
        ), err


def test_stress_seed_has_a_range(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("-1", str(1 << 64)):
        assert main(["stress", "--seed", value]) == 2
        _, err = capsys.readouterr()
        assert "--seed must be in 0..2^64-1" in _one_line(err)


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_live_migration_example_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    example = _example("live_migration")
    for argv, message in (
        (["--dirty-ring", "--ring-bytes", "7"], "--ring-bytes: 7: must be in 4096..1048576"),
        (["--dirty-ring", "--ring-bytes", "12288"], "12288: must be a power of two"),
        (["--dirty-ring", "--ring-bytes", "2097152"], "2097152: must be in 4096..1048576"),
        (["--ring-bytes", "4096"], "--ring-bytes needs --dirty-ring"),
        (["--threshold", "-5"], "--threshold: -5: must be in 0..256"),
        (["--max-rounds", "0"], "--max-rounds: 0: must be in 1..1000"),
        (["--bandwidth", "nan"], "--bandwidth: nan: must be in 0..1e6"),
        (["--bandwidth", "-1"], "--bandwidth: -1: must be in 0..1e6"),
    ):
        with pytest.raises(SystemExit) as info:
            example.main(argv)
        assert info.value.code == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        assert err.splitlines()[-1].endswith(message), (argv, err)


# --- statistics and verdicts -------------------------------------------------------------
def _results(repetitions: int, runs: dict[tuple[str, int], list[float]]) -> BenchResults:
    """Results of a sweep over 64 and 32764 slots with the given runs of every op."""
    cfg = BenchConfig(counts=(64, KVM_USER_MEM_SLOTS_X86), repetitions=repetitions,
                      impls=("tree", "array"), scenarios=("sweep",), cpu=None)  # fmt: skip
    r = BenchResults(cfg, {"build": "compiled"})
    for (impl, count), values in runs.items():
        for op in OPS:
            r.sweep.append(SweepPoint(impl, count, op, sorted(values)[len(values) // 2],
                                      len(values), runs=list(values)))  # fmt: skip
    r.compute_criteria()
    return r


def test_numbers_are_medians_and_ratios_come_with_their_range() -> None:
    top = KVM_USER_MEM_SLOTS_X86
    r = _results(3, {("tree", 64): [5.0, 5.0, 5.0], ("tree", top): [5.0, 9.0, 6.0],
                     ("array", top): [600.0, 450.0, 3000.0]})  # fmt: skip
    assert r.point("tree", top, "move") == 6.0  # the median, not the best (5.0)
    assert r.runs("tree", top, "mean") == [5.0, 9.0, 6.0]
    c = r.criteria
    assert c["repetitions"] == 3 and c["judged"] is True
    # per repetition: 600/5, 450/9, 3000/6 -> median 120, range 50..500
    assert c["array_vs_tree_at_top"]["create"] == pytest.approx(120.0)
    assert c["array_vs_tree_at_top_range"]["create"] == pytest.approx([50.0, 500.0])
    assert c["array_vs_tree_at_top_ok"] is True
    assert c["tree_top_vs_64_ok"] is True  # 6/5 on the median
    lines = criteria_lines(r)
    assert any("met[/green] (on the medians of 3 repetitions)" in line for line in lines)
    assert any("(50.0x-500x)" in line for line in lines)


def test_one_repetition_gives_an_indicative_outcome_not_a_verdict() -> None:
    top = KVM_USER_MEM_SLOTS_X86
    r = _results(1, {("tree", 64): [5.0], ("tree", top): [11.0], ("array", top): [600.0]})
    c = r.criteria
    assert c["judged"] is False
    assert not any(key.endswith("_ok") for key in c)
    assert c["tree_top_vs_64_indicative"] is False and c["array_vs_tree_at_top_indicative"]
    text = "\n".join(criteria_lines(r))
    assert "NOT MET" not in text and "[green]" not in text
    assert text.count("indicative (1 repetition)") == 2
    assert "not met in this run" in text


# --- tables, notes and legend ------------------------------------------------------------
def test_titles_notes_and_legend_are_plain_lines_that_match_the_table() -> None:
    cfg = BenchConfig(slots=16, counts=(4, 16, 64), duration=0.001, repetitions=1,
                      impls=("tree", "array"), scenarios=("setup", "sweep"), cpu=None,
                      array_limit=20)  # fmt: skip
    results = run(cfg)
    buf = io.StringIO()
    print_results(results, Console(file=buf, width=60, color_system=None))
    text = buf.getvalue()
    lines = text.splitlines()
    # titles and notes are whole lines, however narrow the table
    assert "memslot_perf_test scenarios, 16 slots: time per iteration (one repetition)" in lines
    assert "Per-operation cost with N slots present: µs per operation (one repetition)" in lines
    note = "note: array (ArrayVm): swept up to 16 slots, not beyond 20 (its updates cost O(n):"
    assert any(line.startswith(note) for line in lines), text
    # the array's cells at 64 slots carry the one mark of an unmeasured cell
    row64 = next(line for line in lines if line.startswith("│    64 │ create"))
    assert row64.split("│")[4].strip() == "-", row64
    assert any(line.startswith("-: not measured at this count") for line in lines)
    # the legend names what ran, nothing else
    assert any(line.startswith("tree: memslots.Vm") for line in lines)
    assert any(line.startswith("array: memslots.baseline.ArrayVm") for line in lines)
    for absent in ("unicorn:", "vm-mem*:", "KvmVm:", "ioctl:", "pure:"):
        assert not any(line.startswith(absent) for line in lines), absent


def test_the_vm_memory_peer_is_named_a_python_model() -> None:
    cfg = BenchConfig(counts=(4, 16), duration=0.001, repetitions=1,
                      impls=("tree", "vmmemory"), scenarios=("sweep",), cpu=None)  # fmt: skip
    text = "\n".join(criteria_lines(run(cfg)))
    assert "a Python model of rust-vmm's vm-memory (not the crate) vs tree at 16 slots" in text


# --- progress ----------------------------------------------------------------------------
def test_line_progress_says_each_phase_and_then_every_few_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = LineProgress(every=3600.0)
    p.phase("per-operation sweep", 10)
    p.advance(4)  # within the interval: no line
    p.every = 0.0
    p.advance(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "memslots bench: per-operation sweep 0/10, 0 s"
    assert lines[1].startswith("memslots bench: per-operation sweep 6/10, ")
    assert len(lines) == 2


def test_bench_into_a_file_reports_progress_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--scenario", "setup,sweep", "--slots", "8", "--counts", "4,8", "--impl",
            "tree", "--duration", "0.001", "--repetitions", "1", "--cpu", "none"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "memslots bench: scenarios with 8 slots 0/1, 0 s" in err.splitlines()
    assert "memslots bench: per-operation sweep 0/" in err
    assert "scenarios with 8 slots" not in out  # progress is not mixed into the results


def test_bench_dirty_reports_progress_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dirty", "--repetitions", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("memslots bench --dirty: dirty-page harvest 0/")
    assert "(one repetition)" in out


def test_stress_reports_progress_within_two_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    """A 2.5 s run shows progress (the first line comes after 1.5 s; it used to come
    after 10 s only, so a default run showed none)."""
    assert main(["stress", "--seconds", "2.5"]) == 0
    _, err = capsys.readouterr()
    assert any(line.startswith("memslots stress: ") for line in err.splitlines()), err


# --- the documented times and counts -------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _measured(command: str) -> str:
    """The range docs/benchmarks.md's "How long a run takes" table gives for ``command``
    (the text of its cell up to the first parenthesis or comma)."""
    import re

    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    m = re.search(r"^\| " + re.escape(command) + r"[^|]* \| ([^|(,]+?) *[(,|]", text, re.M)
    assert m is not None, command
    return m.group(1)


def test_the_docs_quote_the_measured_times_and_counts() -> None:
    """README, the command line's page, the dirty-ring page and ``bench --help`` give
    the ranges measured in docs/benchmarks.md, not numbers of their own."""
    from memslots.tools.cli.bench import FULL_TIME, QUICK_TIME

    def words(*path: str) -> str:  # the text with line breaks as spaces
        return " ".join(ROOT.joinpath(*path).read_text(encoding="utf-8").split())

    readme, cli, ring = words("README.md"), words("docs", "cli.md"), words("docs", "dirty-ring.md")
    quick = _measured("`memslots bench --quick`")
    full = _measured("`memslots bench` (the full run)")
    make = _measured("the first `make run`")
    assert quick == QUICK_TIME and full == FULL_TIME
    assert f"`memslots bench --quick` takes {quick} on 2 CPUs" in readme
    assert f"the full run {full}." in readme
    assert f"`--quick` takes {quick} on 2 CPUs" in cli and f"the full run {full}." in cli
    assert f"first `make run` takes {make} on 2 CPUs" in readme
    conform = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    row = next(line for line in conform.splitlines() if "`memslots conform --ops 20000`" in line)
    ops = row.split("with ", 1)[1].split(" dirty-ring operations")[0]
    assert f"({ops} of the operations enable rings" in readme
    assert f"{ops} ring operations" in ring


def test_demo_titles_are_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Each step's title is a line of its own above its table, not a rich title that
    wraps at the table's width."""
    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rejected = "create slot 3 overlapping slot 2 (rejected) -> EEXIST"
    line = next(line for line in lines if line.startswith(rejected))
    assert line.endswith("; generation 12"), line
    assert any(line.startswith("delete slot 0 (DELETE) -> ok (") for line in lines)
