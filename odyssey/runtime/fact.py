"""One line of `odyssey doctor`: a reading, its verdict and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Fact:
    key: str
    """Key in --json output (snake_case)."""
    label: str
    """Left column of the text output."""
    ok: bool
    """True: "ok"; False: "note" (worth knowing; never an error)."""
    summary: str
    """The reading in words, one line."""
    hint: str = ""
    """What it means for Odyssey, or what to do."""
    data: dict = field(default_factory=dict)
    """The figures behind the summary (bytes, MB/s, flags) for --json."""

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "note"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "summary": self.summary, "hint": self.hint, **self.data}

    def lines(self) -> str:
        text = f"{self.verdict:<5} {self.label:<12} {self.summary}"
        return text + (f"\n{'':18} {self.hint}" if self.hint else "")
