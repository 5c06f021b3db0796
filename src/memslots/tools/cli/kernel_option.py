"""``--kernel SPEC`` and its companions, shared by ``memslots conform`` and ``memslots
replay``: check the engine against another kernel, booted under QEMU
(:mod:`memslots.tools.kernels`), instead of this machine's ``/dev/kvm``."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from memslots.tools.cli import CliError

if TYPE_CHECKING:
    from memslots.tools.kernels.session import KernelSession

__all__ = ["add_kernel_options", "booted_kernel"]


def add_kernel_options(p: Any) -> None:
    """Add ``--kernel``, ``--arch``, ``--modules`` and ``--paging`` to parser ``p``."""
    g = p.add_argument_group(
        "another kernel",
        "boot a kernel under QEMU (software emulation, no host KVM needed) and run the"
        " calls against its /dev/kvm, the engine staying here",
    )
    g.add_argument(
        "--kernel",
        metavar="SPEC",
        help="debian:SERIES (5.10, 6.1, 6.12, 7.2: the newest Debian kernel of that series,"
        " fetched once into ~/.cache/memslots), debian:SERIES/16k (6.12, 7.2 with --arch"
        " arm64: Debian's arm64-16k flavour, 16 KiB pages) or the path of a kernel image"
        " (e.g. arch/x86/boot/bzImage; its page size is read from the running guest)",
    )
    g.add_argument(
        "--arch",
        choices=("x86_64", "arm64"),
        default=None,
        help="the kernel's architecture (default: x86_64)",
    )
    g.add_argument(
        "--modules",
        metavar="DIR",
        help="the kernel's modules (a /lib/modules/VERSION tree or a folder of .ko files),"
        " where KVM is built as modules",
    )
    g.add_argument(
        "--paging",
        type=int,
        choices=(4, 5),
        default=None,
        help="x86-64 page-table levels of the emulated CPU (default 4: user addresses"
        " below 2^47; 5: below 2^56)",
    )


@contextlib.contextmanager
def booted_kernel(args: argparse.Namespace) -> Iterator[KernelSession | None]:
    """The kernel ``--kernel`` names, booted (QEMU is killed on the way out, Ctrl-C
    included), or None without ``--kernel``. Its problems (a missing image, an unknown
    series, no QEMU, no KVM in the kernel, a guest that hangs) are one-line
    :class:`CliError`\\ s."""
    if args.kernel is None:
        given = [o for o, v in (("--arch", args.arch), ("--modules", args.modules),
                                ("--paging", args.paging)) if v is not None]  # fmt: skip
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise CliError(f"{' and '.join(given)} {verb} --kernel")
        yield None
        return
    if args.arch == "arm64" and args.paging is not None:
        raise CliError("--paging is for x86_64 kernels")
    from memslots.tools.kernels.session import open_kernel
    from memslots.tools.kernels.spec import KernelBootError

    try:
        with open_kernel(
            args.kernel,
            arch=args.arch or "x86_64",
            modules=args.modules,
            la57=args.paging == 5,
        ) as session:
            yield session
    except KernelBootError as exc:
        # one line; a guest that hung or died adds the last lines of its console
        tail = "".join(f"\n  console: {line}" for line in exc.console[-10:])
        raise CliError(f"{exc}{tail}") from None
