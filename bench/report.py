"""What a scenario hands back: its figures, its ratios against the reference
measured in the same run, the checks of its outcome, and notes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Outcome:
    scenario: str
    figures: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(check.ok for check in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, bool(ok), detail))

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "figures": self.figures,
            "ratios": self.ratios,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
            "error": self.error,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, dict):
        return "  ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def render(outcome: Outcome) -> str:
    lines = [f"== {outcome.scenario}: {'ok' if outcome.ok else 'FAILED'} ({outcome.seconds:.0f} s)"]
    for name, value in outcome.figures.items():
        lines.append(f"   {name}: {_fmt(value)}")
    for name, value in outcome.ratios.items():
        lines.append(f"   ratio {name}: {_fmt(value)}")
    for check in outcome.checks:
        lines.append(
            f"   [{'ok' if check.ok else 'FAIL'}] {check.name}{': ' + check.detail if check.detail else ''}"
        )
    for note in outcome.notes:
        lines.append(f"   note: {note}")
    if outcome.error:
        lines.append(f"   error: {outcome.error}")
    return "\n".join(lines)


_TROUBLE = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")
_NOISE = re.compile(r"^[\d\-: ,.\[\]+T]+")


def log_trouble(log_dir: Path, limit: int = 4) -> list[str]:
    """ERROR/CRITICAL/Traceback lines of the processes' logs: a count per
    log and the first few distinct messages."""
    notes = []
    for log in sorted(log_dir.glob("*.log")):
        hits = [line for line in log.read_text(errors="replace").splitlines() if _TROUBLE.search(line)]
        if not hits:
            continue
        distinct: list[str] = []
        for line in hits:
            text = _NOISE.sub("", line)[:220]
            if text not in distinct:
                distinct.append(text)
        shown = " | ".join(distinct[:limit])
        notes.append(f"{log.name}: {len(hits)} ERROR/Traceback lines, e.g. {shown}")
    return notes
