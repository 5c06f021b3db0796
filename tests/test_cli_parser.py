"""The top-level command line: ``--version`` and ``--help`` load no subcommand, every
subcommand is still listed with its help and has a description, a bare ``memslots`` is
a one-line usage error, and options that exclude each other are refused together."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from memslots.tools.cli import COMMANDS, SUBCOMMANDS, build_parser, command_of, main

#: modules that only a subcommand needs: none of them may load for --version or --help
HEAVY = (
    "memslots.tools.replay",
    "memslots.tools.bench",
    "memslots.tools.mapview",
    "memslots.kvm",
    "memslots.tools.conform",
    "memslots.tools.stress",
    "memslots.tools.record",
    "memslots.tools.traces",
    "rich",
)


def imported_modules(*argv: str) -> set[str]:
    """The modules ``python -X importtime -m memslots ARGV`` imports (``import``
    statements; importtime does not see ``importlib.import_module``, so the modules left
    in ``sys.modules`` are added)."""
    code = (
        "import sys, runpy; sys.argv[0] = 'memslots'\n"
        "try:\n    runpy.run_module('memslots', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('modules:', *sys.modules, file=sys.stderr)"
    )
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    timed = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}
    loaded = next(ln for ln in lines if ln.startswith("modules: ")).split()[1:]
    return timed | set(loaded)


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_import_no_subcommand(argv: list[str]) -> None:
    modules = imported_modules(*argv)
    assert "memslots.tools.cli" in modules
    loaded = sorted(m for m in modules for h in HEAVY if m == h or m.startswith(h + "."))
    assert not loaded, f"memslots {' '.join(argv)} imports {loaded}"
    subcommands = {f"memslots.tools.cli.{name}" for name in SUBCOMMANDS}
    assert not modules & subcommands


def test_a_subcommand_loads_only_its_own_module() -> None:
    modules = imported_modules("demo", "--help")
    assert "memslots.tools.cli.demo" in modules
    assert not {"memslots.tools.cli.replay", "memslots.tools.replay"} & modules


def test_help_lists_every_subcommand_with_the_help_its_parser_gives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    light = capsys.readouterr().out
    full = build_parser()
    for name, help_text in COMMANDS:
        assert re.search(rf"^    {name} ", light, re.M), name
        choice = next(a for a in full._subparsers._group_actions[0]._choices_actions  # type: ignore[union-attr]
                      if a.dest == name)  # fmt: skip
        assert choice.help == help_text, name
    assert full.format_help() == light


@pytest.mark.parametrize(
    ("argv", "command"),
    [([], None), (["--version"], None), (["replay", "x"], "replay"), (["-h", "demo"], "demo"),
     (["--", "bench"], "bench"), (["nosuch"], "nosuch")],
)  # fmt: skip
def test_command_of(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def test_bare_memslots_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("memslots: error: no command given: one of replay, ")
    assert err.endswith("(memslots --help lists the options)\n")


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_a_description(name: str) -> None:
    parser = build_parser([name]).subcommands[name]  # type: ignore[attr-defined]
    assert parser.description and len(parser.description) > 20, name


def test_kvm_and_no_kvm_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--kvm", "--no-kvm"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "not allowed with argument" in err


def test_every_subcommand_module_imports_on_its_own() -> None:
    """A subcommand's module is the first of the package a run imports: each must load
    alone, whatever order the others would have loaded in (an import cycle hidden by
    that order shows here)."""
    modules = [f"memslots.tools.cli.{name}" for name in SUBCOMMANDS]
    modules += ["memslots.tools.traces", "memslots.profiles", "memslots.kvm"]
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", f"import {m}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in modules
    }
    failed = {}
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        if proc.returncode:
            failed[m] = err.strip().splitlines()[-1]
    assert not failed, failed
