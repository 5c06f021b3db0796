"""Pictures of a replayed trace: the guest-physical memory map over the trace.

``memslots replay TRACE --html FILE`` writes :func:`render_html`'s page and ``--png FILE``
:func:`render_png`'s image. Both draw the same :class:`MapView` (:func:`build`), made from
what the replay computed (the primary model's changes of the slots, its results, the
hazards): one panel per VM and address space, the records along x, the gpa space on a
compressed axis along y, each slot a bar over the records it lived, coloured by its flags;
the INVALID window of each delete and move hatched, failed calls and hazards marked; the
final map beside it. The modules: :mod:`.model` (the timeline), :mod:`.html` (the page),
:mod:`.png` (the image, through matplotlib: the ``plot`` extra).
"""

from __future__ import annotations

from memslots.tools.mapview.html import render_html
from memslots.tools.mapview.model import MapView, Panel, build
from memslots.tools.mapview.png import PNG_EXTRA, matplotlib_available, render_png

__all__ = [
    "PNG_EXTRA",
    "MapView",
    "Panel",
    "build",
    "matplotlib_available",
    "render_html",
    "render_png",
]
