"""Booting a kernel under QEMU (TCG: software emulation, no host KVM needed) with the
agent as ``/init``, and talking to the agent: :class:`GuestKernel`.

QEMU runs with the guest's first serial port on QEMU's stdio (a ``stdio`` chardev without
the monitor multiplexed on it, so every byte passes through untouched), nothing else
attached (``-nodefaults``, ``-display none``), one vCPU, and ``-no-reboot`` with
``panic=-1``: a guest that panics (the agent died, a kernel bug) makes QEMU exit at once,
which the host sees as the end of the output. Its stderr goes to a temporary file, read
back for error messages.

x86-64: ``qemu-system-x86_64 -accel tcg -cpu max,la57=off`` (QEMU's TCG ``max`` CPU has
AMD SVM, so ``kvm_amd`` loads and ``/dev/kvm`` appears; ``la57=off`` gives 4-level paging,
a 2^47-byte user address space, the common case; ``la57=True`` keeps 5-level paging and
2^56). arm64: ``qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max``
(EL2 is there, so KVM initialises in the guest).

Lifetime: the QEMU process is killed by :meth:`GuestKernel.close` (also from ``__exit__``,
so Ctrl-C inside a ``with`` block kills it), at interpreter exit (``atexit``), and by the
kernel if this process dies without either (``PR_SET_PDEATHSIG``). Boot and call
deadlines raise :class:`~memslots.tools.kernels.spec.KernelBootError` with the last lines
of the console.

Batching: each request frame carries any number of calls and is answered by one frame;
a round trip costs a few milliseconds (the emulated UART into the guest is slow, see
:mod:`memslots.tools.kernels.protocol`), so :meth:`GuestKernel.batch` of many calls is
several times cheaper per call than :meth:`GuestKernel.call` in a loop.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from memslots.tools.kernels.agent import build_agent
from memslots.tools.kernels.initramfs import collect_modules, write_initramfs
from memslots.tools.kernels.protocol import (
    Call,
    FrameReader,
    ProtocolError,
    Reply,
    decode_reply,
    encode_request,
    encode_request_frame,
    encode_resend,
)
from memslots.tools.kernels.spec import KernelBootError, KernelSpec, cache_dir

__all__ = ["QEMU", "GuestInfo", "GuestKernel", "qemu_command"]

#: architecture -> (QEMU binary, the Debian package that has it)
QEMU: Final = {
    "x86_64": ("qemu-system-x86_64", "qemu-system-x86"),
    "arm64": ("qemu-system-aarch64", "qemu-system-arm"),
}
_PROGRESS_EVERY: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """What the agent announced when it became ready."""

    #: ``uname -r`` and ``uname -m`` of the guest kernel
    release: str
    machine: str
    #: ``sysconf(_SC_PAGESIZE)`` in the guest
    page_size: int
    #: the guest's fd of ``/dev/kvm`` and ``KVM_GET_API_VERSION``'s answer
    kvm_fd: int
    api_version: int
    #: module file -> errno of its ``finit_module`` (0 loaded, EEXIST already there, ...)
    modules: dict[str, int] = field(default_factory=dict)
    #: seconds from starting QEMU to the ready frame
    boot_seconds: float = 0.0


def parse_ready(payload: bytes) -> tuple[GuestInfo, int]:
    """The :class:`GuestInfo` of a ready frame's payload, and the errno of opening
    ``/dev/kvm`` in the guest (0 when it opened)."""
    words = payload.decode("utf-8", "replace").split()
    if len(words) < 7 or words[0] != "READY":
        raise ProtocolError(f"not a ready frame: {payload[:80]!r}")
    modules: dict[str, int] = {}
    for item in words[7:]:
        name, _, err = item.rpartition("=")
        modules[name] = int(err)
    info = GuestInfo(
        release=words[1],
        machine=words[2],
        page_size=int(words[3]),
        kvm_fd=int(words[4]),
        api_version=int(words[6]),
        modules=modules,
    )
    return info, int(words[5])


def qemu_command(
    arch: str,
    qemu: str,
    image: Path,
    initrd: Path,
    *,
    la57: bool = False,
    memory_mib: int | None = None,
) -> list[str]:
    """The QEMU command line that boots ``image`` with ``initrd`` on the console."""
    common = [
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=ser0,signal=off",
        "-serial",
        "chardev:ser0",
        "-kernel",
        str(image),
        "-initrd",
        str(initrd),
    ]
    quiet = "quiet loglevel=0 panic=-1"
    if arch == "arm64":
        return [
            qemu,
            "-M",
            "virt,virtualization=on,gic-version=3",
            "-cpu",
            "max",
            "-m",
            str(memory_mib or 1024),
            *common,
            "-append",
            f"console=ttyAMA0 {quiet}",
        ]
    return [
        qemu,
        "-cpu",
        "max" if la57 else "max,la57=off",
        "-m",
        str(memory_mib or 2048),
        *common,
        "-append",
        f"console=ttyS0 {quiet}",
    ]


def _die_with_parent() -> None:
    """In the QEMU child before exec: be killed when this process dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_LIVE: weakref.WeakSet[GuestKernel] = weakref.WeakSet()


@atexit.register
def _kill_all() -> None:
    for guest in list(_LIVE):
        guest.close()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class GuestKernel:
    """A kernel booted under QEMU with the memslots agent as ``/init``.

    ``GuestKernel(spec)`` only records what to boot; :meth:`boot` (or entering the
    ``with`` block) resolves the spec (fetching a Debian kernel into the cache), builds
    the agent and the initramfs (cached), starts QEMU and waits up to ``boot_timeout``
    seconds for the agent's ready frame. Then :attr:`info` says what booted and
    :meth:`call`/:meth:`batch` run calls in the guest. :meth:`close` kills QEMU.

    Every failure raises :class:`~memslots.tools.kernels.spec.KernelBootError` with a
    one-line message (and :attr:`~memslots.tools.kernels.spec.KernelBootError.console`,
    the console's last lines): QEMU or the compiler missing, a download that failed, a
    boot or call that timed out, a guest that crashed, a kernel without KVM. Calls are
    serialised (one request in flight; thread-safe).
    """

    def __init__(
        self,
        spec: KernelSpec,
        *,
        la57: bool = False,
        memory_mib: int | None = None,
        boot_timeout: float = 180.0,
        call_timeout: float = 60.0,
        progress: bool = True,
    ) -> None:
        self.spec = spec
        self.la57 = la57
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.call_timeout = call_timeout
        self.progress = progress
        #: what booted (set by :meth:`boot`)
        self.info: GuestInfo | None = None
        #: a short description of the kernel, e.g. ``debian:6.1 linux-image-6.1.0-50-amd64``
        self.description = str(spec)
        self._proc: subprocess.Popen[bytes] | None = None
        # QEMU's stderr, kept for error messages until __exit__ (the temporary file
        # is deleted when closed)
        self._stderr: IO[bytes] | None = None
        self._kvm_errno = 0
        self._reader = FrameReader()
        self._seq = 0
        self._lock = threading.Lock()
        #: round trips and calls made so far
        self.round_trips = 0
        self.calls = 0

    # -- booting --------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.progress:
            _progress(message)

    def _resolve(self) -> tuple[Path, Path | None]:
        """The image and modules folder to boot."""
        spec = self.spec
        if spec.series is not None:
            from memslots.tools.kernels.debian import fetch_debian_kernel

            kernel = fetch_debian_kernel(spec.series, spec.arch, spec.flavour)
            name = str(spec).rpartition(" (")[0]
            self.description = f"{name} {kernel.package} {kernel.version}"
            return kernel.image, kernel.modules
        assert spec.image is not None
        return spec.image, spec.modules

    def _initramfs(self, agent: Path, modules: Path | None) -> Path:
        """The initramfs for ``agent`` and the KVM modules of ``modules``, cached by
        content."""
        mods = collect_modules(modules) if modules is not None else []
        digest = hashlib.sha256(agent.read_bytes())
        for name, data in mods:
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        path = cache_dir() / "initramfs" / f"{digest.hexdigest()[:16]}.cpio"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.{os.getpid()}")
            staged.write_bytes(write_initramfs(agent.read_bytes(), mods))
            staged.replace(path)
        return path

    def boot(self) -> GuestInfo:
        """Start the guest and wait for the agent (see the class docstring)."""
        if self._proc is not None:
            raise KernelBootError("this guest kernel is already booted")
        arch = self.spec.arch
        qemu_name, qemu_pkg = QEMU[arch]
        qemu = shutil.which(qemu_name)
        if qemu is None:
            raise KernelBootError(f"{qemu_name} not found: apt-get install {qemu_pkg}")
        agent = build_agent(arch)
        image, modules = self._resolve()
        initrd = self._initramfs(agent, modules)
        cmd = qemu_command(arch, qemu, image, initrd, la57=self.la57, memory_mib=self.memory_mib)
        self._say(f"booting {self.description} under QEMU ({arch}, TCG)...")
        info = self._start(cmd)
        if info.kvm_fd < 0:
            failed = [f"{m}: {os.strerror(e)}" for m, e in info.modules.items() if e]
            if failed:
                loaded = "modules that failed: " + ", ".join(failed)
            else:
                loaded = f"{len(info.modules)} modules loaded" if info.modules else "no modules"
            tail = self._reader.tail()
            self.close()
            raise KernelBootError(
                f"{self.description} ({info.release}): no usable /dev/kvm in the guest"
                f" ({os.strerror(self._kvm_errno)}; {loaded}); give --modules DIR if KVM"
                " is built as modules",
                tail,
            )
        self._say(f"booted {info.release} ({info.machine}) in {info.boot_seconds:.1f} s")
        return info

    def _start(self, cmd: list[str]) -> GuestInfo:
        """Run ``cmd`` (QEMU, or in tests the agent itself) with pipes on its stdin and
        stdout, and wait for the ready frame; sets and returns :attr:`info`."""
        self._stderr = tempfile.TemporaryFile(prefix="memslots-qemu-")  # noqa: SIM115
        start = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise KernelBootError(f"{cmd[0]}: {exc.strerror or exc}") from None
        _LIVE.add(self)
        try:
            payload = self._read_frame(start + self.boot_timeout, "booting", start)
            info, self._kvm_errno = parse_ready(payload)
        except BaseException:
            self.close()
            raise
        self.info = GuestInfo(
            info.release,
            info.machine,
            info.page_size,
            info.kvm_fd,
            info.api_version,
            info.modules,
            time.monotonic() - start,
        )
        return self.info

    def _console_tail(self) -> list[str]:
        lines = self._reader.tail()
        if self._stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stderr.seek(0)
                err = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
                lines += [f"qemu: {ln}" for ln in err[-5:]]
        return lines

    def _fail(self, message: str) -> KernelBootError:
        tail = self._console_tail()
        last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")
        text = f"{message}" + (f" (console: {last[:200]})" if last else "")
        return KernelBootError(text, tail)

    def _read_frame(self, deadline: float, doing: str, start: float | None = None) -> bytes:
        """The next frame from the guest, waiting until ``deadline`` (monotonic)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        out = proc.stdout.fileno()
        next_note = time.monotonic() + _PROGRESS_EVERY
        damaged = self._reader.bad_frames
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.close()
                raise self._fail(f"{self.description}: {doing} timed out")
            if start is not None and now >= next_note:
                self._say(f"booting {self.description} ({now - start:.0f} s)")
                next_note = now + _PROGRESS_EVERY
            ready, _, _ = select.select([out], [], [], min(deadline - now, 1.0))
            if not ready:
                continue
            data = os.read(out, 1 << 16)
            if not data:
                code = proc.wait()
                self._proc = None
                raise self._fail(
                    f"{self.description}: the guest stopped ({doing}; QEMU exit {code})"
                )
            frames = self._reader.feed(data)
            if frames:
                # one request in flight: at most one frame is pending at a time
                return frames[0]
            if self._reader.bad_frames != damaged:  # ask for it again
                damaged = self._reader.bad_frames
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.write(encode_request_frame(encode_resend()))
                    proc.stdin.flush()

    # -- calls ----------------------------------------------------------------------
    def batch(self, calls: list[Call], timeout: float | None = None) -> list[Reply]:
        """Run ``calls`` in the guest, in order, in one round trip; their replies. The
        deadline is ``timeout`` (default :attr:`call_timeout`) plus a millisecond per
        call."""
        if not calls:
            return []
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                raise KernelBootError(f"{self.description}: the guest is not running")
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            frame = encode_request_frame(encode_request(seq, calls))
            try:
                proc.stdin.write(frame)
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                raise self._fail(f"{self.description}: the guest stopped") from None
            wait = (self.call_timeout if timeout is None else timeout) + 0.001 * len(calls)
            try:
                payload = self._read_frame(time.monotonic() + wait, "waiting for an answer")
            except BaseException:
                # Ctrl-C, say, with the answer still on its way: the exchange is out of
                # step from here on, so the guest is of no further use
                self.close()
                raise
            self.round_trips += 1
            self.calls += len(calls)
            try:
                return decode_reply(payload, seq, len(calls))
            except ProtocolError as exc:
                self.close()
                raise self._fail(f"{self.description}: {exc}") from None

    def call(self, call: Call) -> Reply:
        """Run one call (one round trip)."""
        return self.batch([call])[0]

    # -- lifetime -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether QEMU is running."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill QEMU and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.boot()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
