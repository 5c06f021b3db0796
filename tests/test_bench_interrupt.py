"""Ctrl-C of ``memslots bench`` while its worker processes run: one line, status 130, no
traceback from any process, no worker and no copy of the pure build left behind.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, so each test
starts the command in a process group of its own and signals the group, as ``timeout
-s INT`` and a terminal do. ``TMPDIR`` points at the test's own directory, where the
pure worker's copy of the sources would be (``bench_peers.TEMP_PREFIX``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memslots.tools.bench_peers import TEMP_PREFIX

PYTHON = sys.executable


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _start(argv: list[str], tmp: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, TMPDIR=str(tmp))
    env.pop("MEMSLOTS_TRACEBACK", None)
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,  # the group the "terminal" signals
        # SIGINT's default disposition, as in a terminal (a background job of a shell
        # inherits it ignored, and Python then raises no KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_gone(pids: set[int]) -> set[int]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return left
        time.sleep(0.05)
    return {p for p in pids if _alive(p)}


def test_ctrl_c_of_bench_while_its_workers_run(tmp_path: Path) -> None:
    p = _start(
        [PYTHON, "-m", "memslots", "bench", "--quick", "--scenario", "sweep", "--cpu", "none",
         "--no-progress"],
        tmp_path,
    )  # fmt: skip
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        while not workers and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = _children(p.pid)
        assert workers, "the sweep started no worker process"
        time.sleep(0.3)  # the workers import and start timing
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in err, err
    assert err == "memslots bench: interrupted\n", err
    assert p.returncode == 130
    assert _wait_gone(workers) == set()
    assert [e.name for e in tmp_path.iterdir() if e.name.startswith(TEMP_PREFIX)] == []


#: a pure worker started and stopped in a loop; the ready byte tells when it started
_LOOP = """
import os, sys
from memslots.tools.bench_peers import EngineWorker
os.write(int(sys.argv[1]), b"x")
try:
    while True:
        w = EngineWorker("tree", pure=True)
        try:
            w.grow(16, 0x7F0000000000, 0x4000)
        finally:
            w.close()
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_at_any_moment_of_a_pure_worker_leaves_no_copy(tmp_path: Path) -> None:
    """SIGINT to the group while pure workers are copied, started, asked and closed:
    the parent's own KeyboardInterrupt is the only outcome (no worker traceback) and
    the copy of the sources is removed whatever the moment."""
    for delay in (0.0, 0.05, 0.12, 0.2, 0.35, 0.5):
        ready, ready_w = os.pipe()
        env = dict(os.environ, TMPDIR=str(tmp_path))
        p = subprocess.Popen(
            [PYTHON, "-c", _LOOP, str(ready_w)],
            pass_fds=(ready_w,),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(ready_w)
        try:
            assert os.read(ready, 1) == b"x"
            time.sleep(delay)
            workers = _children(p.pid)
            os.killpg(p.pid, signal.SIGINT)
            _, err = p.communicate(timeout=30)
        finally:
            os.close(ready)
            if p.poll() is None:
                p.kill()
                p.wait()
        assert "Traceback" not in err and err == "", (delay, err)
        assert p.returncode == 130, (delay, p.returncode)
        assert _wait_gone(workers) == set(), delay
        left = [e.name for e in tmp_path.iterdir() if e.name.startswith(TEMP_PREFIX)]
        assert left == [], (delay, left)
