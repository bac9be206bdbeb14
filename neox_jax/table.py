"""Text tables, one formatter for every table the package prints: a header line, a rule of dashes, one line per
row; columns sized to their widest cell. A module that prints a table keeps only its columns."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

MISSING = "-"  # the cell of a value that is None: no figure (no peak to divide by, no HF row, ...)


@dataclasses.dataclass(frozen=True)
class Column:
    """header: the column's title. value: a row's key (a mapping's key, a sequence's index) or a function of the
    row. fmt: a format spec (",.0f", ".2%") or a function of the value to its text; never called on None.
    align: ">" right (figures), "<" left (names). width: at least this many characters (the header, or a cell,
    may make it wider): a table keeps its look whatever its rows."""
    header: str
    value: str | int | Callable[[Any], Any]
    fmt: str | Callable[[Any], str] = ""
    align: str = ">"
    width: int = 0

    def cell(self, row: Any) -> str:
        if callable(self.value):
            v = self.value(row)
        else:  # a mapping's missing key is a missing value, as None is
            v = row.get(self.value) if isinstance(row, Mapping) else row[self.value]
        if v is None:
            return MISSING
        return self.fmt(v) if callable(self.fmt) else format(v, self.fmt)


def render(columns: Sequence[Column], rows: Iterable[Any], gap: str = " ") -> str:
    """The header, a rule as wide as the table, then one line per row; columns joined by `gap`, trailing spaces
    dropped."""
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max(c.width, len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(texts: list[str]) -> str:
        return gap.join(f"{t:{c.align}{w}}" for t, c, w in zip(texts, columns, widths)).rstrip()

    rule = "-" * (sum(widths) + len(gap) * (len(widths) - 1))
    return "\n".join([line([c.header for c in columns]), rule, *map(line, cells)])
