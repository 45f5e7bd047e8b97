"""Fixed-width text tables for the terminal reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], total: Sequence[object] | None = None) -> str:
    """Left-aligned columns, a rule under the header and, if given, a rule above the total row."""
    body = [list(map(str, row)) for row in rows]
    footer = [list(map(str, total))] if total is not None else []
    every = [list(header), *body, *footer]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [line(header), rule, *map(line, body)]
    if footer:
        lines += [rule, line(footer[0])]
    return "\n".join(lines)
