"""Tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def emit(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, fmt: str,
         records: Sequence[dict[str, Any]] | None = None) -> None:
    """Print rows as ``fmt``: "json" (records, or rows keyed by header), "table" or "auto"."""
    if fmt == "json":
        data = records if records is not None else [
            {h.lower().replace(" ", "_"): v for h, v in zip(headers, r, strict=False)}
            for r in rows
        ]
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    if fmt == "auto" and sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*(str(c) for c in r))
        Console().print(table)
        return
    # Plain, tab-aligned like ctr's tabwriter (minwidth 1, padding 1, space).
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        sys.stdout.write("".join(c.ljust(w + 1) for c, w in zip(row, widths, strict=False))
                         + "\n")
