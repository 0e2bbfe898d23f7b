"""The monitor window: value fields, live charts, the per-layer page-in strip, a log pane and the
Pause / Resume / Checkpoint now / Stop buttons. Tkinter only; labels in English and Korean.

Its only input and output is the run directory (feed.py reads it, buttons write control requests),
so the window can attach to a live or a finished run, and closing it never touches the trainer.
A Tk `after` timer polls the feed every ~500 ms; each poll reads at most `feed.POLL_BYTES`, and
polls come back sooner while bytes are waiting, so a 100,000-line file loads without freezing.
"""

from __future__ import annotations

import math
import os
import time
import tkinter as tk
import tkinter.font as tkfont
from pathlib import Path

from odyssey.errors import OdysseyError
from odyssey.monitor import MonitorSettings, charts
from odyssey.monitor.charts import Chart, ChartData, HLine, LayerStrip, Line
from odyssey.monitor.feed import ACTION_LABELS, Feed
from odyssey.monitor.fields import fmt_mb_s

# Families with Hangul glyphs, best first; the first one installed is used for every widget.
HANGUL_FAMILIES = (
    "Noto Sans CJK KR",
    "Noto Sans KR",
    "Noto Sans CJK",
    "NanumGothic",
    "NanumBarunGothic",
    "Nanum Gothic",
    "UnDotum",
    "Baekmuk Gulim",
    "Malgun Gothic",
    "Apple SD Gothic Neo",
    "AppleGothic",
    "Source Han Sans KR",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
)

# (key in Feed.values(), English, Korean)
FIELDS = (
    ("step", "Step", "단계"),
    ("loss", "Loss", "손실"),
    ("val_loss", "Validation loss", "검증 손실"),
    ("tokens_per_s", "Tokens/s", "초당 토큰"),
    ("step_s", "Step time", "단계 시간"),
    ("eta", "ETA", "남은 시간"),
    ("pagein", "Page-in", "페이지인"),
    ("stall", "Stall", "대기 비율"),
    ("resident", "Resident", "상주"),
    ("rss", "Anonymous RSS", "익명 메모리"),
    ("budget", "Budget", "메모리 예산"),
    ("headroom", "Headroom", "여유 메모리"),
    ("temp", "Temperature", "온도"),
    ("guard", "Guard", "가드 상태"),
)

INTERVAL_MS = 500
CATCH_UP_MS = 20  # next poll while metrics.jsonl still has unread bytes
CATCH_UP_DRAW_S = 1.0  # while catching up, charts are redrawn at most this often
LOG_COLORS = {"info": "#333333", "warning": "#b35900", "error": "#c62828", "guard": "#6a3d9a"}


def pick_family(families) -> str | None:
    """The first family of HANGUL_FAMILIES among `families` (case-insensitive), else one whose name
    suggests Korean glyphs, else None (Tk's default font; Xft may still fall back per glyph)."""
    by_lower = {f.lower(): f for f in families}
    for name in HANGUL_FAMILIES:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    for f in sorted(families):
        low = f.lower()
        if any(k in low for k in ("nanum", "cjk kr", "gothic kr", "sans kr", "hangul", "gulim", "dotum", "batang")):
            return f
    return None


class MonitorApp:
    """Builds the window on `root` and refreshes it from a Feed on an `after` timer."""

    def __init__(self, root: tk.Tk, run_dir: str | os.PathLike, interval_ms: int = INTERVAL_MS):
        self.root = root
        self.feed = Feed(run_dir)
        self.interval_ms = interval_ms
        self._drawn_version = -1
        self._drawn_t = float("-inf")
        self._log_seq = 0
        self._after_id: str | None = None
        self._closed = False

        root.title(f"Odyssey monitor / 오디세이 모니터 — {Path(run_dir).name}")
        root.minsize(980, 640)
        root.protocol("WM_DELETE_WINDOW", self.close)
        self._setup_fonts()
        self._build()

    # --- layout ---
    def _setup_fonts(self) -> None:
        self.family = pick_family(tkfont.families(self.root))
        for name in ("TkDefaultFont", "TkTextFont", "TkMenuFont", "TkHeadingFont", "TkCaptionFont"):
            try:
                f = tkfont.nametofont(name, root=self.root)
            except tk.TclError:
                continue
            if self.family:
                f.configure(family=self.family)
            f.configure(size=10)
        fam = self.family or tkfont.nametofont("TkDefaultFont", root=self.root).actual("family")
        self.font = tkfont.Font(root=self.root, family=fam, size=10)
        self.bold = tkfont.Font(root=self.root, family=fam, size=10, weight="bold")
        self.title_font = tkfont.Font(root=self.root, family=fam, size=13, weight="bold")
        self.small = tkfont.Font(root=self.root, family=fam, size=8)
        self.value_font = tkfont.Font(root=self.root, family=fam, size=10, weight="bold")

    def _build(self) -> None:
        root = self.root
        root.configure(bg="#f4f5f7")
        bg = "#f4f5f7"

        header = tk.Frame(root, bg=bg)
        header.pack(side="top", fill="x", padx=8, pady=(6, 2))
        tk.Label(header, text="Odyssey monitor / 오디세이 모니터", font=self.title_font, bg=bg).pack(side="left")
        self.header_var = tk.StringVar(value="")
        tk.Label(header, textvariable=self.header_var, font=self.font, bg=bg, fg="#555555", anchor="w").pack(
            side="left", padx=12, fill="x", expand=True
        )

        # bottom: log pane (packed before the body so it keeps its height when the window shrinks)
        logf = tk.LabelFrame(
            root,
            text="Log: guard events and warnings / 기록: 가드 이벤트와 경고",
            font=self.bold,
            bg=bg,
            padx=4,
            pady=2,
        )
        logf.pack(side="bottom", fill="x", padx=8, pady=(2, 8))
        self.log_text = tk.Text(
            logf, height=7, font=self.font, wrap="none", bg="white", relief="flat", state="disabled"
        )
        scroll = tk.Scrollbar(logf, command=self.log_text.yview)
        self.log_text.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.log_text.pack(side="left", fill="both", expand=True)
        # follow the end of the log unless the user scrolled up to read
        self._follow_log = True
        self.log_text.bind("<Configure>", lambda e: self._follow_log and self.log_text.yview_moveto(1.0))

        def on_scroll(*args):
            self.log_text.yview(*args)
            self._update_follow()

        scroll.configure(command=on_scroll)
        for ev in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
            self.log_text.bind(ev, lambda e: self.root.after_idle(self._update_follow), add="+")
        for level, color in LOG_COLORS.items():
            self.log_text.tag_configure(level, foreground=color)
        self.log_text.tag_configure("time", foreground="#888888")

        body = tk.Frame(root, bg=bg)
        body.pack(side="top", fill="both", expand=True, padx=8, pady=2)

        # left: values and controls
        left = tk.Frame(body, bg=bg, width=330)
        left.pack(side="left", fill="y", padx=(0, 8))
        vals = tk.LabelFrame(left, text="Now / 현재 값", font=self.bold, bg=bg, padx=6, pady=4)
        vals.pack(side="top", fill="x")
        self.value_vars: dict[str, tk.StringVar] = {}
        self.value_entries: dict[str, tk.Entry] = {}
        for row, (key, en, ko) in enumerate(FIELDS):
            tk.Label(vals, text=f"{en} / {ko}", font=self.font, bg=bg, anchor="w").grid(
                row=row, column=0, sticky="w", pady=1
            )
            var = tk.StringVar(value="–")
            entry = tk.Entry(
                vals,
                textvariable=var,
                state="readonly",
                width=22,
                font=self.value_font,
                relief="flat",
                readonlybackground="white",
                fg="#111111",
                justify="right",
            )
            entry.grid(row=row, column=1, sticky="ew", padx=(6, 0), pady=1)
            self.value_vars[key] = var
            self.value_entries[key] = entry
        vals.columnconfigure(1, weight=1)

        ctl = tk.LabelFrame(left, text="Control / 제어", font=self.bold, bg=bg, padx=6, pady=6)
        ctl.pack(side="top", fill="x", pady=(8, 0))
        self.buttons: dict[str, tk.Button] = {}
        colors = {"pause": "#fff4e0", "resume": "#e6f4e6", "checkpoint": "#e8f0fb", "stop": "#fde8e8"}
        for i, action in enumerate(("pause", "resume", "checkpoint", "stop")):
            en, ko = ACTION_LABELS[action]
            b = tk.Button(
                ctl,
                text=f"{en}\n{ko}",
                font=self.font,
                bg=colors[action],
                width=14,
                activebackground="#dddddd",
                command=lambda a=action: self.on_button(a),
            )
            b.grid(row=i // 2, column=i % 2, padx=3, pady=3, sticky="ew")
            self.buttons[action] = b
        ctl.columnconfigure(0, weight=1)
        ctl.columnconfigure(1, weight=1)
        self.ack_var = tk.StringVar(
            value="Requests go to the trainer through control.json.\n요청은 control.json으로 전달됩니다."
        )
        self.ack_label = tk.Label(
            ctl,
            textvariable=self.ack_var,
            font=self.font,
            bg=bg,
            fg="#333333",
            justify="left",
            anchor="w",
            wraplength=300,
        )
        self.ack_label.grid(row=2, column=0, columnspan=2, sticky="ew", pady=(4, 0))

        # right: charts and the strip
        right = tk.Frame(body, bg=bg)
        right.pack(side="left", fill="both", expand=True)
        grid = tk.Frame(right, bg=bg)
        grid.pack(side="top", fill="both", expand=True)
        self.loss_chart = Chart(grid, "Loss / 손실", self.bold, self.small, x_kind="step")
        self.pagein_chart = Chart(grid, "Page-in / 페이지인", self.bold, self.small, x_kind="time", y_unit="MB/s")
        self.ram_chart = Chart(
            grid, "RAM vs budget / 메모리 대 예산", self.bold, self.small, x_kind="time", y_unit="MiB"
        )
        self.temp_chart = Chart(grid, "Temperature / 온도", self.bold, self.small, x_kind="time", y_unit="°C")
        for i, ch in enumerate((self.loss_chart, self.pagein_chart, self.ram_chart, self.temp_chart)):
            ch.canvas.grid(row=i // 2, column=i % 2, sticky="nsew", padx=2, pady=2)
        for i in range(2):
            grid.rowconfigure(i, weight=1)
            grid.columnconfigure(i, weight=1)
        self.strip = LayerStrip(
            right, "Per-layer page-in, last step / 층별 페이지인 (마지막 단계)", self.bold, self.small, height=140
        )
        self.strip.canvas.pack(side="top", fill="x", padx=2, pady=(4, 0))

    # --- controls ---
    def on_button(self, action: str) -> None:
        try:
            self.feed.request(action)
        except OSError as e:
            self.ack_var.set(f"could not write the request: {e}")
            return
        self.refresh_values()

    # --- refresh ---
    def start(self) -> None:
        self.tick()

    def tick(self) -> None:
        if self._closed:
            return
        try:
            self.feed.poll()
        except Exception as e:  # a surprise in the run directory must not kill the window
            self.header_var.set(f"error reading the run: {type(e).__name__}: {e}")
        self.refresh()
        delay = CATCH_UP_MS if self.feed.more_waiting else self.interval_ms
        self._after_id = self.root.after(delay, self.tick)

    def refresh(self) -> None:
        self.refresh_values()
        if self.feed.version != self._drawn_version:
            now = time.monotonic()
            if self.feed.more_waiting and now - self._drawn_t < CATCH_UP_DRAW_S:
                return  # still reading a long file: draw the charts once a second meanwhile
            self._drawn_version, self._drawn_t = self.feed.version, now
            self.refresh_charts()
            self.refresh_log()

    def refresh_values(self) -> None:
        feed = self.feed
        _set(self.header_var, feed.header_text())
        for key, text in feed.values().items():
            var = self.value_vars.get(key)
            if var is not None:
                _set(var, text)
        head = feed.headroom_mib()
        low = head is not None and feed.budget_mib and head < (1 - feed.limits.soft_pct / 100) * feed.budget_mib
        self.value_entries["headroom"].configure(fg="#c62828" if low else "#111111")
        ack = feed.ack_text()
        if ack:
            _set(self.ack_var, ack)
        enabled = feed.enabled_actions()
        for action, b in self.buttons.items():
            want = "normal" if action in enabled else "disabled"
            if str(b.cget("state")) != want:
                b.configure(state=want)

    def refresh_charts(self) -> None:
        feed = self.feed
        n = self.loss_chart.points_budget()
        loss = ChartData(empty_text="no steps yet / 아직 단계 없음", vlines=list(feed.resume_steps))
        loss.lines = [
            Line(feed.loss.segments(n), color=charts.LIGHT_BLUE, label="train / 학습"),
            Line(feed.loss_ema.segments(n), color=charts.BLUE, width=2, label="smoothed / 평활"),
            Line(feed.val_loss.segments(n), color=charts.ORANGE, width=2, label="validation / 검증"),
        ]
        if feed.resume_steps:
            loss.note = f"resumed at step {feed.resume_steps[-1]} / 재개"
        self.loss_chart.draw(loss)

        n = self.pagein_chart.points_budget()
        pagein = ChartData(empty_text="no page-in figures yet / 페이지인 기록 없음", y_floor=0.0)
        pagein.lines = [
            Line(feed.pagein.segments(n), color=charts.GREEN, width=1, fill_to=-math.inf, fill=charts.LIGHT_GREEN)
        ]
        last = feed.pagein.last()
        if last:
            pagein.note = fmt_mb_s(last[1])
        self.pagein_chart.draw(pagein)

        n = self.ram_chart.points_budget()
        ram = ChartData(empty_text="no memory samples yet / 메모리 기록 없음", y_floor=0.0)
        anon = feed.anon.segments(n)
        budget = feed.budget_mib
        if budget:
            # the headroom: the band between the usage curve and the budget line
            ram.lines.append(Line(anon, color="", fill_to=budget, fill=charts.LIGHT_GREEN))
        ram.lines.append(
            Line(anon, color=charts.BLUE, width=2, fill_to=-math.inf, fill=charts.LIGHT_BLUE, label="anonymous / 익명")
        )
        if len(feed.cgroup):  # only a capped group (guard --enforce-cgroup, a container limit)
            ram.lines.append(Line(feed.cgroup.segments(n), color=charts.PURPLE, label="cgroup"))
        if budget:
            ram.hlines.append(HLine(budget, charts.RED, f"budget / 예산 {budget:,.0f} MiB", dash=(), width=2))
            soft = budget * feed.limits.soft_pct / 100
            ram.hlines.append(HLine(soft, charts.ORANGE, f"guard checkpoint {feed.limits.soft_pct:.0f} %", dash=(3, 3)))
            head = feed.headroom_mib()
            if head is not None:
                ram.note = f"headroom / 여유 {head:,.0f} MiB"
        self.ram_chart.draw(ram)

        n = self.temp_chart.points_budget()
        temp = ChartData(empty_text="temperature unavailable here / 온도 정보 없음")
        if len(feed.temp):
            temp.lines = [Line(feed.temp.segments(n), color=charts.RED, width=2, label="CPU")]
            lim = feed.limits
            temp.hlines = [
                HLine(lim.max_temp_c, charts.RED, f"pause / 일시정지 {lim.max_temp_c:.0f} °C"),
                HLine(lim.resume_temp_c, charts.GREEN, f"resume / 재개 {lim.resume_temp_c:.0f} °C"),
            ]
            temp.note = f"{feed.temp.last()[1]:.0f} °C"
        self.temp_chart.draw(temp)

        if feed.mode == "full":
            self.strip.draw(
                [], None, "full mode: every weight stays in RAM, nothing is paged / 전체 학습: 페이지인 없음"
            )
        else:
            self.strip.draw(feed.layers, feed.layers_step)

    def refresh_log(self) -> None:
        entries = self.feed.log_since(self._log_seq)
        if not entries:
            return
        self._log_seq = entries[-1].seq
        text = self.log_text
        at_end = self._follow_log
        text.configure(state="normal")
        for e in entries:
            text.insert("end", time.strftime("%H:%M:%S ", time.localtime(e.t)), ("time",))
            text.insert("end", f"{e.level:<8}{e.text}\n", (e.level,))
        lines = int(text.index("end-1c").split(".")[0])
        if lines > 1000:
            text.delete("1.0", f"{lines - 1000}.0")
        text.configure(state="disabled")
        if at_end:
            text.yview_moveto(1.0)

    def _update_follow(self) -> None:
        self._follow_log = self.log_text.yview()[1] >= 0.999

    def close(self) -> None:
        self._closed = True
        if self._after_id is not None:
            try:
                self.root.after_cancel(self._after_id)
            except tk.TclError:
                pass
        self.root.destroy()


def _set(var: tk.StringVar, text: str) -> None:
    if var.get() != text:
        var.set(text)


# --------------------------------------------------------------------------------------------
# entry points


def open_window(
    run_dir: str | os.PathLike, geometry: str = "1280x800", interval_ms: int = INTERVAL_MS
) -> tuple[tk.Tk, MonitorApp]:
    """Create the Tk root and the app (not yet polling: call app.start(), then root.mainloop())."""
    from odyssey.monitor import display_problem

    problem = display_problem()
    if problem:
        raise OdysseyError(problem)
    try:
        root = tk.Tk(className="OdysseyMonitor")
    except tk.TclError as e:
        raise OdysseyError(
            f"cannot open a window on DISPLAY={os.environ.get('DISPLAY', '')!r} ({e}); "
            "on a headless machine run `xvfb-run -a odyssey monitor RUN`"
        ) from None
    if geometry:
        root.geometry(geometry)
    return root, MonitorApp(root, run_dir, interval_ms=interval_ms)


def show(settings: MonitorSettings) -> int:
    """Open the window on a run directory (`odyssey.monitor.show` has checked it, the display and
    tkinter) and return when it is closed (exit status 0). With `settings.screenshot`, save a PNG of
    the window once the run is read and `screenshot_after_s` passed, then close it (how
    docs/monitor.png is made)."""
    if settings.screenshot:
        try:
            from PIL import ImageGrab
        except ImportError:
            raise OdysseyError("--screenshot needs Pillow: pip install pillow") from None
    root, app = open_window(settings.run, geometry=settings.geometry, interval_ms=settings.interval_ms)
    app.start()
    if settings.screenshot:
        t0 = time.monotonic()

        def shoot() -> None:
            feed = app.feed
            if (
                feed.more_waiting
                or app._drawn_version != feed.version
                or time.monotonic() - t0 < settings.screenshot_after_s
            ):
                root.after(100, shoot)
                return
            root.update()
            x, y = root.winfo_rootx(), root.winfo_rooty()
            image = ImageGrab.grab(
                bbox=(x, y, x + root.winfo_width(), y + root.winfo_height()), xdisplay=os.environ.get("DISPLAY") or None
            )
            Path(settings.screenshot).parent.mkdir(parents=True, exist_ok=True)
            image.save(settings.screenshot)
            print(f"saved {settings.screenshot} ({image.width}x{image.height})")
            app.close()

        root.after(100, shoot)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        pass
    return 0
