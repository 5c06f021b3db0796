"""The memory map over a trace as a PNG image, through matplotlib (the ``plot`` extra).

:func:`render_png` draws the same :class:`~memslots.tools.mapview.model.MapView` as the
HTML page: per VM and address space, the record strip, the slots as bars over the records
they lived on the compressed gpa axis, the INVALID windows hatched, failed calls dashed,
hazards as red lines, and the final map as a table beside it. One axis unit is one pixel
of the image, as on the page.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Final

from memslots.tools.mapview.model import (
    CALL_KINDS,
    DISAGREE_COLOUR,
    FAILED_COLOUR,
    HAZARD_COLOUR,
    INVALID_COLOUR,
    SLOT_STYLES,
    MapView,
    Panel,
    gpa_text,
    record_ticks,
    size_text,
    slot_style,
)
from memslots.tools.replay import flag_names
from memslots.tools.text import plural

__all__ = ["PNG_EXTRA", "matplotlib_available", "render_png"]

#: how to get matplotlib, for the error message when it is missing
PNG_EXTRA: Final = "pip install 'memslots[plot]'"

_DPI: Final = 100
#: the image's width in pixels, and the share of it the timelines get
_WIDTH: Final = 1400
_PLOT_SHARE: Final = 0.66
#: pixels above and below each panel's timeline (title, ticks), the record strip
_PANEL_TOP: Final = 44
_PANEL_BOTTOM: Final = 26
_STRIP: Final = 12.0
_HEADER: Final = 92
#: most rows of a final map shown in the image, and their height in pixels
_TABLE_ROWS: Final = 40
_ROW_PX: Final = 17


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (without importing it). O(1)."""
    return importlib.util.find_spec("matplotlib") is not None


def _panel_height(panel: Panel) -> float:
    return _PANEL_TOP + _STRIP + 4 + max(panel.axis.height, 24.0) + _PANEL_BOTTOM


def _boxes(ax: Any, boxes: list[tuple[float, float, float, float]], **style: Any) -> None:
    """Draw ``(x, y, width, height)`` boxes as one collection (thousands cost little)."""
    if not boxes:
        return
    collections: Any = importlib.import_module("matplotlib.collections")
    verts = [((x, y), (x + w, y), (x + w, y + h), (x, y + h)) for x, y, w, h in boxes]
    ax.add_collection(collections.PolyCollection(verts, **style))


def _draw_panel(ax: Any, table_ax: Any, panel: Panel, plot_px: float, body_px: float) -> None:
    n = max(1, len(panel.columns))
    px_per_col = plot_px / n
    axis = panel.axis
    height = max(axis.height, 24.0)
    strip_top = -(_STRIP + 4)
    ax.set_xlim(0, n)
    ax.set_ylim(height, strip_top)
    ax.set_title(
        f"VM {panel.vm}, address space {panel.as_id}: {plural(len(panel.bars), 'slot lifetime')},"
        f" {plural(len(panel.columns), 'record')}",
        fontsize=10,
        loc="left",
    )

    # the gpa axis: used pieces shaded alternately, gaps hatched and labelled
    shaded, gaps = [], []
    shade = False
    for band in axis.bands:
        if band.used:
            shade = not shade
            if shade and band.height >= 3:
                shaded.append((0.0, band.y, float(n), band.height))
            continue
        gaps.append((0.0, band.y, float(n), band.height))
        if band.height >= 9:
            ax.text(
                n / 2,
                band.y + band.height / 2,
                f"{size_text(band.size)} unused",
                ha="center",
                va="center",
                fontsize=7,
                color="#555",
                bbox={"facecolor": "#ebebeb", "edgecolor": "none", "pad": 0.5},
            )
    _boxes(ax, shaded, facecolor="#f4f6f9", linewidths=0, zorder=0.2)
    _boxes(ax, gaps, facecolor="#ebebeb", edgecolor="#d4d4d4", hatch="///", linewidths=0)
    labels = axis.labels()
    ax.set_yticks([y for y, _ in labels])
    ax.set_yticklabels([gpa_text(g) for _, g in labels], fontsize=7, family="monospace")
    ax.grid(axis="y", color="#d5d9e0", lw=0.5)
    ax.set_axisbelow(True)
    ticks = record_ticks(len(panel.columns), plot_px)
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False, length=3)
    ax.tick_params(axis="y", length=3)
    ax.set_xlabel("record", fontsize=8, style="italic", color="#666")
    for side in ("right", "bottom", "left", "top"):
        ax.spines[side].set_visible(False)

    # the record strip
    runs = panel.strip_runs()
    _boxes(
        ax,
        [(a, strip_top, e - a, _STRIP) for a, e, _, _ in runs],
        facecolors=[CALL_KINDS[kind] for _, _, kind, _ in runs],
        linewidths=0,
    )
    _boxes(
        ax,
        [(a, strip_top, e - a, _STRIP) for a, e, _, agree in runs if not agree],
        facecolor="none",
        edgecolor=DISAGREE_COLOUR,
        linewidths=1.5,
    )

    # the slots, their INVALID windows (hatched where they are wide enough to show it),
    # the slot ids where they fit
    bars: list[tuple[float, float, float, float]] = []
    hatched: list[tuple[float, float, float, float]] = []
    narrow: list[tuple[float, float, float, float]] = []
    colours: list[str] = []
    window = max(1.0, 2 / px_per_col)
    for bar in panel.bars:
        top, h = axis.span(bar.entry.gpa_start, bar.gpa_end)
        h = max(1.0, h)
        bars.append((float(bar.start), top, float(bar.end - bar.start), h))
        colours.append(bar.style.colour)
        if bar.invalid_window and bar.end < len(panel.columns):
            (hatched if window * px_per_col >= 4 else narrow).append((bar.end, top, window, h))
        if (bar.end - bar.start) * px_per_col >= 16 and h >= 11:
            ax.text(
                bar.start + 3 / px_per_col,
                top + h / 2,
                bar.label((bar.end - bar.start) * px_per_col),
                va="center",
                fontsize=7,
                color="white",
                weight="bold",
                family="monospace",
            )
    thin = [h < 3 for _, _, _, h in bars]  # an edge would hide a bar thinner than it
    _boxes(
        ax, bars, facecolors=colours, edgecolor="white", linewidths=[0 if t else 0.4 for t in thin]
    )
    _boxes(ax, hatched, facecolor="white", edgecolor=INVALID_COLOUR, hatch="//////", linewidths=0.5)
    _boxes(ax, narrow, facecolor=INVALID_COLOUR, linewidths=0)
    fails = []
    for f in panel.failures:
        if f.size:
            top, h = axis.span(f.gpa_start, f.gpa_start + f.size)
            fails.append((float(f.index), top, 1.0, max(2.0, h)))
    _boxes(ax, fails, facecolor="none", edgecolor=FAILED_COLOUR, linestyles="--", linewidths=1.2)
    for hz in panel.hazards:
        top, h = axis.span(hz.gpa_start, hz.gpa_end)
        # a box at least one record (and 4 px) wide, inside the plot after the last one too
        w = max(1.0, 4 / px_per_col)
        x = min(float(hz.index), n - w)
        _boxes(ax, [(x, top, w, max(4.0, h))], facecolor=HAZARD_COLOUR, linewidths=0)
        ax.plot([x + w / 2], [strip_top + _STRIP / 2], marker="v", color=HAZARD_COLOUR, ms=8)

    # the final map beside it
    table_ax.axis("off")
    entries = panel.final_map
    if entries is None or not entries:
        text = "Final map: unknown" if entries is None else "Final map: no slots"
        table_ax.text(0, 1, text, va="top", fontsize=9, transform=table_ax.transAxes)
        return
    rows = [
        [
            str(e.id),
            f"{gpa_text(e.gpa_start)}-{gpa_text(e.gpa_end)}",
            size_text(e.size),
            "|".join(flag_names(e.flags)) or "-",
        ]
        for e in entries[:_TABLE_ROWS]
    ]
    colours = [slot_style(e.flags).colour for e in entries[:_TABLE_ROWS]]
    if len(entries) > _TABLE_ROWS:
        rows.append(["", f"... and {len(entries) - _TABLE_ROWS} more", "", ""])
        colours.append("#ffffff")
    table_ax.set_title(
        f"Final map, address space {panel.as_id} ({plural(len(entries), 'slot')})",
        fontsize=9,
        loc="left",
    )
    row_h = min(_ROW_PX / body_px, 1 / (len(rows) + 1))
    table = table_ax.table(
        cellText=rows,
        colLabels=["slot", "gpa range", "size", "flags"],
        colWidths=[0.09, 0.5, 0.17, 0.28],
        cellLoc="left",
        bbox=[0, 1 - row_h * (len(rows) + 1), 1, row_h * (len(rows) + 1)],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#dddddd")
        cell.set_linewidth(0.5)
        if r == 0:
            cell.set_text_props(weight="bold")
        elif c == 0:
            cell.set_facecolor(colours[r - 1])
            cell.get_text().set_color("white" if colours[r - 1] != "#ffffff" else "black")
        if c == 1 and r:
            cell.get_text().set_family("monospace")


def render_png(view: MapView, path: str) -> None:
    """Save the picture of ``view`` (:func:`memslots.tools.mapview.build`) to ``path``
    as a PNG. Needs matplotlib (the ``plot`` extra): ImportError without it; OSError
    when the file cannot be written. O(records + slot lifetimes)."""
    mpl: Any = importlib.import_module("matplotlib")
    mpl.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    patches: Any = importlib.import_module("matplotlib.patches")
    heights = [_panel_height(p) for p in view.panels]
    total = _HEADER + sum(heights)
    fig = plt.figure(figsize=(_WIDTH / _DPI, total / _DPI), dpi=_DPI)
    fmt = f"{view.fmt or 'unknown'}{' v2' if view.version == 2 else ''} format"
    calls = sum(vm.calls for vm in view.vms)
    fig.text(
        0.01,
        1 - 10 / total,
        f"Guest-physical memory map of {view.source or '<trace>'}",
        fontsize=13,
        weight="bold",
        va="top",
    )
    empty = [str(vm.vm) for vm in view.vms if not vm.records]
    undrawn = f" (VM {', '.join(empty)}: no records)" if empty else ""
    fig.text(
        0.01,
        1 - 32 / total,
        f"{fmt}: {plural(calls, 'memslot call')} in {plural(len(view.vms), 'VM')}{undrawn}."
        " Slots as bars"
        " over the records they lived; gpa grows downwards, each piece of the axis sized by"
        " the log of its size, unused stretches squeezed.",
        fontsize=8.5,
        va="top",
        color="#333",
    )
    handles = [patches.Patch(facecolor=s.colour, label=s.label) for s in SLOT_STYLES]
    handles += [
        patches.Patch(facecolor="white", edgecolor=INVALID_COLOUR, hatch="//////",
                      label="INVALID during delete/move"),
        patches.Patch(facecolor="none", edgecolor=FAILED_COLOUR, linestyle="--",
                      label="failed call"),
        patches.Patch(facecolor=HAZARD_COLOUR, label="hazard"),
    ]  # fmt: skip
    handles += [
        patches.Patch(facecolor=colour, label=f"strip: {kind}")
        for kind, colour in CALL_KINDS.items()
        if kind != "other"
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 1 - 46 / total),
        ncol=8,
        fontsize=7.5,
        frameon=False,
        handlelength=1.4,
        columnspacing=1.2,
    )
    left, plot_w = 0.075, _PLOT_SHARE - 0.075
    y = total - _HEADER
    for panel, h in zip(view.panels, heights, strict=True):
        body = h - _PANEL_TOP - _PANEL_BOTTOM
        bottom = (y - h + _PANEL_BOTTOM) / total
        ax = fig.add_axes((left, bottom, plot_w, body / total))
        table_ax = fig.add_axes(
            (_PLOT_SHARE + 0.02, bottom, 0.97 - _PLOT_SHARE - 0.02, body / total)
        )
        _draw_panel(ax, table_ax, panel, plot_w * _WIDTH, body)
        y -= h
    try:
        fig.savefig(path, dpi=_DPI)
    finally:
        plt.close(fig)
