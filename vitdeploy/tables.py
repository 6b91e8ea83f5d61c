"""Tables that fit the terminal: columns chosen for its width, names wrapped and never cut.

A report gives every column a priority; when the terminal is too narrow for all of them, the least
important go first and the caption names them (``--wide`` shows all; JSON and CSV always keep all).
Name columns (artifact, path, backend) fold onto more lines instead of ending in an ellipsis, so a
name is always shown whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NAME_MIN_WIDTH = 16  # a name column folds down to this many characters before others are dropped


@dataclass(frozen=True)
class Column:
    name: str
    priority: int = 1  # 0: always shown; the highest numbers are dropped first
    justify: str = "right"
    name_like: bool = False  # a name: folds (wraps) instead of being cut

    def width(self, cells: Sequence[str]) -> int:
        natural = max([len(self.name), *(max((len(line) for line in c.split("\n")), default=0) for c in cells)])
        return min(natural, max(NAME_MIN_WIDTH, len(self.name))) if self.name_like else natural


def choose_columns(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """Indices of the columns to show so that the table fits ``width`` characters."""
    widths = [c.width([r[i] for r in rows]) for i, c in enumerate(columns)]
    keep = list(range(len(columns)))

    def total() -> int:
        return sum(widths[i] for i in keep) + 3 * len(keep) + 1  # rich's borders and padding

    droppable = sorted((i for i, c in enumerate(columns) if c.priority > 0),
                       key=lambda i: (columns[i].priority, i), reverse=True)
    for i in droppable:
        if total() <= width:
            break
        keep.remove(i)
    return keep


def fit_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None,
              wide: bool = False, caption: str | None = None) -> Any:
    """A rich Table of ``rows`` with the columns that fit ``width`` (the terminal's when None)."""
    from rich.console import Console
    from rich.table import Table

    width = width or Console().width
    keep = list(range(len(columns))) if wide else choose_columns(columns, rows, width)
    hidden = [c.name for i, c in enumerate(columns) if i not in keep]
    notes = [caption] if caption else []
    if hidden:
        notes.append(f"not shown for the terminal's width: {', '.join(hidden)} (--wide shows every column)")
    t = Table(title=title, caption="\n".join(notes) or None)
    for i in keep:
        c = columns[i]
        t.add_column(c.name, justify=c.justify, overflow="fold" if c.name_like else "ellipsis",
                     no_wrap=not c.name_like)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return t
