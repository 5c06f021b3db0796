"""The memory map over a trace as one self-contained HTML page.

:func:`render_html` writes a page with no outside reference: the pictures are inline SVG
drawn here, the style and a short script are inline, the fonts are the reader's own. Every
text that comes from the trace (file names, records, notes) is escaped; the data the script
reads is JSON in a ``<script type="application/json">`` element with ``<``, ``>`` and ``&``
escaped. Without the script the page still shows everything, and each bar's native tooltip
(an SVG ``<title>``) names its slot; with it, hovering shows the slot and the record under
the cursor (clicking pins them), a row of the final map lights up its slot's bars, and a
trace with timestamps can be drawn against time instead of the record index.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Iterable
from typing import IO, Any, Final

from memslots.tools.mapview.model import (
    CALL_KINDS,
    DISAGREE_COLOUR,
    FAILED_COLOUR,
    HAZARD_COLOUR,
    INVALID_COLOUR,
    SLOT_STYLES,
    Bar,
    Column,
    MapView,
    Panel,
    VmSummary,
    gpa_text,
    record_ticks,
    size_text,
    slot_style,
)
from memslots.tools.replay import flag_names
from memslots.tools.text import plural

__all__ = ["render_html"]

#: left margin (gpa labels), top margin (record numbers), strip height, right margin
_LEFT: Final = 100.0
_TOP: Final = 30.0
_STRIP: Final = 12.0
_RIGHT: Final = 14.0
_BOTTOM: Final = 22.0
#: width of one record's column when there is room, and the plot's width limits
_COLUMN: Final = 24.0
_MIN_WIDTH: Final = 360.0
_MAX_WIDTH: Final = 1000.0
#: up to this many records every record and bar has its own native tooltip (an SVG
#: ``<title>``, which works without the script); longer traces rely on the script, and
#: runs of records of one kind share one cell of the strip
_TITLES_UP_TO: Final = 2000


def _e(text: object) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def _n(x: float) -> str:
    """A coordinate: at most two decimals, no trailing zeros."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _script_json(data: Any) -> str:
    """``data`` as JSON safe inside a ``<script>`` element (no ``</script>``, no HTML
    comment, no line separators JavaScript would choke on)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, code)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class _Geometry:
    """Where a panel's pieces go: columns along x, the gpa axis along y."""

    def __init__(self, panel: Panel) -> None:
        self.n = max(1, len(panel.columns))
        self.width = min(_MAX_WIDTH, max(_MIN_WIDTH, self.n * _COLUMN))
        self.cw = self.width / self.n
        self.plot_top = _TOP + _STRIP + 4
        self.plot_height = max(panel.axis.height, 24.0)
        self.total_width = _LEFT + self.width + _RIGHT
        self.total_height = self.plot_top + self.plot_height + _BOTTOM

    def x(self, column: float) -> float:
        return _LEFT + column * self.cw

    def y(self, units: float) -> float:
        return self.plot_top + units


def _cells(a: int, e: int, g: _Geometry, minimum: float = 1.0) -> str:
    """``x``, ``width`` and the ``data-a``/``data-e`` columns the script repositions."""
    x = g.x(a)
    w = max(minimum, g.x(e) - x)
    return f'x="{_n(x)}" width="{_n(w)}" data-a="{a}" data-e="{e}"'


def _bands(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="bands">']
    shade = False
    for band in panel.axis.bands:
        y = g.y(band.y)
        if band.used:
            shade = not shade
            if band.height < 3:
                continue
            fill = "#f4f6f9" if shade else "#ffffff"
            out.append(
                f'<rect x="{_n(_LEFT)}" y="{_n(y)}" width="{_n(g.width)}"'
                f' height="{_n(band.height)}" fill="{fill}"/>'
            )
            continue
        out.append(
            f'<rect class="gap" x="{_n(_LEFT)}" y="{_n(y)}" width="{_n(g.width)}"'
            f' height="{_n(band.height)}" fill="url(#gap-{panel.key})"/>'
        )
        if band.height >= 9:
            out.append(
                f'<text class="gaplabel" x="{_n(_LEFT + g.width / 2)}"'
                f' y="{_n(y + band.height / 2 + 3.5)}">'
                f"{_e(size_text(band.size))} unused ({_e(gpa_text(band.start))}"
                f"-{_e(gpa_text(band.end - 1))})</text>"
            )
    out.append("</g>")
    return out


def _y_axis(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="yaxis">']
    for y_units, gpa in panel.axis.labels():
        y = g.y(y_units)
        out.append(
            f'<line x1="{_n(_LEFT - 4)}" x2="{_n(_LEFT + g.width)}" y1="{_n(y)}" y2="{_n(y)}"/>'
        )
        out.append(f'<text x="{_n(_LEFT - 6)}" y="{_n(y + 3.5)}">{_e(gpa_text(gpa))}</text>')
    out.append("</g>")
    return out


def _x_axis(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="xaxis xindex">']
    bottom = g.plot_top + g.plot_height
    for i in record_ticks(len(panel.columns), g.width):
        x = g.x(i + 0.5)
        out.append(f'<line x1="{_n(x)}" x2="{_n(x)}" y1="{_n(_TOP - 4)}" y2="{_n(_TOP)}"/>')
        out.append(f'<text x="{_n(x)}" y="{_n(_TOP - 7)}">{i}</text>')
        out.append(
            f'<line class="grid" x1="{_n(x)}" x2="{_n(x)}" y1="{_n(g.plot_top)}"'
            f' y2="{_n(bottom)}"/>'
        )
    out.append(
        f'<text class="axisname" x="{_n(_LEFT - 6)}" y="{_n(_TOP - 7)}">record</text>'
        f'<text class="axisname" x="{_n(_LEFT - 6)}" y="{_n(bottom + 15)}">gpa</text>'
    )
    out.append("</g>")
    out.append('<g class="xaxis xtime" style="display:none"></g>')
    return out


def _strip(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="strip">']
    if len(panel.columns) <= _TITLES_UP_TO:
        runs = [(c.index, c.index + 1, c.strip, c.agree) for c in panel.columns]
    else:
        runs = panel.strip_runs()
    for first, end, kind, agree in runs:
        outline = f' stroke="{DISAGREE_COLOUR}" stroke-width="2"' if not agree else ""
        title = ""
        if end - first == 1 and len(panel.columns) <= _TITLES_UP_TO:
            title = f"<title>{_e(_call_title(panel.columns[first]))}</title>"
        out.append(
            f'<rect {_cells(first, end, g)} y="{_n(_TOP)}" height="{_n(_STRIP)}"'
            f' fill="{CALL_KINDS[kind]}"{outline}>{title}</rect>'
        )
    out.append("</g>")
    return out


def _call_title(c: Column) -> str:
    return f"record {c.index}, {c.where}: {c.what}\n{c.kind}: {c.result_text()}"


def _bar_title(bar: Bar, columns: list[Column]) -> str:
    made = columns[bar.start].where if bar.start < len(columns) else "?"
    text = f"{bar.describe()}\nmade by {bar.made_by} at record {bar.start} ({made})"
    if bar.ended_by is not None:
        ended = columns[bar.end].where if bar.end < len(columns) else "?"
        text += f"; ended by {bar.ended_by} at record {bar.end} ({ended})"
    else:
        text += "; in the final map"
    return text


def _bars(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="bars">']
    titles = len(panel.columns) <= _TITLES_UP_TO
    for i, bar in enumerate(panel.bars):
        top, height = panel.axis.span(bar.entry.gpa_start, bar.gpa_end)
        y, h = g.y(top), max(1.0, height)
        style = bar.style
        out.append(
            f'<rect class="bar {style.key}{" thin" if h < 3 else ""}"'
            f' {_cells(bar.start, bar.end, g)} y="{_n(y)}"'
            f' height="{_n(h)}" data-b="{i}" data-slot="{bar.entry.id}">'
            + (f"<title>{_e(_bar_title(bar, panel.columns))}</title>" if titles else "")
            + "</rect>"
        )
        width = (bar.end - bar.start) * g.cw
        if width >= 16 and h >= 11:
            out.append(
                f'<text class="barlabel" x="{_n(g.x(bar.start) + 3)}" y="{_n(y + h / 2 + 3.5)}"'
                f' data-a="{bar.start}" data-dx="3">{_e(bar.label(width))}</text>'
            )
        if bar.invalid_window and bar.end < len(panel.columns):
            out.append(
                f'<rect class="invalid" {_cells(bar.end, bar.end + 1, g, 2.0)} y="{_n(y)}"'
                f' height="{_n(h)}" fill="url(#hatch-{panel.key})" data-b="{i}" data-inv="1">'
                + (
                    f"<title>{_e(f'slot {bar.entry.id} INVALID while record {bar.end} ran')}"
                    f" ({_e(bar.ended_by)})</title>"
                    if titles
                    else ""
                )
                + "</rect>"
            )
    out.append("</g>")
    return out


def _failures(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="failures">']
    for f in panel.failures:
        if not f.size:
            continue
        top, height = panel.axis.span(f.gpa_start, f.gpa_start + f.size)
        c = panel.columns[f.index]
        out.append(
            f'<rect class="failed" {_cells(f.index, f.index + 1, g, 3.0)} y="{_n(g.y(top))}"'
            f' height="{_n(max(2.0, height))}" fill="none" stroke="{FAILED_COLOUR}"'
            f' stroke-width="1.5" stroke-dasharray="3 2" data-c="{f.index}">'
            f"<title>{_e(_call_title(c))}</title></rect>"
        )
    out.append("</g>")
    return out


def _hazards(panel: Panel, g: _Geometry) -> list[str]:
    out = ['<g class="hazards">']
    for i, h in enumerate(panel.hazards):
        top, height = panel.axis.span(h.gpa_start, h.gpa_end)
        # a band at least 6 px wide, inside the plot even after the last record
        w = max(6.0, g.cw)
        x = min(g.x(h.index), _LEFT + g.width - w)
        y0, y1 = g.y(top), max(4.0, height)
        out.append(
            f'<g class="hazard" data-h="{i}" data-a="{h.index}">'
            f'<rect x="{_n(x)}" width="{_n(w)}" y="{_n(y0)}" height="{_n(y1)}"'
            f' fill="{HAZARD_COLOUR}" fill-opacity="0.85"/>'
            f'<path d="M{_n(x + w / 2 - 6)},{_n(_TOP - 2)} h12 l-6,10 z"'
            f' fill="{HAZARD_COLOUR}"/>'
            f"<title>{_e(h.text)}</title></g>"
        )
    out.append("</g>")
    return out


def _defs(panel: Panel) -> str:
    return (
        "<defs>"
        f'<pattern id="hatch-{panel.key}" width="5" height="5" patternUnits="userSpaceOnUse"'
        ' patternTransform="rotate(45)"><rect width="5" height="5" fill="#ffffff"/>'
        f'<line x1="0" y1="0" x2="0" y2="5" stroke="{INVALID_COLOUR}" stroke-width="2.2"/>'
        "</pattern>"
        f'<pattern id="gap-{panel.key}" width="8" height="8" patternUnits="userSpaceOnUse"'
        ' patternTransform="rotate(-30)"><rect width="8" height="8" fill="#ebebeb"/>'
        '<line x1="0" y1="0" x2="0" y2="8" stroke="#dadada" stroke-width="2"/></pattern>'
        "</defs>"
    )


def _svg(panel: Panel, number: int) -> str:
    g = _Geometry(panel)
    label = (
        f"memory map of VM {panel.vm}, address space {panel.as_id}:"
        f" {plural(len(panel.bars), 'slot lifetime')} over {plural(len(panel.columns), 'record')}"
    )
    parts = [
        f'<svg class="map" data-panel="{number}" width="{_n(g.total_width)}"'
        f' height="{_n(g.total_height)}" viewBox="0 0 {_n(g.total_width)} {_n(g.total_height)}"'
        f' role="img" aria-label="{_e(label)}" data-left="{_n(_LEFT)}"'
        f' data-width="{_n(g.width)}" data-top="{_n(_TOP)}">',
        _defs(panel),
        *_bands(panel, g),
        *_y_axis(panel, g),
        *_x_axis(panel, g),
        *_strip(panel, g),
        *_bars(panel, g),
        *_failures(panel, g),
        *_hazards(panel, g),
        f'<rect class="cursor" x="0" y="{_n(g.plot_top)}" width="0"'
        f' height="{_n(g.plot_height)}" style="display:none"/>',
        "</svg>",
    ]
    return "\n".join(parts)


def _final_table(panel: Panel) -> str:
    if panel.final_map is None:
        return '<p class="final">Final map: unknown (the replay did not finish).</p>'
    if not panel.final_map:
        return '<p class="final">Final map: no slots.</p>'
    rows = []
    for e in panel.final_map:
        style = slot_style(e.flags)
        rows.append(
            f'<tr data-slot="{e.id}"><td class="num"><span class="sw" style="background:'
            f'{style.colour}"></span>{e.id}</td><td class="mono">{_e(gpa_text(e.gpa_start))}'
            f'-{_e(gpa_text(e.gpa_end))}</td><td class="num">{_e(size_text(e.size))}</td>'
            f"<td>{_e('|'.join(flag_names(e.flags)) or '-')}</td>"
            f'<td class="mono">{e.userspace_addr:#x}</td></tr>'
        )
    return (
        '<table class="final"><caption>Final map, address space '
        f"{panel.as_id} ({plural(len(panel.final_map), 'slot')})</caption>"
        "<thead><tr><th>slot</th><th>gpa range</th><th>size</th><th>flags</th>"
        "<th>hva (trace)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _legend() -> str:
    items = [
        f'<span class="item"><span class="sw" style="background:{s.colour}"></span>'
        f"{_e(s.label)}</span>"
        for s in SLOT_STYLES
    ]
    items.append(
        '<span class="item"><svg width="14" height="12"><defs><pattern id="hatch-legend"'
        ' width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="5" height="5" fill="#fff"/><line x1="0" y1="0" x2="0" y2="5"'
        f' stroke="{INVALID_COLOUR}" stroke-width="2.2"/></pattern></defs><rect width="14"'
        f' height="12" fill="url(#hatch-legend)" stroke="{INVALID_COLOUR}"/></svg>'
        "INVALID while a delete or move runs</span>"
    )
    items.append(
        f'<span class="item"><span class="sw" style="border:1.5px dashed {FAILED_COLOUR}">'
        "</span>failed call (the range it asked for)</span>"
    )
    items.append(
        f'<span class="item"><span class="sw" style="background:{HAZARD_COLOUR};width:4px">'
        "</span>hazard: hvas taken away under a live slot</span>"
    )
    strip = [
        f'<span class="item"><span class="sw" style="background:{colour}"></span>'
        f"{_e(kind if kind != 'other' else 'other record')}</span>"
        for kind, colour in CALL_KINDS.items()
    ]
    strip.append(
        f'<span class="item"><span class="sw" style="border:2px solid {DISAGREE_COLOUR}">'
        "</span>results disagree</span>"
    )
    return (
        '<div class="legend"><div><b>Slots:</b> '
        + " ".join(items)
        + "</div><div><b>Records</b> (the strip above each map): "
        + " ".join(strip)
        + "</div></div>"
    )


def _vm_header(vm: VmSummary, several: bool) -> str:
    if vm.compared:
        agree = f"{vm.agreeing}/{plural(vm.compared, 'record')} compared"
    else:
        agree = "nothing to compare"
    kinds = ", ".join(f"{n} {k}" for k, n in vm.kinds.items())
    pid = f", process {vm.pid}" if vm.pid else ""
    attached = " (existed before recording began)" if vm.attached else ""
    title = f"<h2>VM {vm.vm}{_e(pid)}{attached}</h2>" if several else ""
    notes = "".join(f'<p class="note">note: {_e(n)}</p>' for n in vm.notes)
    toggle = ""
    if vm.has_time:
        toggle = (
            f'<p class="xmode">x axis: <label><input type="radio" name="x-vm{vm.vm}"'
            f' value="index" checked data-vm="{vm.vm}"> record index</label> <label><input'
            f' type="radio" name="x-vm{vm.vm}" value="time" data-vm="{vm.vm}"> time</label></p>'
        )
    if not vm.records:
        return f"{title}<p>No records: nothing to draw.</p>{notes}"
    sentences = [
        f"{plural(vm.records, 'record')} ({plural(vm.calls, 'memslot call')}) replayed on"
        f" {', '.join(vm.ran) or 'nothing'}; the map is the {vm.primary}'s",
        f"Agreement: {agree}",
    ]
    if kinds:
        sentences.append(kinds)
    return f"{title}<p>{_e('. '.join(sentences))}.</p>{notes}{toggle}"


def _call_json(c: Column) -> dict[str, Any]:
    """A record for the script: where, what, kind, agreement, and the results unless
    every one of them is OK (the usual case, which the script spells out)."""
    row: dict[str, Any] = {"w": c.where, "d": c.what, "k": c.kind, "a": c.agree}
    if c.recorded != 0 or any(r != 0 for r in c.results.values()):
        row["r"] = c.result_text()
    return row


def _data(view: MapView) -> dict[str, Any]:
    """What the script reads: per VM its records, per panel its bars and hazards."""
    vms: dict[str, Any] = {}
    for vm in view.vms:
        mine = view.panels_of(vm.vm)
        columns = mine[0].columns if mine else []
        times = list(itertools.accumulate((c.time_ns for c in columns), max))  # in order
        t0 = times[0] if times else 0
        vms[str(vm.vm)] = {
            "calls": [_call_json(c) for c in columns],
            "ok": ", ".join(["recorded", *vm.ran]),
            "t": [(t - t0) / 1e9 for t in times] if vm.has_time else None,
        }
    panels = []
    for p in view.panels:
        panels.append(
            {
                "vm": p.vm,
                "bars": [
                    {
                        "d": b.describe(),
                        "s": b.start,
                        "e": b.end,
                        "m": b.made_by,
                        "x": b.ended_by,
                        "id": b.entry.id,
                    }
                    for b in p.bars
                ],
                "hz": [h.text for h in p.hazards],
                "n": len(p.columns),
            }
        )
    return {"vms": vms, "panels": panels}


_STYLE: Final = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 20px;color:#222;
background:#fff;font-size:14px}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:22px 0 4px}
h3{font-size:15px;margin:14px 0 4px}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace}
.legend{font-size:12.5px;margin:8px 0 4px;line-height:1.9}
.legend .item{margin-right:12px;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:4px;
box-sizing:border-box}
.legend svg{vertical-align:-2px;margin-right:4px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
svg.map{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:10px;flex:none}
svg.map .yaxis line{stroke:#d5d9e0;stroke-width:0.6}
svg.map .yaxis text{text-anchor:end;fill:#444}
svg.map .xaxis line{stroke:#999;stroke-width:0.6}svg.map .xaxis line.grid{stroke:#eceef2}
svg.map .xaxis text{text-anchor:middle;fill:#444}
svg.map text.axisname{text-anchor:end;font-family:system-ui,sans-serif;font-style:italic;fill:#777}
svg.map .gaplabel{text-anchor:middle;fill:#666;font-size:9.5px}
svg.map .bar{stroke:#ffffff;stroke-width:0.5}
svg.map .bar.thin{stroke:none}svg.map .invalid{stroke:%INVALID%;stroke-width:0.6}
%BARS%
svg.map .bar.hl,svg.map .invalid.hl{stroke:#000;stroke-width:2}
svg.map .barlabel{fill:#fff;font-size:9.5px;pointer-events:none;font-weight:bold}
svg.map .cursor{fill:rgba(0,0,0,0.07);pointer-events:none}
table.final{border-collapse:collapse;font-size:12px}
table.final caption{text-align:left;font-weight:bold;padding-bottom:4px}
table.final td,table.final th{border-bottom:1px solid #e3e3e3;padding:2px 8px;text-align:left}
table.final td.num{text-align:right}table.final tr:hover,table.final tr.hl{background:#fff3c4}
.note{color:#666;font-size:12.5px;margin:2px 0}
#tip{position:fixed;z-index:10;max-width:560px;background:#fffff4;border:1px solid #aaa;
box-shadow:0 2px 8px rgba(0,0,0,.2);padding:6px 9px;font-size:12px;line-height:1.45;
pointer-events:none}
#tip .k{color:#555}#tip .m{font-family:ui-monospace,Menlo,Consolas,monospace}
#tip.pinned{border-color:#333;pointer-events:auto}
footer{margin-top:24px;font-size:12px;color:#777}
"""

_SCRIPT: Final = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("mapview-data").textContent);
  var tip = document.getElementById("tip");
  var pinned = null;
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function columnX(svg, p, c) {
    var left = +svg.dataset.left, width = +svg.dataset.width, n = Math.max(1, p.n);
    var t = svg.timeMode ? data.vms[p.vm].t : null;
    if (!t) return left + c * width / n;
    var last = t[t.length - 1], span = last - t[0];
    var end = last + (span > 0 ? span / (2 * n) : 1);
    var tc = c < t.length ? t[c] : end;
    return left + (tc - t[0]) / (end - t[0]) * width;
  }
  function columnAt(svg, p, x) {
    var lo = 0, hi = p.n;
    if (x < columnX(svg, p, 0) || x >= columnX(svg, p, p.n)) return -1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (columnX(svg, p, mid) <= x) lo = mid; else hi = mid;
    }
    return lo;
  }
  function callHtml(p, c) {
    var vm = data.vms[p.vm], r = vm.calls[c];
    if (!r) return "";
    var result = r.r === undefined ? "OK (" + vm.ok + ")" : r.r;
    return "<div><b>record " + c + "</b> <span class=k>" + esc(r.w) + "</span></div>" +
      "<div class=m>" + esc(r.d) + "</div><div><b>" + esc(r.k) + "</b>: " + esc(result) +
      (r.a ? "" : " <b style='color:#d000d0'>(disagree)</b>") + "</div>";
  }
  function barHtml(p, i, inv) {
    var b = p.bars[i], calls = data.vms[p.vm].calls;
    var made = calls[b.s] ? calls[b.s].w : "?";
    var life = "made by " + b.m + " at record " + b.s + " (" + made + ")";
    if (b.x) life += ", ended by " + b.x + " at record " + b.e +
      " (" + (calls[b.e] ? calls[b.e].w : "?") + ")";
    else life += ", in the final map";
    return "<hr><div><b>" + esc(b.d) + "</b></div><div>" + esc(life) + "</div>" +
      (inv ? "<div><b>INVALID</b> while this " + esc(b.x) + " ran</div>" : "");
  }
  function place(ev) {
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, ev.clientY - h - 14);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function highlight(svg, slotBar) {
    document.querySelectorAll(".hl").forEach(function (el) { el.classList.remove("hl"); });
    if (slotBar === null) return;
    svg.querySelectorAll('[data-b="' + slotBar + '"]').forEach(function (el) {
      el.classList.add("hl");
    });
  }
  function show(svg, p, ev) {
    var pt = svg.createSVGPoint(); pt.x = ev.clientX; pt.y = ev.clientY;
    var at = pt.matrixTransform(svg.getScreenCTM().inverse());
    var c = columnAt(svg, p, at.x), html = "";
    var cursor = svg.querySelector(".cursor");
    if (c >= 0) {
      html += callHtml(p, c);
      var x0 = columnX(svg, p, c), x1 = columnX(svg, p, c + 1);
      cursor.setAttribute("x", x0); cursor.setAttribute("width", Math.max(1, x1 - x0));
      cursor.style.display = "";
    } else cursor.style.display = "none";
    var el = ev.target.closest ? ev.target.closest("[data-b],[data-h]") : null;
    var bar = null;
    if (el && el.dataset.b !== undefined) {
      bar = el.dataset.b; html += barHtml(p, +bar, el.dataset.inv === "1");
    } else if (el && el.dataset.h !== undefined) {
      html += "<hr><div><b>hazard</b>: " + esc(p.hz[+el.dataset.h]) + "</div>";
    }
    highlight(svg, bar);
    if (!html) { tip.hidden = true; return; }
    tip.innerHTML = html; tip.hidden = false; place(ev);
  }
  document.querySelectorAll("svg.map").forEach(function (svg) {
    var p = data.panels[+svg.dataset.panel];
    svg.addEventListener("mousemove", function (ev) { if (!pinned) show(svg, p, ev); });
    svg.addEventListener("mouseleave", function () {
      if (pinned) return;
      tip.hidden = true; svg.querySelector(".cursor").style.display = "none";
      highlight(svg, null);
    });
    svg.addEventListener("click", function (ev) {
      if (pinned) { pinned = null; tip.classList.remove("pinned"); show(svg, p, ev); return; }
      show(svg, p, ev);
      if (!tip.hidden) { pinned = svg; tip.classList.add("pinned"); }
    });
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && pinned) {
      pinned = null; tip.classList.remove("pinned"); tip.hidden = true;
    }
  });
  document.querySelectorAll("table.final tr[data-slot]").forEach(function (tr) {
    var svg = tr.closest(".panel").querySelector("svg.map");
    function mark(on) {
      svg.querySelectorAll('.bar[data-slot="' + tr.dataset.slot + '"]').forEach(function (b) {
        b.classList.toggle("hl", on);
      });
      tr.classList.toggle("hl", on);
    }
    tr.addEventListener("mouseenter", function () { mark(true); });
    tr.addEventListener("mouseleave", function () { mark(false); });
  });
  function relayout(svg, p) {
    svg.querySelectorAll("[data-a]").forEach(function (el) {
      var a = +el.dataset.a, x = columnX(svg, p, a);
      if (el.tagName === "g") {
        el.querySelectorAll("line").forEach(function (l) {
          l.setAttribute("x1", x); l.setAttribute("x2", x);
        });
        var tri = el.querySelector("path"), top = +svg.dataset.top;
        if (tri) tri.setAttribute("d", "M" + (x - 5) + "," + (top - 2) + " h10 l-5,8 z");
        return;
      }
      if (el.tagName === "text") { el.setAttribute("x", x + (+el.dataset.dx || 0)); return; }
      var e = +el.dataset.e, min = el.classList.contains("invalid") ? 2 : 1;
      el.setAttribute("x", x);
      el.setAttribute("width", Math.max(min, columnX(svg, p, e) - x));
    });
    var idx = svg.querySelector(".xindex"), tg = svg.querySelector(".xtime");
    idx.style.display = svg.timeMode ? "none" : "";
    tg.style.display = svg.timeMode ? "" : "none";
    if (svg.timeMode && !tg.firstChild) {
      var t = data.vms[p.vm].t, span = t[t.length - 1] - t[0] || 1;
      var raw = span / 8, pow = Math.pow(10, Math.floor(Math.log10(raw))), step = pow;
      [1, 2, 5, 10].some(function (m) { step = m * pow; return step >= raw; });
      var top = +svg.dataset.top, ns = svg.namespaceURI;
      for (var s = 0; s <= span + 1e-12; s += step) {
        var x = columnX(svg, p, 0) + s / span * (columnX(svg, p, p.n - 1) - columnX(svg, p, 0));
        var lab = step >= 1 ? s.toFixed(0) + " s" : step >= 0.001 ?
          (s * 1e3).toFixed(0) + " ms" : (s * 1e6).toFixed(0) + " µs";
        var line = document.createElementNS(ns, "line");
        line.setAttribute("x1", x); line.setAttribute("x2", x);
        line.setAttribute("y1", top - 4); line.setAttribute("y2", top);
        var text = document.createElementNS(ns, "text");
        text.setAttribute("x", x); text.setAttribute("y", top - 7); text.textContent = lab;
        tg.appendChild(line); tg.appendChild(text);
      }
    }
  }
  document.querySelectorAll(".xmode input").forEach(function (input) {
    input.addEventListener("change", function () {
      var vm = input.dataset.vm;
      document.querySelectorAll("svg.map").forEach(function (svg) {
        var p = data.panels[+svg.dataset.panel];
        if (String(p.vm) !== vm) return;
        svg.timeMode = input.value === "time" && input.checked;
        relayout(svg, p);
      });
    });
  });
  document.documentElement.setAttribute("data-mapview", "ready");  // the script ran through
})();
"""


def _style() -> str:
    """The page's style sheet, with the colour of each kind of slot."""
    bars = "".join(f"svg.map .bar.{st.key}{{fill:{st.colour}}}" for st in SLOT_STYLES)
    return _STYLE.replace("%INVALID%", INVALID_COLOUR).replace("%BARS%", bars)


def _page(view: MapView) -> Iterable[str]:
    source = view.source or "<trace>"
    fmt = f"{view.fmt or 'unknown'}{' v2' if view.version == 2 else ''} format"
    several = len(view.vms) > 1
    calls = sum(vm.calls for vm in view.vms)
    yield "<!DOCTYPE html>"
    yield '<html lang="en"><head><meta charset="utf-8">'
    yield '<meta name="viewport" content="width=device-width, initial-scale=1">'
    yield f"<title>memslots: memory map of {_e(source)}</title>"
    yield f"<style>{_style()}</style></head><body>"
    yield f"<h1>Guest-physical memory map of <code>{_e(source)}</code></h1>"
    embedded = " (the trace shipped with memslots)" if view.embedded else ""
    hazards = f", {plural(view.hazards, 'hazard')}" if view.hazards else ""
    yield (
        f"<p>{_e(fmt)}{embedded}: {plural(calls, 'memslot call')} in"
        f" {plural(len(view.vms), 'VM')}{hazards}. Each slot is a bar over the records it"
        " lived, from the one that made it to the one that ended it; addresses grow"
        " downwards on an axis cut at every slot boundary (a piece's height grows with the"
        " log of its size, unused stretches are squeezed). Hover for the slot and the"
        " record, click to pin.</p>"
    )
    yield _legend()
    number = {id(panel): i for i, panel in enumerate(view.panels)}
    for vm in view.vms:
        yield f'<section class="vm" id="vm{vm.vm}">{_vm_header(vm, several)}'
        for panel in view.panels_of(vm.vm):
            yield f'<div class="panel" id="{panel.key}">'
            yield f"<h3>VM {panel.vm}, address space {panel.as_id}</h3>"
            yield '<div class="row"><figure style="margin:0">'
            yield _svg(panel, number[id(panel)])
            yield "</figure>"
            yield _final_table(panel)
            yield "</div></div>"
        yield "</section>"
    yield "<footer>Made by <code>memslots replay --html</code>.</footer>"
    yield '<div id="tip" hidden></div>'
    yield f'<script type="application/json" id="mapview-data">{_script_json(_data(view))}</script>'
    yield f"<script>{_SCRIPT}</script>"
    yield "</body></html>"


def render_html(view: MapView, out: IO[str]) -> None:
    """Write the page of ``view`` (:func:`memslots.tools.mapview.build`) to ``out``.
    O(records + slot lifetimes) text."""
    for part in _page(view):
        out.write(part)
        out.write("\n")
