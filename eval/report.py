"""Score reports: the CSV of rows (written atomically) and the summary table printed at the end.

JSON goes through :func:`vistok.tokenizers.atomic.atomic_write_json`, which also turns NaN/inf into null.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistok.tokenizers.atomic import atomic_write_text


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Path:
    """One line per row; missing values are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    return atomic_write_text(path, buffer.getvalue())


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` (only those with at least one value), right-aligned."""
    shown = [c for c in columns if any(row.get(c) is not None for row in rows)]
    cells = [[_cell(row.get(c)) for c in shown] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(shown)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)
