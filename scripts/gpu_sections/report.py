"""The check rows and the report that prints them, tables them and writes the --json file, and
`guarded`, which turns a failing check into a FAIL row."""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    section: str
    check: str
    value: str
    target: str = ""
    verdict: str = "INFO"  # PASS, FAIL, INFO, SKIP


@dataclass
class Report:
    """Rows as they come (printed at once), per-section data, written to --json after each
    section so that a run cut short keeps what it measured."""

    cuda: bool
    json_path: Path | None
    header: str = ""
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def add(self, section: str, check: str, value: str, target: str = "",
            verdict: str = "INFO") -> None:
        if not self.cuda and verdict in ("PASS", "FAIL"):
            value, verdict = f"cpu dry run: {value}", "SKIP"
        row = Row(section, check, value, target, verdict)
        self.rows.append(row)
        print(f"[{section}] {check}: {value}" + (f" (target {target})" if target else "")
              + f" -> {verdict}", flush=True)

    def check(self, section: str, check: str, value: str, target: str, ok: bool) -> None:
        self.add(section, check, value, target, "PASS" if ok else "FAIL")

    def skip(self, section: str, check: str, why: str) -> None:
        self.rows.append(Row(section, check, why, "", "SKIP"))
        print(f"[{section}] {check}: {why} -> SKIP", flush=True)

    def fail(self, section: str, check: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        self.rows.append(Row(section, check, message, "", "FAIL"))
        self.data.setdefault("errors", []).append(
            {"section": section, "check": check, "traceback": traceback.format_exc()})
        print(f"[{section}] {check}: {message} -> FAIL", flush=True)
        traceback.print_exc()

    def write_json(self) -> None:
        if self.json_path is None:
            return
        self.json_path.write_text(json.dumps(
            {"header": self.header, "command": sys.argv,
             "rows": [asdict(row) for row in self.rows], **self.data},
            indent=1, default=str))

    def table(self) -> str:
        lines = ["| section | check | value | target | verdict |", "|---|---|---|---|---|"]
        for row in self.rows:
            cells = (row.section, row.check, row.value, row.target, row.verdict)
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)


@contextlib.contextmanager
def guarded(report: Report, section: str, check: str):
    """A failing check becomes a FAIL row; the section goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (any failure is a result here)
        report.fail(section, check, error)
