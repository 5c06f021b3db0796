"""What ``memslots bench`` measures beside the engine it runs in: the engine's other build
(pure Python, in a subprocess) and the libraries a user could pick instead of memslots.

Every target here takes ``set_user_memory_region(slot, flags, guest_phys_addr,
memory_size, userspace_addr)`` so that the sweep of :mod:`memslots.tools.bench` drives
them exactly as it drives the engine and the kernel; each maps the four memslot operations
onto its own calls:

``pure`` (:class:`EngineWorker` with ``pure=True``)
    :class:`memslots.Vm` from the package's Python sources with no compiled module, in a
    worker process that the sweep tells what to time (so its numbers are taken in the
    same run, interleaved with the others). A compiled install ships its ``.py`` sources
    beside the extensions; :func:`pure_sources` copies them, without the extensions, to a
    temporary directory the worker imports from.
``array`` (:class:`EngineWorker` for ``ArrayVm``)
    the array baseline in a worker process too: its O(n) copies of 32764-entry arrays
    churn the heap of the process they run in, and measured in the sweep's own process
    they made the compiled tree, measured between them, cost twice as much at 32764
    slots as when measured alone.
``vmmemory`` (:class:`VmMemoryModel`)
    a model of rust-vmm vm-memory's ``GuestRegionCollection`` (the guest-memory map of
    Firecracker and Cloud Hypervisor), in Python, in a worker process as well (its
    copies churn the heap as the array's do): a vector of regions sorted by start
    address, replaced on every change. ``insert_region`` clones the vector, pushes the
    region, sorts it and checks every neighbouring pair for order and overlap
    (``from_arc_regions``); ``remove_region`` binary-searches, clones and removes. A
    region is immutable, so a move or a flags change is a removal and an insertion. It
    is a model of the crate's algorithm, not the crate: Rust runs the same steps much
    faster per element, but as they are O(n) per change it grows with n the same way.
``unicorn`` (:class:`UnicornTarget`)
    the Unicorn CPU emulator's guest memory map (PyPI ``unicorn``, the ``peers`` extra):
    create is ``mem_map_ptr`` (host memory, like a memslot), delete ``mem_unmap``, move
    ``mem_unmap`` then ``mem_map_ptr`` at the new address, and a dirty-logging flags
    change ``mem_protect`` (write protection, which is how dirty logging starts).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import pairwise
from typing import Any

from memslots.constants import KVM_MEM_LOG_DIRTY_PAGES

__all__ = [
    "TEMP_PREFIX",
    "EngineWorker",
    "UnicornTarget",
    "VmMemoryModel",
    "pure_sources",
    "unicorn_available",
]


# ======================================================================================
# vm-memory's GuestRegionCollection (a model)
# ======================================================================================
class VmMemoryModel:
    """A model of ``vm_memory::GuestRegionCollection`` (see the module docstring) behind
    the memslot ioctl. Every change O(n) (clone, sort of an almost sorted vector, check);
    lookups (:meth:`find_region`) O(log n)."""

    def __init__(self) -> None:
        #: (start, last, hva), sorted by start: the collection's ``Vec<Arc<R>>``
        self.regions: list[tuple[int, int, int]] = []
        self._slots: dict[int, tuple[int, int, int, int]] = {}

    def preload(self, regions: list[tuple[int, int, int]]) -> None:
        """``GuestRegionCollection::from_regions``: start with these ``(start, size, hva)``
        regions, slot i being the i-th (the sweep's setup; O(n log n))."""
        self.regions = sorted((a, a + n - 1, h) for a, n, h in regions)
        self._slots = {i: (a, n, h, 0) for i, (a, n, h) in enumerate(regions)}

    def insert_region(self, start: int, size: int, hva: int) -> None:
        """``insert_region``: clone, push, sort by start, check (``from_arc_regions``)."""
        regions = self.regions.copy()
        regions.append((start, start + size - 1, hva))
        regions.sort()
        for prev, nxt in pairwise(regions):
            if prev[1] >= nxt[0]:
                raise ValueError("MemoryRegionOverlap")
        self.regions = regions

    def remove_region(self, start: int, size: int) -> None:
        """``remove_region``: binary search by start, clone, remove."""
        regions = self.regions
        i = bisect_left(regions, (start,))
        if i == len(regions) or regions[i][0] != start or regions[i][1] - start + 1 != size:
            raise ValueError("NoMemoryRegion")
        regions = regions.copy()
        del regions[i]
        self.regions = regions

    def find_region(self, addr: int) -> tuple[int, int, int] | None:
        """``find_region``: the region containing ``addr``, O(log n)."""
        i = bisect_left(self.regions, (addr + 1,)) - 1
        if i >= 0 and self.regions[i][1] >= addr:
            return self.regions[i]
        return None

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """The memslot ioctl on the model: create, delete (size 0), move or change flags
        (the last two a removal and an insertion: regions are immutable)."""
        old = self._slots.pop(slot, None)
        if old is not None:
            self.remove_region(old[0], old[1])
        if memory_size:
            self.insert_region(guest_phys_addr, memory_size, userspace_addr)
            self._slots[slot] = (guest_phys_addr, memory_size, userspace_addr, flags)


# ======================================================================================
# Unicorn
# ======================================================================================
def unicorn_available() -> bool:
    """True when the ``unicorn`` package imports (``pip install 'memslots[peers]'``)."""
    try:
        importlib.import_module("unicorn")
    except ImportError:
        return False
    return True


class UnicornTarget:
    """A Unicorn x86-64 engine's memory map behind the memslot ioctl (see the module
    docstring for the mapping of operations). Needs the ``unicorn`` package."""

    def __init__(self) -> None:
        uc: Any = importlib.import_module("unicorn")
        self._uc = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
        self._all: int = uc.UC_PROT_ALL
        self._ro: int = uc.UC_PROT_READ | uc.UC_PROT_EXEC
        self._slots: dict[int, tuple[int, int, int, int]] = {}

    def _perms(self, flags: int) -> int:
        return self._ro if flags & KVM_MEM_LOG_DIRTY_PAGES else self._all

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """The memslot ioctl on Unicorn: ``mem_map_ptr``, ``mem_unmap``, both (move) or
        ``mem_protect`` (flags)."""
        uc = self._uc
        old = self._slots.get(slot)
        if old is not None and memory_size and old[0] == guest_phys_addr:
            if old[3] != flags:
                uc.mem_protect(guest_phys_addr, memory_size, self._perms(flags))
            self._slots[slot] = (guest_phys_addr, memory_size, userspace_addr, flags)
            return
        if old is not None:
            uc.mem_unmap(old[0], old[1])
            del self._slots[slot]
        if memory_size:
            uc.mem_map_ptr(guest_phys_addr, memory_size, self._perms(flags), userspace_addr)
            self._slots[slot] = (guest_phys_addr, memory_size, userspace_addr, flags)

    def close(self) -> None:
        """Release the emulator."""
        self._slots.clear()
        self._uc = None


# ======================================================================================
# The pure-Python build in a worker process
# ======================================================================================
def pure_sources(dest: str) -> str:
    """Copy the installed package's Python sources (no extension modules, no caches) to
    ``dest``/memslots and return ``dest``, a directory to put first on ``sys.path`` to
    import the pure-Python build. Works from a compiled or a pure install."""
    import memslots

    src = os.path.dirname(os.path.abspath(memslots.__file__))
    shutil.copytree(
        src,
        os.path.join(dest, "memslots"),
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
    )
    return dest


#: the prefix of the temporary directory a pure worker imports its copy of the sources
#: from (under ``tempfile.gettempdir()``, so ``TMPDIR`` chooses where)
TEMP_PREFIX = "memslots-pure-"

#: what a worker process runs: SIGINT ignored before anything is imported (the parent
#: handles Ctrl-C and closes the worker's stdin), then the request loop
_WORKER_MAIN = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "from memslots.tools.bench import engine_worker\n"
    "engine_worker({impl!r})"
)


class EngineWorker:
    """A VM of one design (``impl``: ``"tree"``, :class:`memslots.Vm`, ``"array"``,
    :class:`memslots.baseline.ArrayVm`, or ``"vmmemory"``, :class:`VmMemoryModel`) in a
    worker process; with ``pure``, of the
    pure-Python build. The sweep asks it to :meth:`grow` to a slot count and to
    :meth:`time_ops` there; it answers what :func:`memslots.tools.bench.time_ops`
    measured in the worker (:func:`memslots.tools.bench.engine_worker`). Close it with
    :meth:`close`. Raises RuntimeError when the worker does not start."""

    def __init__(self, impl: str = "tree", *, pure: bool = False) -> None:
        env = dict(os.environ)
        self._dir: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        try:
            if pure:
                with _ctrl_c_deferred():  # the folder exists only once it is remembered
                    self._dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
                path = pure_sources(self._dir)
                env["PYTHONPATH"] = path + (
                    os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
                )
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN.format(impl=impl)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                # a process group of its own: a terminal's Ctrl-C (SIGINT to the
                # foreground group) reaches the parent only, which stops the worker by
                # closing its stdin (the worker ignores SIGINT too)
                process_group=0,
            )
            hello = self._call({"cmd": "hello"})
            if pure and hello.get("compiled") is not False:
                raise RuntimeError(f"the pure worker did not load the pure build: {hello}")
        except BaseException:  # Ctrl-C included: no worker and no copy left behind
            self.close()
            raise

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None:
            raise RuntimeError("the benchmark's worker process is closed")
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError("the benchmark's worker process exited") from None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's worker process exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the benchmark's worker process: {reply['error']}")
        return reply

    def grow(self, count: int, base: int, step: int) -> None:
        """Create slots ``present .. count - 1`` as the sweep lays them out."""
        self._call({"cmd": "grow", "count": count, "base": base, "step": step})

    def time_ops(
        self, count: int, base: int, step: int, duration: float
    ) -> list[tuple[str, float, int]]:
        """``time_ops`` in the worker: ``(op, microseconds, operations timed)``."""
        reply = self._call(
            {"cmd": "ops", "count": count, "base": base, "step": step, "duration": duration}
        )
        return [(op, float(us), int(n)) for op, us, n in reply["ops"]]

    def close(self) -> None:
        """Stop the worker and remove its copy of the sources (if pure). Safe to call
        twice; a Ctrl-C while it waits kills the worker and still removes the copy."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                _stop(proc)
        finally:
            with _ctrl_c_deferred():  # a Ctrl-C halfway through would leave the rest
                directory, self._dir = self._dir, None
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """SIGINT held back while the block runs (its KeyboardInterrupt comes right after):
    a temporary folder is made and remembered, or removed, whole."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs Python's signal handlers
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(proc: subprocess.Popen[str]) -> None:
    """End a worker: close its stdin (its loop ends), wait, kill it if it lingers or if
    the wait is interrupted."""
    try:
        if proc.poll() is None:
            with suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            proc.wait(10)
    except BaseException:
        proc.kill()
        proc.wait()
        if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            raise
    finally:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
