"""What is not a trace is told so in the same words by every reader: binary files, a
trace given where a conform reproducer belongs, malformed lines (with the hint that
``--skip-bad`` exists where it does), and a mistyped device path."""

from __future__ import annotations

from pathlib import Path

import pytest

from memslots.tools.cli import main

V2_TRACE = (
    '{"format": "memslots-trace", "version": 2}\n'
    '{"kind": "create_vm", "vm": 0, "pid": 7, "type": 0, "result": 0}\n'
)
QEMU_LINE = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n"
BINARIES = {
    "elf": b"\x7fELF\x02\x01\x01\x00\x00\x00\n{ later a brace\n",
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "random": bytes(range(256)),
    "latin-1": "caf\xe9 kvm_set_user_memory\n".encode("latin-1"),
}


def one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return status, err.rstrip("\n")


@pytest.mark.parametrize("kind", sorted(BINARIES))
def test_a_binary_file_is_not_a_trace_nor_a_reproducer(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"f.{kind}"
    path.write_bytes(BINARIES[kind])
    status, err = one_line(capsys, "replay", "--no-kvm", str(path))
    assert status == 2
    assert err == f"memslots replay: error: {path}:1: binary data, not text: not a memslot trace"
    status, err = one_line(capsys, "conform", "--replay", str(path))
    assert status == 2
    assert err.startswith(f"memslots conform: error: {path}:1: binary data, not text: not a"
                          " conform reproducer")  # fmt: skip


@pytest.mark.parametrize("content", [V2_TRACE, QEMU_LINE], ids=["v2 trace", "QEMU log"])
def test_a_trace_given_to_conform_replay_is_sent_to_replay(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    status, err = one_line(capsys, "conform", "--replay", str(path))
    assert status == 2
    assert err == (
        f"memslots conform: error: {path} is a memslots trace, not a conform reproducer:"
        f" use memslots replay {path}"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"slot": 0, "flags": 0, "guest_phys_addr": "ab\n',
         "1: bad JSON: Unterminated string starting at column 44"),
        ('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 1' + "0" * 40
         + ', "userspace_addr": 4096}\n',
         "1: memory_size is out of range (u64): a number of 41 digits"),
        ('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096}\n',
         "1: missing userspace_addr"),
    ],
    ids=["truncated", "huge number", "missing key"],
)  # fmt: skip
def test_a_malformed_line_is_worded_cleanly_and_names_skip_bad(
    line: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(line)
    status, err = one_line(capsys, "replay", "--no-kvm", str(path))
    assert status == 2
    assert err == f"memslots replay: error: {path}:{message} (--skip-bad skips such lines)"
    assert " at at " not in err


def test_the_skip_bad_hint_only_where_it_helps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.log"
    path.write_bytes(b"\x00\x01\x02 binary\n")
    status, err = one_line(capsys, "replay", "--no-kvm", str(path))
    assert status == 2 and "--skip-bad" not in err  # the whole input, not a line
    path.write_text("# only a comment\n" + QEMU_LINE.replace("ret=0", "ret=zz"))
    status, err = one_line(capsys, "replay", "--no-kvm", "--skip-bad", str(path))
    assert status == 2 and "no memslot calls found" in err and "1 malformed line skipped" in err


def test_a_mistyped_device_is_no_such_file(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = one_line(capsys, "conform", "--device", "/nonexistent")
    assert status == 2
    assert err == "memslots conform: error: --device /nonexistent: no such file"
    assert "kvm_intel" not in err
