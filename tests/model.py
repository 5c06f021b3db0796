"""A deliberately naive reference model of the memslot ABI, for model-based tests.

Written from the kernel's ``kvm_set_memory_region`` and ``kvm_set_memslot``
(``virt/kvm/kvm_main.c``) without sharing any code with the
engine: a dict of slots, a linear overlap scan, the generation counted per request.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

TASK_SIZE_MAX = 0x7FFFFFFFF000
U64 = 1 << 64


@dataclass
class Model:
    nr_as: int = 2
    max_user_slots: int = 32764
    max_gfn: int = (1 << 40) - 1
    #: the kernel's page size in bytes (4 KiB; 16 or 64 KiB on such arm64 kernels)
    page: int = 4096
    # (as_id, id) -> (base_gfn, npages, flags, hva)
    slots: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    gen: list[int] = field(default_factory=list)
    pages: int = 0

    def __post_init__(self) -> None:
        self.gen = list(range(self.nr_as))

    def table(self) -> list[tuple[int, int, int, int, int, int]]:
        """(as_id, id, base_gfn, npages, flags, hva) sorted by as_id then base_gfn."""
        return sorted(((a, i, *v) for (a, i), v in self.slots.items()), key=lambda t: (t[0], t[2]))

    def apply(
        self,
        v2: bool,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        fault: str | None = None,
    ) -> int:
        """Apply one request; return 0 or the errno, updating the model like the kernel."""
        as_id, id = slot >> 16, slot & 0xFFFF
        if not v2 and flags & ~3:
            return errno.EINVAL
        if id >= self.max_user_slots:
            return errno.EINVAL
        if flags & ~3:
            return errno.EINVAL
        page = self.page
        if size % page or gpa % page or hva % page:
            return errno.EINVAL
        if hva + size > TASK_SIZE_MAX:
            return errno.EINVAL
        if as_id >= self.nr_as:
            return errno.EINVAL
        if gpa + size >= U64:
            return errno.EINVAL
        if size // page > 2**31 - 1:
            return errno.EINVAL
        old = self.slots.get((as_id, id))
        base, n = gpa // page, size // page
        if size == 0:
            if old is None:
                return errno.EINVAL
            change = "delete"
        elif old is None:
            change = "create"
        else:
            if hva != old[3] or n != old[1] or (flags ^ old[2]) & 2:
                return errno.EINVAL
            if base != old[0]:
                change = "move"
            elif flags != old[2]:
                change = "flags"
            else:
                return 0
        if change in ("create", "move"):
            for (a2, i2), (b2, n2, _, _) in self.slots.items():
                if a2 == as_id and i2 != id and base < b2 + n2 and b2 < base + n:
                    return errno.EEXIST
        if fault == "kzalloc_new" and change != "delete":
            return errno.ENOMEM
        if fault == "kzalloc_invalid" and change in ("delete", "move"):
            return errno.ENOMEM
        two_swaps = change in ("delete", "move")
        err = 0
        if (
            change != "delete"
            and fault == "dirty_bitmap"
            and flags & 1
            and not (old is not None and old[2] & 1)
        ):
            err = errno.ENOMEM
        elif change in ("create", "move") and base + n - 1 > self.max_gfn:
            err = errno.EINVAL
        elif fault == "arch_prepare":
            err = errno.ENOMEM
        if err:
            if two_swaps:
                self.gen[as_id] += 2 * self.nr_as
            return err
        self.gen[as_id] += (2 if two_swaps else 1) * self.nr_as
        if change == "delete":
            assert old is not None
            del self.slots[(as_id, id)]
            self.pages -= old[1]
        else:
            self.slots[(as_id, id)] = (base, n, flags, hva)
            if change == "create":
                self.pages += n
        return 0
