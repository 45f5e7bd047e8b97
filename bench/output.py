"""Writing a benchmark's results: ``STEM.json``, ``STEM.md`` and ``STEM.png``, then the table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from compressor.texttable import format_table


def write_results(result: dict, stem: Path, to_markdown: Callable[[dict], str], plot: Callable[[dict, Path], None],
                  header: list[str], rows: list[list[str]]) -> None:
    """Write the JSON, markdown and plot of ``result`` beside ``stem`` and print the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(result))
    plot(result, stem.with_suffix(".png"))
    print(format_table(header, rows))
    print(f"wrote {stem}.json, .md, .png")
