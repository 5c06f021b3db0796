"""The hva interval index of a memslot set (the kernel's ``hva_tree``).

Host ranges of slots may overlap (two slots can map the same memory), so this is a real
interval tree: an AVL tree ordered by ``(userspace_addr, id)`` in which every node also
keeps the greatest inclusive end (``hva_last``) of its subtree. A query for the slots
intersecting ``[start, last]`` visits O(log n) nodes plus O(log n) per reported slot.

Delete and move keep a slot's hva range (the ABI forbids changing it), so replacing a
slot with its INVALID copy or its moved copy is an O(1) swap of the node's payload
(``replace``), found through a per-tree id map; only create and delete restructure the
tree. There is no interval tree in the standard library or sortedcontainers, and the
PyPI ``intervaltree`` package rebuilds nodes on removal and is several times slower, so
this module keeps its own.
"""

from __future__ import annotations

from collections.abc import Iterator

from memslots.errors import require
from memslots.slot import Memslot


class _Node:
    __slots__ = ("height", "key", "last", "left", "maxlast", "right", "slot")

    def __init__(self, slot: Memslot) -> None:
        self.slot = slot
        self.key = (slot.userspace_addr << 16) | slot.id
        self.last = slot.hva_last
        self.maxlast = self.last
        self.left: _Node | None = None
        self.right: _Node | None = None
        self.height = 1


def _update(n: _Node) -> None:
    left, right = n.left, n.right
    hl = left.height if left is not None else 0
    hr = right.height if right is not None else 0
    n.height = (hl if hl > hr else hr) + 1
    m = n.last
    if left is not None and left.maxlast > m:
        m = left.maxlast
    if right is not None and right.maxlast > m:
        m = right.maxlast
    n.maxlast = m


def _rotate_right(n: _Node) -> _Node:
    pivot = n.left
    assert pivot is not None
    n.left = pivot.right
    pivot.right = n
    _update(n)
    _update(pivot)
    return pivot


def _rotate_left(n: _Node) -> _Node:
    pivot = n.right
    assert pivot is not None
    n.right = pivot.left
    pivot.left = n
    _update(n)
    _update(pivot)
    return pivot


def _height(n: _Node | None) -> int:
    return n.height if n is not None else 0


def _balance(n: _Node) -> _Node:
    _update(n)
    bf = _height(n.left) - _height(n.right)
    if bf > 1:
        assert n.left is not None
        if _height(n.left.left) < _height(n.left.right):
            n.left = _rotate_left(n.left)
        return _rotate_right(n)
    if bf < -1:
        assert n.right is not None
        if _height(n.right.right) < _height(n.right.left):
            n.right = _rotate_right(n.right)
        return _rotate_left(n)
    return n


def _insert(n: _Node | None, new: _Node) -> _Node:
    if n is None:
        return new
    if new.key < n.key:
        n.left = _insert(n.left, new)
    else:
        n.right = _insert(n.right, new)
    return _balance(n)


def _pop_min(n: _Node) -> tuple[_Node | None, _Node]:
    if n.left is None:
        return n.right, n
    n.left, smallest = _pop_min(n.left)
    return _balance(n), smallest


def _delete(n: _Node | None, key: int) -> _Node | None:
    if n is None:
        raise KeyError(key)
    if key < n.key:
        n.left = _delete(n.left, key)
    elif key > n.key:
        n.right = _delete(n.right, key)
    else:
        if n.left is None:
            return n.right
        if n.right is None:
            return n.left
        rest, succ = _pop_min(n.right)
        succ.left, succ.right = n.left, rest
        n = succ
    return _balance(n)


class HvaTree:
    """Interval tree of slots over their inclusive hva ranges ``[userspace_addr, hva_last]``.

    Complexities (n slots, k results): ``insert``/``remove`` O(log n); ``replace`` O(1);
    ``iter_range`` O(log n + k log n), lazily.
    """

    __slots__ = ("_nodes", "_root")

    def __init__(self) -> None:
        self._root: _Node | None = None
        self._nodes: dict[int, _Node] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def insert(self, slot: Memslot) -> None:
        """Add ``slot``; its id must not be in the tree yet."""
        if slot.id in self._nodes:
            raise KeyError(f"slot id {slot.id} already in the hva tree")
        node = _Node(slot)
        self._nodes[slot.id] = node
        self._root = _insert(self._root, node)

    def remove(self, slot: Memslot) -> None:
        """Remove ``slot`` (it must be the indexed object for its id)."""
        node = self._nodes.get(slot.id)
        if node is None or node.slot is not slot:
            raise KeyError(f"slot id {slot.id} is not indexed by the hva tree")
        self._root = _delete(self._root, node.key)
        del self._nodes[slot.id]

    def can_replace(self, old: Memslot, new: Memslot) -> bool:
        """True when ``new`` has ``old``'s id and hva range, so ``replace`` applies."""
        return (
            old.id == new.id
            and old.userspace_addr == new.userspace_addr
            and old.npages == new.npages
        )

    def replace(self, old: Memslot, new: Memslot) -> None:
        """Swap the payload of ``old``'s node for ``new`` (same id and hva range), O(1)."""
        node = self._nodes.get(old.id)
        if node is None or node.slot is not old or not self.can_replace(old, new):
            raise KeyError("replace needs the indexed slot and an equal hva range")
        node.slot = new

    def iter_range(self, start: int, last: int) -> Iterator[Memslot]:
        """Slots whose hva range intersects ``[start, last]`` (inclusive), ascending by
        ``(userspace_addr, id)``: ``kvm_for_each_memslot_in_hva_range``."""
        stack: list[_Node] = []
        n = self._root
        while True:
            while n is not None and n.maxlast >= start:
                stack.append(n)
                n = n.left
            if not stack:
                return
            n = stack.pop()
            if n.key >> 16 > last:
                return
            if n.last >= start:
                yield n.slot
            n = n.right

    def __iter__(self) -> Iterator[Memslot]:
        """All slots, ascending by ``(userspace_addr, id)``."""
        stack: list[_Node] = []
        n = self._root
        while stack or n is not None:
            while n is not None:
                stack.append(n)
                n = n.left
            n = stack.pop()
            yield n.slot
            n = n.right

    def check(self) -> None:
        """Assert AVL balance, ordering, augmentation and the id map (for tests)."""

        def walk(n: _Node | None, lo: int | None, hi: int | None) -> tuple[int, int, int]:
            if n is None:
                return 0, -1, 0
            require(lo is None or n.key > lo, "hva tree out of order")
            require(hi is None or n.key < hi, "hva tree out of order")
            require(
                n.key == (n.slot.userspace_addr << 16) | n.slot.id,
                "n.key == (n.slot.userspace_addr << 16) | n.slot.id",
            )
            require(n.last == n.slot.hva_last, "hva tree last is stale")
            require(self._nodes.get(n.slot.id) is n, "hva tree id map disagrees")
            hl, ml, cl = walk(n.left, lo, n.key)
            hr, mr, cr = walk(n.right, n.key, hi)
            require(abs(hl - hr) <= 1, "AVL balance broken")
            require(n.height == max(hl, hr) + 1, "AVL height is stale")
            require(n.maxlast == max(n.last, ml, mr), "interval augmentation is stale")
            return n.height, n.maxlast, cl + cr + 1

        _, _, count = walk(self._root, None, None)
        require(count == len(self._nodes), "hva tree node count is off")
