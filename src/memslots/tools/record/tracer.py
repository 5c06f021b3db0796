"""The tracing loop of ``memslots record``: start or attach, follow, stop cleanly.

Two modes:

``launch`` (:func:`launch`)
    fork; the child stops itself, the parent seizes it (``PTRACE_SEIZE`` with
    ``TRACESECCOMP | TRACECLONE | TRACEFORK | TRACEVFORK | TRACEEXEC | EXITKILL``), the
    child installs the seccomp filter of :func:`memslots.tools.record.recorder.filter_rules`
    and execs COMMAND. The kernel then stops the program only on the calls the filter
    selects (the memslot-related ioctls, ``munmap``, ``mremap``, discarding ``madvise``);
    every other system call, ``KVM_RUN`` included, runs without a stop. After a seccomp
    stop the thread is resumed with ``PTRACE_SYSCALL`` only when the call's result is
    needed, and stops once more when it returns. The filter and the tracing are inherited
    by every thread and child process. ``EXITKILL``: if the recorder dies, so does the
    program.
``attach`` (:func:`attach`)
    ``PTRACE_SEIZE`` every thread of a running process. A seccomp filter cannot be added
    to a running process from outside, so every system call of the process stops twice
    (``PTRACE_SYSCALL``): slower for the traced program (see ``docs/trace-format.md``).
    On Ctrl-C the recorder detaches and the process runs on untraced.

Signals: the loop waits with ``sigtimedwait`` for ``SIGCHLD`` (a traced thread stopped or
ended) and for ``SIGINT``/``SIGTERM``/``SIGHUP``, which are blocked in the recorder, so a
signal never interrupts the loop half-way through a stop. In launch mode the first
``SIGINT`` is passed on to the program unless the terminal already sent it to the whole
foreground process group (Ctrl-C): to every traced process, as Ctrl-C would; recording goes
on until the program exits; a second
one (or ``SIGTERM``/``SIGHUP``) kills the traced processes. Signals meant for the traced
program are delivered to it as they arrive; job-control stops keep it stopped
(``PTRACE_LISTEN``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, Literal

from memslots.tools.record.ptrace import (
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_FORK,
    PTRACE_EVENT_SECCOMP,
    PTRACE_EVENT_STOP,
    PTRACE_EVENT_VFORK,
    PTRACE_INTERRUPT,
    PTRACE_LISTEN,
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACEFORK,
    PTRACE_O_TRACESECCOMP,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_O_TRACEVFORK,
    PTRACE_SEIZE,
    PTRACE_SYSCALL,
    PTRACE_SYSCALL_INFO_ENTRY,
    PTRACE_SYSCALL_INFO_EXIT,
    PTRACE_SYSCALL_INFO_SECCOMP,
    WALL,
    get_event_msg,
    get_syscall_info,
    install_seccomp,
    ptrace,
    seccomp_filter,
)
from memslots.tools.record.recorder import CallDecoder, ExitHandler, filter_rules

__all__ = ["TraceResult", "Tracer", "attach", "launch"]

Mode = Literal["launch", "attach"]

_FOLLOW: Final = (
    PTRACE_O_TRACESYSGOOD
    | PTRACE_O_TRACECLONE
    | PTRACE_O_TRACEFORK
    | PTRACE_O_TRACEVFORK
    | PTRACE_O_TRACEEXEC
)
#: signals the recorder handles itself (blocked, taken with sigtimedwait)
_SIGNALS: Final = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_STOP_SIGNALS: Final = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


@dataclasses.dataclass
class TraceResult:
    """How a recording ended: the program's exit ``status`` (its exit code, or 128 + the
    signal that killed it; None when the recorder detached), ``reason`` (``"exited"``,
    ``"killed"``, ``"detached"``) and how many stops the tracer handled."""

    status: int | None
    reason: str
    stops: int


@dataclasses.dataclass
class _Thread:
    tid: int
    pid: int
    pending: ExitHandler | None = None


class Tracer:
    """The event loop over every traced thread. ``decoder`` turns calls into records;
    ``mode`` says whether every call stops (attach) or only the filtered ones (launch)."""

    def __init__(self, decoder: CallDecoder, mode: Mode, main_pid: int) -> None:
        self.decoder = decoder
        self.mode = mode
        self.main_pid = main_pid
        self.threads: dict[int, _Thread] = {}
        self.status: int | None = None
        self.stops = 0
        self._interrupts = 0
        self._killing = False
        self._detaching = False
        #: new thread -> the process that made it, from clone/fork events
        self._parents: dict[int, int] = {}
        decoder_live = self.live_tid
        decoder._live_tid = decoder_live

    # ------------------------------------------------------------------ bookkeeping
    def live_tid(self, pid: int) -> int | None:
        """A traced thread of process ``pid`` that still runs, or None. O(threads)."""
        if pid in self.threads:
            return pid
        for t in self.threads.values():
            if t.pid == pid:
                return t.tid
        return None

    def add(self, tid: int, pid: int | None = None) -> _Thread:
        """Start keeping track of thread ``tid`` (its process read from /proc when not
        given); a new process inherits its parent's descriptors."""
        if pid is None:
            pid = _tgid(tid)
        if pid not in {t.pid for t in self.threads.values()} and tid in self._parents:
            self.decoder.forked(self._parents[tid], pid)
        thread = _Thread(tid, pid)
        self.threads[tid] = thread
        return thread

    def _gone(self, tid: int) -> None:
        thread = self.threads.pop(tid, None)
        self._parents.pop(tid, None)
        if thread is not None and all(t.pid != thread.pid for t in self.threads.values()):
            self.decoder.exited(thread.pid)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TraceResult:
        """Trace until every traced thread is gone (or detached). The blocked signals are
        handled here; returns how it ended."""
        while self.threads:
            try:
                tid, status = os.waitpid(-1, WALL | os.WNOHANG)
            except ChildProcessError:
                break
            if tid == 0:
                info = signal.sigtimedwait(_SIGNALS, 0.5)
                if info is not None and info.si_signo != signal.SIGCHLD:
                    self._on_signal(info.si_signo)
                continue
            self.stops += 1
            self._event(tid, status)
        if self._detaching:
            return TraceResult(None, "detached", self.stops)
        return TraceResult(self.status, "killed" if self._killing else "exited", self.stops)

    def _on_signal(self, signo: int) -> None:
        self._interrupts += 1
        if self.mode == "attach":
            self.detach()
            return
        if signo == signal.SIGINT and self._interrupts == 1:
            if not _terminal_sent_it(self.main_pid):
                # as Ctrl-C would: to every process of the job
                for pid in {t.pid for t in self.threads.values()}:
                    _kill(pid, signal.SIGINT)
            return
        self.kill()

    def kill(self) -> None:
        """SIGKILL every traced process (launch mode: the second Ctrl-C)."""
        self._killing = True
        for pid in {t.pid for t in self.threads.values()}:
            _kill(pid, signal.SIGKILL)

    def detach(self) -> None:
        """Stop tracing: every thread is interrupted and detached at its next stop, and
        runs on untraced (attach mode)."""
        if self._detaching:
            return
        self._detaching = True
        for tid in list(self.threads):
            try:
                ptrace(PTRACE_INTERRUPT, tid)
            except OSError:
                self._gone(tid)

    def _event(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            if tid == self.main_pid:
                self.status = (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                )
            self._gone(tid)
            return
        if not os.WIFSTOPPED(status):
            return
        thread = self.threads.get(tid) or self.add(tid)
        sig = os.WSTOPSIG(status)
        event = status >> 16
        inject = 0
        try:
            if sig == signal.SIGTRAP | 0x80 or (
                sig == signal.SIGTRAP and event == PTRACE_EVENT_SECCOMP
            ):
                self._syscall_stop(thread)
            elif sig == signal.SIGTRAP and event in (
                PTRACE_EVENT_FORK,
                PTRACE_EVENT_VFORK,
                PTRACE_EVENT_CLONE,
            ):
                child = get_event_msg(tid)
                self._parents[child] = thread.pid
                if child in self.threads and self.threads[child].pid != thread.pid:
                    # the child reported its first stop before this event
                    self.decoder.forked(thread.pid, self.threads[child].pid)
            elif sig == signal.SIGTRAP and event == PTRACE_EVENT_EXEC:
                former = get_event_msg(tid)
                if former != tid:
                    self.threads.pop(former, None)
                thread.pending = None
                self.decoder.execed(thread.pid)
            elif event == PTRACE_EVENT_STOP:
                if sig in _STOP_SIGNALS and not self._detaching:
                    ptrace(PTRACE_LISTEN, tid)  # a group stop: stay stopped until SIGCONT
                    return
            else:
                inject = sig  # a signal for the program
            self._resume(thread, inject)
        except ProcessLookupError:
            self._gone(tid)  # killed while stopped (SIGKILL needs no permission)

    def _syscall_stop(self, thread: _Thread) -> None:
        info = get_syscall_info(thread.tid)
        if info.op == PTRACE_SYSCALL_INFO_EXIT:
            handler, thread.pending = thread.pending, None
            if handler is not None:
                handler(info.rval)
            return
        if info.op in (PTRACE_SYSCALL_INFO_ENTRY, PTRACE_SYSCALL_INFO_SECCOMP):
            thread.pending = self.decoder.on_entry(thread.pid, thread.tid, info.nr, info.args)

    def _resume(self, thread: _Thread, sig: int) -> None:
        if self._detaching and thread.pending is None:
            ptrace(PTRACE_DETACH, thread.tid, 0, sig)
            self.threads.pop(thread.tid, None)
            return
        wants_exit = thread.pending is not None
        request = PTRACE_SYSCALL if self.mode == "attach" or wants_exit else PTRACE_CONT
        ptrace(request, thread.tid, 0, sig)


def _tgid(tid: int) -> int:
    """The process (thread group) of thread ``tid``, from ``/proc/TID/status``."""
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as fp:
            for line in fp:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _terminal_sent_it(pid: int) -> bool:
    """Whether a Ctrl-C on the terminal reached ``pid`` too: it is in this process's group
    and that group is the terminal's foreground group."""
    try:
        return os.getpgid(pid) == os.getpgrp() == os.tcgetpgrp(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- modes


def _block_signals() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)}


def launch(
    argv: Sequence[str], decoder: CallDecoder, *, on_start: Callable[[int], None] | None = None
) -> TraceResult:
    """Run ``argv`` (``argv[0]`` a path or a name looked up in ``PATH``) under the tracer
    with the seccomp filter; trace it and its threads and children until they are all
    gone. ``on_start(pid)`` is called once the program is traced. Raises OSError when the
    program cannot be traced (the child is killed)."""
    prog = seccomp_filter(filter_rules())
    old_mask = _block_signals()
    ready, go = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: runs until exec
            os.close(go)
            _child(argv, prog, old_mask, ready)
        os.close(ready)
        try:
            options = _FOLLOW | PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL
            ptrace(PTRACE_SEIZE, pid, 0, options)
        except BaseException:
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        tracer = Tracer(decoder, "launch", pid)
        tracer.add(pid, pid)
        os.write(go, b"x")  # traced now: the child may filter and exec
        if on_start is not None:
            on_start(pid)
        return tracer.run()
    finally:
        with contextlib.suppress(OSError):
            os.close(go)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _child(
    argv: Sequence[str], prog: list[tuple[int, int, int, int]], mask: set[int], ready: int
) -> None:
    """In the forked child: wait to be traced, filter, exec. Never returns."""
    try:
        for signo in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(signo, signal.SIG_DFL)  # as the program would start normally
        if os.read(ready, 1) != b"x":  # the parent could not trace us
            os._exit(127)
        os.close(ready)
        install_seccomp(prog)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        os.write(2, f"memslots record: {argv[0]}: {exc.strerror or exc}\n".encode())
        os._exit(127)
    except BaseException:
        os._exit(127)
    os._exit(127)


def attach(
    pid: int, decoder: CallDecoder, *, on_start: Callable[[int], None] | None = None
) -> TraceResult:
    """Trace the running process ``pid`` (every thread, and the threads and children it
    makes from now on) until it ends or the recorder is interrupted, which detaches. Raises
    OSError when the process cannot be traced."""
    old_mask = _block_signals()
    tracer = Tracer(decoder, "attach", pid)
    try:
        seized: set[int] = set()
        while True:  # threads made while we seize the others are seized by TRACECLONE
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            except FileNotFoundError:
                raise ProcessLookupError(f"no process {pid}") from None
            new = tids - seized
            if not new:
                break
            for tid in sorted(new):
                try:
                    ptrace(PTRACE_SEIZE, tid, 0, _FOLLOW)
                except ProcessLookupError:
                    continue
                ptrace(PTRACE_INTERRUPT, tid)
                tracer.add(tid, pid)
                seized.add(tid)
        if not seized:
            raise ProcessLookupError(f"no process {pid}")
        if on_start is not None:
            on_start(pid)
        return tracer.run()
    finally:
        if tracer.threads:  # an error: leave the process running, untraced
            tracer.detach()
            deadline = time.monotonic() + 2
            while tracer.threads and time.monotonic() < deadline:
                try:
                    tid, status = os.waitpid(-1, WALL | os.WNOHANG)
                except ChildProcessError:
                    break
                if tid:
                    tracer._event(tid, status)
                else:
                    time.sleep(0.01)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
