"""Long runs say how far they are on standard error when it is not a terminal too (a
line every few seconds), and every numeric option of conform, replay and record has a
range (a value out of it is one usage line, status 2, before anything runs)."""

from __future__ import annotations

import re

import pytest

import memslots.tools.cli.progress as progress
from memslots.tools.cli import main
from memslots.tools.cli.progress import ProgressLines


def test_progress_lines_come_when_due(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ProgressLines("memslots x")
    lines.say("too early")  # PROGRESS_EVERY seconds have not passed
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)
    lines.say(lambda: "1/2 done")
    ProgressLines("memslots x", enabled=False).say("never")
    assert capsys.readouterr().err == "memslots x: 1/2 done\n"


def test_replay_reports_progress_into_a_pipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)
    assert main(["replay", "--no-kvm"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err and all(
        re.fullmatch(r"memslots replay: replaying on (engine|array): \d+/37 records", line)
        for line in err
    ), err
    assert "memslots replay: replaying on array: 37/37 records" in err


@pytest.mark.kvm
def test_conform_reports_progress_into_a_pipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)
    assert main(["conform", "--ops", "200", "--seed", "3", "--no-shrink"]) in (0, 1)
    err = capsys.readouterr().err.splitlines()
    assert "memslots conform: 128/200 operations, 0 disagreeing calls" in err or any(
        re.fullmatch(r"memslots conform: 128/200 operations, \d+ disagreeing calls?", line)
        for line in err
    ), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["conform", "--ops", "99999999999999999999999999"],
         "argument --ops: 99999999999999999999999999: must be in 1..10000000"),
        (["conform", "--ops", "0"], "argument --ops: 0: must be in 1..10000000"),
        (["conform", "--seed", "-1"], "argument --seed: -1: must be in 0..18446744073709551615"),
        (["conform", "--max-reproducers", "0"], "argument --max-reproducers: 0: must be in"),
        (["record", "--pid", "0"], "argument --pid: 0: must be in 1..4194304 (a process id)"),
        (["record", "--pid", "99999999"], "argument --pid: 99999999: must be in 1..4194304"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"memslots {argv[0]}: error: {message}"), err
