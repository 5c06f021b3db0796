"""``memslots record``: a C client (dynamic and static) and QEMU recorded live, then
replayed; exit status, Ctrl-C, a killed command, attaching; the seccomp filter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from errno import ENOTTY
from pathlib import Path

import pytest

from conftest import host_profile
from memslots.tools.cli import main
from memslots.tools.record.ptrace import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_TRACE,
    SYS_IOCTL,
    SYS_MADVISE,
    SYS_MUNMAP,
    run_filter,
    seccomp_data,
    seccomp_filter,
)
from memslots.tools.record.recorder import TRACED_REQUESTS, filter_rules
from memslots.tools.replay import replay_trace
from memslots.tools.traces import (
    ClearDirtyLog,
    CreateGuestMemfd,
    CreateVcpu,
    CreateVm,
    EnableCap,
    GetDirtyLog,
    MemslotCall,
    Munmap,
    ReleaseVm,
    load_trace,
)

CLIENT = Path(__file__).parent / "clients" / "memslot_client.c"
MEMSLOTS = [
    sys.executable,
    "-c",
    "import sys; from memslots.tools.cli import main; sys.exit(main())",
]
MB = 1 << 20


def _build(out: Path, static: bool) -> Path | None:
    if shutil.which("gcc") is None:
        return None
    cmd = ["gcc", "-O1", "-pthread", "-o", str(out), str(CLIENT)]
    if static:
        cmd.insert(1, "-static")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return out if done.returncode == 0 else None


@pytest.fixture(scope="module", params=["dynamic", "static"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C client, built by gcc (static needs libc.a: skipped without it)."""
    static = request.param == "static"
    built = _build(tmp_path_factory.mktemp("client") / f"client-{request.param}", static)
    if built is None:
        pytest.skip(f"gcc cannot build a {request.param} program here")
    return built


# --------------------------------------------------------------------------- the filter


def test_seccomp_filter_stops_only_on_the_traced_calls() -> None:
    prog = seccomp_filter(filter_rules())
    for request in TRACED_REQUESTS:
        assert run_filter(prog, seccomp_data(SYS_IOCTL, [5, request, 0])) == SECCOMP_RET_TRACE
        # the kernel's cmd is 32 bits: garbage above them changes nothing
        high = request | 0xDEAD << 32
        assert run_filter(prog, seccomp_data(SYS_IOCTL, [5, high, 0])) == SECCOMP_RET_TRACE
    kvm_run = 0xAE80
    assert run_filter(prog, seccomp_data(SYS_IOCTL, [5, kvm_run, 0])) == SECCOMP_RET_ALLOW
    assert run_filter(prog, seccomp_data(SYS_MUNMAP, [0, 4096])) == SECCOMP_RET_TRACE
    assert run_filter(prog, seccomp_data(SYS_MADVISE, [0, 4096, 4])) == SECCOMP_RET_TRACE
    assert run_filter(prog, seccomp_data(SYS_MADVISE, [0, 4096, 9])) == SECCOMP_RET_TRACE
    assert run_filter(prog, seccomp_data(SYS_MADVISE, [0, 4096, 14])) == SECCOMP_RET_ALLOW
    for nr in (0, 1, 9, 60, 231, 0x40000000 | SYS_IOCTL):  # read, write, mmap, exit, x32
        assert run_filter(prog, seccomp_data(nr, [5, TRACED_REQUESTS[0]])) == SECCOMP_RET_ALLOW
    i386 = 0x40000003
    assert run_filter(prog, seccomp_data(54, [5, TRACED_REQUESTS[0]], i386)) == SECCOMP_RET_ALLOW
    assert AUDIT_ARCH_X86_64 == 0xC000003E


# --------------------------------------------------------------------------- the client


@pytest.mark.kvm
def test_client_recorded_then_replayed(
    client: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the client binds a guest_memfd slot (two more calls) where the kernel has guest_memfd
    gmem_calls = 2 if host_profile().guest_memfd else 0
    out = tmp_path / "client.jsonl"
    status = main(["record", "-o", str(out), "--", str(client)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert f"memslots record: 3 VMs, {10 + gmem_calls} memslot calls" in captured.err
    trace = load_trace(out)
    assert trace.version == 2
    assert trace.end is not None and trace.end["status"] == 0
    creates = [r for r in trace.records if isinstance(r, CreateVm)]
    assert [c.vm for c in creates] == [0, 1, 2]
    assert creates[0].fd == creates[1].fd  # the closed VM's number, reused: a new VM
    calls = [r for r in trace.records if isinstance(r, MemslotCall)]
    assert {c.v2 for c in calls} == {False, True}
    assert {c.result for c in calls} == {0, 17, 22}  # OK, EEXIST, EINVAL
    vm0 = [r for r in trace.records if r.vm == 0]
    assert len({r.tid for r in vm0}) == 2  # the second thread's call is VM 0's too
    kinds = {type(r) for r in trace.records}
    assert {CreateGuestMemfd, CreateVcpu, EnableCap, GetDirtyLog, ClearDirtyLog} <= kinds
    gmem = next(r for r in trace.records if isinstance(r, CreateGuestMemfd))
    bound = [c for c in calls if c.flags & 4]
    if gmem_calls:
        assert gmem.fd is not None and {c.guest_memfd for c in bound} == {gmem.fd}
    else:
        assert gmem.result == ENOTTY and not bound
    [unmap] = [r for r in trace.records if isinstance(r, Munmap)]
    assert unmap.length == MB
    released = [r.vm for r in trace.records if isinstance(r, ReleaseVm)]
    assert released[0] == 0  # VM 0 (closed before the munmap) is gone by then

    report = replay_trace(trace, kernel=True)
    assert report.ok, [vm.disagreements() for vm in report.vms]
    assert [vm.vm for vm in report.vms] == [0, 1, 2]
    for vm in report.vms:
        assert vm.runs["kernel"].status == "ok"
        for a, b, compared, agree in vm.agreement_pairs():
            assert compared == agree, (vm.vm, a, b)
        pairs = {(a, b): c for a, b, c, _ in vm.agreement_pairs()}
        assert pairs[("kernel", "recorded")] == len(vm.records)
    [hazard] = report.hazards
    assert (hazard.vm, hazard.slot) == (1, 1)
    assert (hazard.gfn_start, hazard.gfn_end) == (0x300, 0x400)
    assert (hazard.base_gfn, hazard.npages) == (0x200, 0x200)
    assert hazard.call is not None and hazard.call.line == unmap.line

    status = main(["replay", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 0
    assert [(v["vm"], v["calls"], v["disagreements"]) for v in doc["vms"]] == [
        (0, 6 + gmem_calls, []),
        (1, 2, []),
        (2, 2, []),
    ]
    assert [(h["vm"], h["slot"], h["gfn_start"]) for h in doc["hazards"]] == [(1, 1, 0x300)]


# --------------------------------------------------------------------------- exit status


def _run_recorder(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEMSLOTS, "record", *argv], capture_output=True, text=True, timeout=timeout
    )


def test_exit_status_is_the_commands(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    done = _run_recorder("-q", "-o", str(out), "--", "sh", "-c", "exit 7")
    assert done.returncode == 7, done.stderr
    assert done.stderr == ""
    killed = _run_recorder("-o", str(out), "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9
    assert "was killed" not in killed.stderr  # the program died; the recorder did not kill it
    end = json.loads(out.read_text().splitlines()[-1])
    assert end == {**end, "kind": "end", "status": 137, "reason": "exited"}


def test_command_not_found_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["record", "--", "no-such-command-here"]) == 127
    assert "no-such-command-here: command not found" in capsys.readouterr().err
    assert main(["record"]) == 2
    assert "nothing to record" in capsys.readouterr().err
    assert main(["record", "--pid", "1", "--", "true"]) == 2
    assert "not both" in capsys.readouterr().err


def test_statuses_as_a_shell_gives_them_and_as_the_table_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/cli.md's table: 126 for a command that cannot be run, 127 for none, 2 for a
    process that does not exist or cannot be traced and for a trace that cannot be
    written; the ptrace request by name and the cause."""
    text = tmp_path / "notes.txt"
    text.write_text("not a program\n")
    for command, status, message in (
        (str(text), 126, f"{text}: Permission denied"),
        (str(tmp_path), 126, f"{tmp_path}: Permission denied"),
        (str(tmp_path / "nosuch"), 127, f"{tmp_path / 'nosuch'}: No such file or directory"),
    ):
        assert main(["record", "-o", str(tmp_path / "t.jsonl"), "--", command]) == status
        assert capsys.readouterr().err == f"memslots record: error: {message}\n"
    free = next(pid for pid in range(4194304, 1, -1) if not Path(f"/proc/{pid}").exists())
    assert main(["record", "-o", str(tmp_path / "t.jsonl"), "--pid", str(free)]) == 2
    assert capsys.readouterr().err == f"memslots record: error: --pid {free}: no such process\n"
    me = os.getpid()
    assert main(["record", "-o", str(tmp_path / "t.jsonl"), "--pid", str(me)]) == 2
    assert capsys.readouterr().err == (
        f"memslots record: error: cannot trace: ptrace(PTRACE_SEIZE, {me}): Operation not"
        " permitted (a process cannot trace itself)\n"
    )
    assert main(["record", "-o", str(tmp_path / "no" / "t.jsonl"), "--", "true"]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_a_reader_of_standard_output_that_goes_away_ends_it_silently() -> None:
    """``record -o - | head -c 100``: the reader leaves, the recording ends quietly."""
    proc = subprocess.Popen(
        [*MEMSLOTS, "record", "-o", "-", "--", "sleep", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the end record is written
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")


def test_ctrl_c_leaves_a_complete_trace(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen(
        [*MEMSLOTS, "record", "-o", str(out), "--", "sh", "-c", "sleep 30"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _children(proc.pid):
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["format"] == "memslots-trace"
    assert lines[-1]["kind"] == "end"
    assert lines[-1]["status"] == 128 + signal.SIGINT


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_attach_then_detach_leaves_the_process_running(tmp_path: Path) -> None:
    target = subprocess.Popen(["sleep", "30"])
    out = tmp_path / "t.jsonl"
    try:
        proc = subprocess.Popen(
            [*MEMSLOTS, "record", "-o", str(out), "--pid", str(target.pid)],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "TracerPid:\t0" in _status(target.pid):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "was detached and runs on" in err
        assert target.poll() is None  # still running
        assert "TracerPid:\t0" in _status(target.pid)
        end = json.loads(out.read_text().splitlines()[-1])
        assert end["reason"] == "detached"
    finally:
        target.kill()
        target.wait(timeout=10)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------- QEMU


@pytest.mark.kvm
def test_qemu_recorded_live(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    out = tmp_path / "qemu.jsonl"
    vm = [qemu, "-accel", "kvm", "-m", "128", "-display", "none", "-nodefaults"]
    vm += ["-serial", "none", "-no-reboot"]
    done = _run_recorder("-o", str(out), "--", "timeout", "3", *vm, timeout=60)
    assert done.returncode == 124, done.stderr  # ended by timeout, the recorder survived
    trace = load_trace(out)
    assert trace.end is not None and trace.end["status"] == 124
    [info] = trace.vms()
    assert info.calls >= 10
    report = replay_trace(trace, kernel=True)
    assert report.ok
    agreeing, compared = report.agreement()
    assert agreeing == compared >= info.calls
