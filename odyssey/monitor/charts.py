"""Plots drawn on a Tk Canvas (no matplotlib): a line chart with reference lines and filled areas,
and a bar strip for the per-layer page-in times of the last pass.

Each chart redraws itself from plain data (lists of (x, y) segments, already downsampled to about
the canvas width by series.py), so a redraw costs a few canvas items whatever the length of the run.
"""

from __future__ import annotations

import math
import time
import tkinter as tk
from collections.abc import Sequence
from dataclasses import dataclass, field

from odyssey.monitor.records import layer_rows

# Colors: readable on white, distinct for the eye and for the screenshot test.
INK = "#222222"
GRID = "#e6e6e6"
AXIS = "#888888"
BLUE = "#1f77b4"
LIGHT_BLUE = "#c6dcef"
ORANGE = "#ff7f0e"
GREEN = "#2ca02c"
LIGHT_GREEN = "#dff2df"
RED = "#d62728"
PURPLE = "#9467bd"
GREY = "#9aa4ad"
STALL = "#7a1f5c"  # consumer stall on top of a layer's read time

PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 40, 22  # px around the plot area (title and legend above)
TIME_STEPS_S = (
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    172800,
    604800,
)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(v, 12))
        v += step
    return ticks


def time_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` clock-friendly ticks (every 1 s ... 1 week, aligned to local time) in [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return []
    raw = (hi - lo) / max(1, n)
    step = next((s for s in TIME_STEPS_S if s >= raw), TIME_STEPS_S[-1])
    offset = time.localtime(lo).tm_gmtoff  # align to local minutes and hours
    first = math.ceil((lo + offset) / step) * step - offset
    return [first + i * step for i in range(int((hi - first) // step) + 1)][:50]


def fmt_tick(v: float, span: float) -> str:
    if span >= 100 or v == int(v) and span >= 5:
        return f"{v:,.0f}"
    if span >= 1:
        return f"{v:.1f}"
    if span >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_clock(t: float, span: float) -> str:
    if span > 2 * 86400:
        return time.strftime("%m-%d %H:%M", time.localtime(t))
    return time.strftime("%H:%M:%S" if span < 300 else "%H:%M", time.localtime(t))


@dataclass
class Line:
    segments: Sequence[Sequence[tuple[float, float]]]
    color: str = BLUE
    width: int = 1
    label: str = ""
    fill_to: float | None = None
    """Fill the area between the line and this y value (a budget, or the bottom)."""
    fill: str = ""
    dash: tuple = ()


@dataclass
class HLine:
    y: float
    color: str = RED
    label: str = ""
    dash: tuple = (6, 3)
    width: int = 1


@dataclass
class ChartData:
    lines: list[Line] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    vlines: list[float] = field(default_factory=list)
    """x positions marked with a thin vertical line (a resume)."""
    empty_text: str = ""
    note: str = ""
    """Text at the top right (e.g. the current headroom)."""
    y_floor: float | None = None
    """Include this y in the range (0 for MB/s)."""


class Chart:
    """A titled line chart on its own Canvas. x_kind 'step' labels x as numbers, 'time' as clock."""

    def __init__(self, parent, title: str, font, small_font, x_kind: str = "step", y_unit: str = "", height: int = 200):
        self.canvas = tk.Canvas(
            parent, bg="white", highlightthickness=1, highlightbackground="#cfcfcf", height=height, width=300
        )
        self.title, self.font, self.small = title, font, small_font
        self.x_kind, self.y_unit = x_kind, y_unit
        self.data = ChartData()
        self.canvas.bind("<Configure>", lambda e: self.redraw())

    def width(self) -> int:
        return max(50, self.canvas.winfo_width())

    def points_budget(self) -> int:
        """How many points a series should be downsampled to: about two per pixel column."""
        return max(64, 2 * (self.width() - PAD_L - PAD_R))

    def draw(self, data: ChartData) -> None:
        self.data = data
        self.redraw()

    def redraw(self) -> None:
        c, d = self.canvas, self.data
        c.delete("all")
        W, H = self.width(), max(50, c.winfo_height())
        c.create_text(8, 4, text=self.title, anchor="nw", font=self.font, fill=INK)
        if d.note:
            c.create_text(W - PAD_R, 5, text=d.note, anchor="ne", font=self.small, fill=INK)
        x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T, H - PAD_B  # plot area, y1 is the bottom
        pts = [p for L in d.lines for seg in L.segments for p in seg]
        if not pts:
            c.create_rectangle(x0, y0, x1, y1, outline=GRID)
            c.create_text(
                (x0 + x1) / 2,
                (y0 + y1) / 2,
                text=d.empty_text or "no data yet / 데이터 없음",
                font=self.small,
                fill=AXIS,
            )
            return
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts] + [h.y for h in d.hlines]
        ys += [L.fill_to for L in d.lines if L.fill_to is not None and L.fill_to != -math.inf]
        if d.y_floor is not None:
            ys.append(d.y_floor)
        xmin, xmax = min(xs), max(xs)
        if xmax <= xmin:
            xmax = xmin + 1
        ymin, ymax = min(ys), max(ys)
        pad = (ymax - ymin) * 0.1 or abs(ymax) * 0.1 or 1.0  # room for reference-line labels
        ymin, ymax = ymin - (pad if d.y_floor is None or ymin < d.y_floor else 0), ymax + pad

        def sx(x: float) -> float:
            return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

        def sy(y: float) -> float:
            return y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

        # grid and axes
        for v in nice_ticks(ymin, ymax, max(2, int((y1 - y0) / 40))):
            y = sy(v)
            c.create_line(x0, y, x1, y, fill=GRID)
            c.create_text(x0 - 4, y, text=fmt_tick(v, ymax - ymin), anchor="e", font=self.small, fill=AXIS)
        n_x = max(2, int((x1 - x0) / 90))
        for v in time_ticks(xmin, xmax, n_x) if self.x_kind == "time" else nice_ticks(xmin, xmax, n_x):
            x = sx(v)
            c.create_line(x, y0, x, y1, fill=GRID)
            label = fmt_clock(v, xmax - xmin) if self.x_kind == "time" else fmt_tick(v, xmax - xmin)
            c.create_text(x, y1 + 3, text=label, anchor="n", font=self.small, fill=AXIS)
        c.create_rectangle(x0, y0, x1, y1, outline=AXIS)
        if self.y_unit:
            c.create_text(x0 - 4, y0 - 2, text=self.y_unit, anchor="se", font=self.small, fill=AXIS)

        # filled areas first, then lines on top
        for L in d.lines:
            if L.fill_to is None or not L.fill:
                continue
            base = sy(max(ymin, min(ymax, L.fill_to))) if L.fill_to != -math.inf else y1
            for seg in L.segments:
                if len(seg) < 2:
                    continue
                poly = [sx(seg[0][0]), base]
                for x, y in seg:
                    poly += [sx(x), sy(y)]
                poly += [sx(seg[-1][0]), base]
                c.create_polygon(poly, fill=L.fill, outline="")
        for v in d.vlines:
            if xmin <= v <= xmax:
                c.create_line(sx(v), y0, sx(v), y1, fill=PURPLE, dash=(2, 3))
        for h in d.hlines:
            c.create_line(x0, sy(h.y), x1, sy(h.y), fill=h.color, dash=h.dash, width=h.width)
            if h.label:
                c.create_text(x0 + 4, sy(h.y) - 1, text=h.label, anchor="sw", font=self.small, fill=h.color)
        for L in d.lines:
            if not L.color:  # a fill-only entry
                continue
            for seg in L.segments:
                if len(seg) == 1:
                    x, y = sx(seg[0][0]), sy(seg[0][1])
                    c.create_oval(x - 2, y - 2, x + 2, y + 2, fill=L.color, outline=L.color)
                elif seg:
                    coords = [v for x, y in seg for v in (sx(x), sy(y))]
                    c.create_line(coords, fill=L.color, width=L.width, dash=L.dash)
        # legend, in the row between the title and the plot
        legend(c, x0, y0 - 10, [(L.color, L.label, L.width) for L in d.lines if L.label and L.color], self.small)


def legend(c: tk.Canvas, x: float, y: float, entries, font, box: bool = False) -> None:
    """Draw (color, label, width) entries left to right starting at (x, y)."""
    for color, label, width in entries:
        if box:
            c.create_rectangle(x, y - 5, x + 10, y + 5, fill=color, outline="")
            tx = x + 14
        else:
            c.create_line(x, y, x + 14, y, fill=color, width=max(2, width))
            tx = x + 18
        item = c.create_text(tx, y, text=label, anchor="w", font=font, fill=INK)
        bbox = c.bbox(item)
        x = (bbox[2] if bbox else tx + 80) + 12


class LayerStrip:
    """One bar per unit (layer, head) of the last step: height = time spent reading it from disk
    (forward and backward reads together), a dark cap = the consumer's stall on it, colour by its
    throughput (MB/s) relative to the median, so a slow layer or a disk hiccup stands out. A unit
    served from a slot every time (the last layer in backward) is a grey stub."""

    def __init__(self, parent, title: str, font, small_font, height: int = 120):
        self.canvas = tk.Canvas(
            parent, bg="white", highlightthickness=1, highlightbackground="#cfcfcf", height=height, width=300
        )
        self.title, self.font, self.small = title, font, small_font
        self.layers: list[dict] = []
        self.step = None
        self.empty_text = "no page-in pass yet / 페이지인 기록 없음"
        self.bars: list[dict] = []  # strip_bars(self.layers)
        self.canvas.bind("<Configure>", lambda e: self.redraw())

    def draw(self, layers: list[dict], step, empty_text: str = "") -> None:
        """Show a pagein record's layers. The window calls this on every chart refresh (a memory
        sample a second) but a new record comes once a step: the same record is not drawn again."""
        empty_text = empty_text or self.empty_text
        if (layers, step, empty_text) == (self.layers, self.step, self.empty_text):
            return
        self.layers, self.step, self.empty_text = layers, step, empty_text
        self.bars = strip_bars(layers)
        self.redraw()

    def redraw(self) -> None:
        c = self.canvas
        c.delete("all")
        W, H = max(50, c.winfo_width()), max(50, c.winfo_height())
        title = self.title + (f"  (step {self.step})" if self.step is not None else "")
        c.create_text(8, 4, text=title, anchor="nw", font=self.font, fill=INK)
        x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T + 2, H - PAD_B
        bars = self.bars
        if not bars:
            c.create_text((x0 + x1) / 2, (y0 + y1) / 2, text=self.empty_text, font=self.small, fill=AXIS)
            return
        tmax = max(b["total_s"] for b in bars) or 1e-3
        c.create_text(
            W - PAD_R,
            5,
            anchor="ne",
            font=self.small,
            fill=INK,
            text=f"median {fmt_ms(bars[0]['median_s'])} · max {fmt_ms(tmax)} · "
            f"total {fmt_ms(sum(b['total_s'] for b in bars))}",
        )
        for v in nice_ticks(0, tmax * 1000, 3):
            y = y1 - v / 1000 / tmax * (y1 - y0)
            if y < y0 - 1:
                continue
            c.create_line(x0, y, x1, y, fill=GRID)
            c.create_text(x0 - 4, y, text=fmt_tick(v, tmax * 1000), anchor="e", font=self.small, fill=AXIS)
        c.create_text(x0 - 4, y0 - 2, text="ms", anchor="se", font=self.small, fill=AXIS)
        legend(
            c,
            x0,
            y0 - 12,
            [
                (BLUE, "read / 읽기", 1),
                (STALL, "stall / 대기", 1),
                (ORANGE, "slow ≥2× / 느림", 1),
                (RED, "≥3×", 1),
                (GREY, "reused / 재사용", 1),
            ],
            self.small,
            box=True,
        )
        n = len(bars)
        slot = (x1 - x0) / n
        gap = 1 if slot < 6 else 2
        label_every = max(1, math.ceil(28 / slot))
        for i, b in enumerate(bars):
            bx0, bx1 = x0 + i * slot + gap, x0 + (i + 1) * slot - gap
            yr = y1 - b["read_s"] / tmax * (y1 - y0)
            ys = yr - b["stall_s"] / tmax * (y1 - y0)
            if b["reads"]:
                c.create_rectangle(bx0, min(yr, y1 - 1), bx1, y1, fill=b["color"], outline="")
            else:
                c.create_rectangle(bx0, y1 - 3, bx1, y1, fill=GREY, outline="")
            if b["stall_s"] > 0:
                c.create_rectangle(bx0, ys, bx1, yr, fill=STALL, outline="")
            if i % label_every == 0 or b["slow"] or i == n - 1:
                c.create_text(
                    (bx0 + bx1) / 2,
                    y1 + 3,
                    text=b["name"],
                    anchor="n",
                    font=self.small,
                    fill=RED if b["slow"] else AXIS,
                )
        c.create_line(x0, y1, x1, y1, fill=AXIS)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 1000:
        return f"{seconds:.2f} s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def strip_bars(layers: list[dict]) -> list[dict]:
    """Bars for LayerStrip from a pagein record's layers (pure logic, tested without a display):
    feed.layer_rows plus total_s, median_s (over the units that were read), slow and color.
    Slowness is judged by MB/s against the median rate (embed and head are bigger than a layer,
    not slower), else by time when rates are missing; a unit much smaller than the median (a tied
    model's head holds only the final norm) is never called slow: its rate is all latency."""
    bars = layer_rows(layers)
    if not bars:
        return []
    for b in bars:
        b["total_s"] = b["read_s"] + b["stall_s"]
    read = [b for b in bars if b["reads"]]
    times = sorted(b["total_s"] for b in read) or [0.0]
    med = times[len(times) // 2]
    rates = sorted(b["mb_s"] for b in read if b["mb_s"])
    use_rate = bool(read) and len(rates) == len(read)
    med_rate = rates[len(rates) // 2] if use_rate else 0.0
    sizes = sorted(b["bytes"] / b["reads"] for b in read)
    small = sizes[len(sizes) // 2] / 4 if sizes else 0.0  # bytes a read; below: latency, not rate
    for b in bars:
        b["median_s"] = med
        if not b["reads"] or b["bytes"] / b["reads"] < small:  # e.g. a tied model's head (a norm)
            slowness = 0.0
        elif use_rate:
            slowness = med_rate / b["mb_s"]
        else:
            slowness = b["total_s"] / med if med > 0 else 1.0
        b["slow"] = slowness >= 2.0
        b["color"] = GREY if not b["reads"] else RED if slowness >= 3.0 else ORANGE if slowness >= 2.0 else BLUE
    return bars
