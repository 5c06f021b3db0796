"""What ``--kernel KERNEL`` names, the cache folder, and the error every step raises.

KERNEL is ``debian:SERIES`` (the newest Debian kernel package of that series:
:data:`DEBIAN_SERIES`), ``debian:SERIES/16k`` (arm64: Debian's ``arm64-16k`` flavour, a
kernel with 16 KiB pages; :data:`DEBIAN_PAGE_FLAVOURS`) or the path of a kernel image
(``arch/x86/boot/bzImage``, ``arch/arm64/boot/Image``, a distribution's ``vmlinuz``),
with ``modules`` the folder of its modules when KVM is built as modules (a
``/lib/modules/VER`` tree or a flat folder of ``.ko`` files). The architecture is
``x86_64`` (the default) or ``arm64``.

Cache layout (``$MEMSLOTS_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/memslots/kernels``)::

    apt/                  private apt configuration, package lists, downloaded .debs
    debian/PKG_VERSION/   an unpacked package (image, config and modules)
    agents/ARCH-HASH      the agent, built by the local compiler
    initramfs/HASH.cpio   initramfs archives (agent + modules)

Everything in it can be deleted at any time; it is fetched or built again.

Trust: the cache only ever runs what apt fetched and verified against the Debian archive
keyring (``/usr/share/keyrings/debian-archive-keyring.gpg``; signature checks are never
turned off), what the local compiler built from the agent source shipped with memslots,
or what the user named by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "ARCHES",
    "DEBIAN_PAGE_FLAVOURS",
    "DEBIAN_SERIES",
    "KernelBootError",
    "KernelSpec",
    "cache_dir",
    "parse_spec",
]

#: Debian kernel series -> (suites to look in, package name pattern with {arch})
DEBIAN_SERIES: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "5.10": (("bullseye",), r"linux-image-5\.10\.0-(\d+)-{arch}"),
    "6.1": (("bookworm",), r"linux-image-6\.1\.0-(\d+)-{arch}"),
    "6.12": (("trixie", "bookworm-backports"), r"linux-image-6\.12\.(\d+)\+deb(\d+)-{arch}"),
    "7.2": (("sid",), r"linux-image-7\.2\.(\d+)\+deb(\d+)-{arch}"),
}

#: supported guest architectures -> Debian architecture name
ARCHES: Final = {"x86_64": "amd64", "arm64": "arm64"}

#: ``debian:SERIES/PAGES``: page size -> the suffix of Debian's flavour name for arm64
#: (``linux-image-VER-arm64-16k``, 6.12 and 7.x); 4k is the plain flavour. Debian has no
#: 64 KiB flavour: such a kernel is given by path (its page size comes from the guest).
DEBIAN_PAGE_FLAVOURS: Final = {"4k": "", "16k": "-16k"}


class KernelBootError(Exception):
    """Booting a kernel under QEMU failed or cannot be attempted. The message is one line
    a command can print as is: what is wrong and, where there is one, what to do. The
    console's last lines, when there are any, are in :attr:`console`."""

    def __init__(self, message: str, console: list[str] | None = None) -> None:
        super().__init__(message)
        #: the last lines the guest printed before the failure (may be empty)
        self.console: list[str] = console or []


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """A parsed ``--kernel`` value: either ``series`` (Debian) or ``image`` (a path) is set."""

    arch: str = "x86_64"
    series: str | None = None
    image: Path | None = None
    modules: Path | None = None
    #: the Debian flavour's suffix (``"-16k"``; ``""``: the plain flavour)
    flavour: str = ""

    def __str__(self) -> str:
        what = f"debian:{self.series}" if self.series else str(self.image)
        if self.flavour:
            what += "/" + self.flavour.removeprefix("-")
        return f"{what} ({self.arch})"


def parse_spec(spec: str, *, arch: str = "x86_64", modules: str | None = None) -> KernelSpec:
    """Parse ``--kernel KERNEL`` (with ``--arch`` and ``--modules``); raises
    :class:`KernelBootError` for an unknown series, architecture, or a missing path.

    >>> parse_spec("debian:6.1").series
    '6.1'
    >>> parse_spec("debian:6.12/16k", arch="arm64").flavour
    '-16k'
    >>> parse_spec("debian:4.19")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memslots...KernelBootError: unknown Debian kernel series '4.19': known are 5.10, 6.1, ...
    """
    if arch not in ARCHES:
        raise KernelBootError(f"unknown architecture {arch!r}: known are {', '.join(ARCHES)}")
    mods = Path(modules) if modules else None
    if mods is not None and not mods.is_dir():
        raise KernelBootError(f"{mods}: no such modules directory")
    if spec.startswith("debian:"):
        series, _, pages = spec.removeprefix("debian:").partition("/")
        flavour = ""
        if pages:
            if pages.lower() not in DEBIAN_PAGE_FLAVOURS:
                raise KernelBootError(
                    f"{spec}: unknown page size {pages!r}: Debian's arm64 kernels come with"
                    f" {' and '.join(DEBIAN_PAGE_FLAVOURS)} pages (give another kernel by path)"
                )
            flavour = DEBIAN_PAGE_FLAVOURS[pages.lower()]
            if flavour and arch != "arm64":
                raise KernelBootError(
                    f"{spec}: Debian's {pages} kernels are arm64 ones (--arch arm64)"
                )
        if series not in DEBIAN_SERIES:
            raise KernelBootError(
                f"unknown Debian kernel series {series!r}: known are {', '.join(DEBIAN_SERIES)}"
            )
        if mods is not None:
            raise KernelBootError("--modules goes with a kernel image path, not debian:SERIES")
        return KernelSpec(arch=arch, series=series, flavour=flavour)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise KernelBootError(
            f"{spec}: no such kernel image (give a file such as arch/x86/boot/bzImage, or"
            f" debian:SERIES with SERIES one of {', '.join(DEBIAN_SERIES)})"
        )
    return KernelSpec(arch=arch, image=path, modules=mods)


def cache_dir() -> Path:
    """The kernel cache: ``$MEMSLOTS_CACHE``, else ``$XDG_CACHE_HOME/memslots/kernels``,
    else ``~/.cache/memslots/kernels`` (created on first use by the callers)."""
    explicit = os.environ.get("MEMSLOTS_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "memslots" / "kernels"
