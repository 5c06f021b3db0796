"""The guest's initramfs: a cpio archive (the kernel's "newc" format, written here in
Python, no external tool) holding the agent as ``/init``, the kernel modules KVM needs
under ``/modules/`` and their load order in ``/modules.list``.

Module order. Debian builds KVM as modules (``kvm.ko``, ``kvm-amd.ko``, ...), and the
agent loads them with ``finit_module`` in the order of ``/modules.list``. The order is the
dependency closure of the wanted modules (``kvm-amd`` and ``kvm-intel`` on x86-64),
dependencies first, read from each module's ``.modinfo`` section: the ``depends=`` string
(a text search of the ``.ko``, which is enough for that NUL-separated section; the kernel's
``scripts/mod/modpost.c`` writes it). Names are compared with ``-`` and ``_`` alike, as
``kmod`` does. Compressed modules (``.ko.xz``, ``.ko.zst``, ``.ko.gz``) are decompressed on
the host, so the guest kernel needs no decompressor for them.

The format (``usr/gen_init_cpio.c``, ``init/initramfs.c``): per entry a 110-byte ASCII
header ``070701`` plus 13 eight-digit hex fields, the NUL-terminated name, padding to 4
bytes, the data, padding to 4 bytes; the archive ends with the entry ``TRAILER!!!``.
:func:`read_cpio` reads it back (for tests and for checking a cached archive).
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memslots.tools.kernels.spec import KernelBootError

__all__ = [
    "KVM_MODULES",
    "CpioEntry",
    "collect_modules",
    "find_modules",
    "module_depends",
    "module_load_order",
    "normalize_module_name",
    "prune_modules",
    "read_cpio",
    "read_module",
    "write_cpio",
    "write_initramfs",
]

#: the modules whose dependency closure the guest loads (absent ones are skipped)
KVM_MODULES: Final = ("kvm-amd", "kvm-intel")

_MODULE_SUFFIXES: Final = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_NEWC_MAGIC: Final = b"070701"
_DEPENDS_RE: Final = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One member of a newc archive: its path (no leading ``/``), mode (type and
    permission bits), data, and device numbers for character/block devices."""

    name: str
    mode: int
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A newc archive of ``entries`` (in the given order: parents before children),
    owned by root, with the trailer. Deterministic: the same entries give the same
    bytes (mtime 0, inode numbers counted from 1)."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino if entry.name != "TRAILER!!!" else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdevmajor,
            entry.rdevminor,
            len(name),
            0,  # check
        )
        header = _NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """The entries of a newc archive up to its trailer (``ValueError`` if malformed)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = data[pos : pos + 110]
        if len(header) < 110 or header[:6] != _NEWC_MAGIC:
            raise ValueError(f"not a newc cpio header at offset {pos}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        if len(body) != filesize:
            raise ValueError(f"truncated cpio member {name!r}")
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, body, rmaj, rmin))


# --------------------------------------------------------------------------------------
# modules


def normalize_module_name(name: str) -> str:
    """A module's name as the kernel knows it: the file name without directory and
    ``.ko*`` suffix, ``-`` as ``_`` (``kvm-amd.ko.xz`` -> ``kvm_amd``)."""
    base = os.path.basename(name)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The ELF bytes of a module file, decompressing ``.ko.xz`` (lzma), ``.ko.gz`` and
    ``.ko.zst`` (the ``zstd`` tool; :class:`KernelBootError` naming it if absent)."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        tool = shutil.which("zstd")
        if tool is None:
            raise KernelBootError(
                f"{path}: a zstd-compressed module and no zstd: apt-get install zstd"
            )
        done = subprocess.run(
            [tool, "-dc", str(path)], capture_output=True, check=False, timeout=60
        )
        if done.returncode != 0:
            raise KernelBootError(f"{path}: zstd failed: {done.stderr.decode().strip()}")
        return done.stdout
    return raw


def module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` (normalized names, possibly
    empty)."""
    m = _DEPENDS_RE.search(elf)
    if m is None or not m.group(1):
        return []
    return [normalize_module_name(d) for d in m.group(1).decode().split(",") if d]


def find_modules(root: Path) -> dict[str, Path]:
    """Every module file under ``root`` (a ``/lib/modules/VER`` tree or a flat directory
    of ``.ko`` files), by normalized name; the first found wins when a name repeats."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            if fname.endswith(_MODULE_SUFFIXES):
                found.setdefault(normalize_module_name(fname), Path(dirpath) / fname)
    return found


def module_load_order(wanted: Iterable[str], depends: Mapping[str, list[str]]) -> list[str]:
    """The dependency closure of the ``wanted`` modules that exist in ``depends`` (name
    -> its dependencies), each module after all of its dependencies; wanted names that
    do not exist are skipped, a missing dependency raises :class:`KernelBootError`.
    Deterministic (depth-first in the given order)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, needed_by: str | None) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KernelBootError(f"modules: dependency cycle through {name}")
        if name not in depends:
            raise KernelBootError(f"modules: {needed_by} needs {name}, which is not there")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, name)
        state[name] = 2
        order.append(name)

    for want in wanted:
        name = normalize_module_name(want)
        if name in depends:
            visit(name, None)
    return order


def _closure(
    root: Path, wanted: Iterable[str]
) -> tuple[dict[str, Path], dict[str, bytes], list[str]]:
    """The module files under ``root``, the ELF of each module of the closure of
    ``wanted``, and that closure in load order."""
    files = find_modules(root)
    elves: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    todo = [normalize_module_name(w) for w in wanted]
    while todo:
        name = todo.pop()
        if name in depends or name not in files:
            continue
        elves[name] = read_module(files[name])
        depends[name] = module_depends(elves[name])
        todo.extend(depends[name])
    return files, elves, module_load_order(wanted, depends)


def collect_modules(root: Path, wanted: Iterable[str] = KVM_MODULES) -> list[tuple[str, bytes]]:
    """The modules to load from ``root``, in load order, as ``(file name, ELF bytes)``.
    Modules are read lazily along the dependency graph, so a full
    ``/lib/modules/VER`` tree costs only the files KVM needs."""
    _, elves, order = _closure(root, wanted)
    return [(f"{name}.ko", elves[name]) for name in order]


def prune_modules(root: Path, wanted: Iterable[str] = KVM_MODULES) -> int:
    """Delete every module file under ``root`` outside the closure of ``wanted`` (what
    the cache keeps of a distribution's modules tree: a few MiB instead of hundreds);
    returns how many were deleted."""
    files, _, order = _closure(root, wanted)
    keep = {files[name] for name in order}
    gone = 0
    for path in files.values():
        if path not in keep:
            path.unlink()
            gone += 1
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)  # only succeeds on an empty folder
    return gone


def write_initramfs(agent: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    """The initramfs: ``/init`` (the agent), ``/dev/console``, ``/modules/*.ko`` and
    ``/modules.list`` in load order."""
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
        CpioEntry("proc", stat.S_IFDIR | 0o755),
        CpioEntry("sys", stat.S_IFDIR | 0o755),
        CpioEntry("init", stat.S_IFREG | 0o755, agent),
        CpioEntry("modules", stat.S_IFDIR | 0o755),
    ]
    entries += [CpioEntry(f"modules/{n}", stat.S_IFREG | 0o644, d) for n, d in modules]
    listing = "".join(f"{n}\n" for n, _ in modules).encode()
    entries.append(CpioEntry("modules.list", stat.S_IFREG | 0o644, listing))
    return write_cpio(entries)
