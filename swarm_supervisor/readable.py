"""Printing what came from the shared folder: literally, and whole at any width.

The folder is untrusted: a node's note or a config value may hold an escape sequence (ESC[2J clears the screen)
or rich markup ("[/]" alone makes rich raise). Every such string goes through `plain` and is drawn as a rich
Text, which is never parsed as markup. Tables that the width cannot hold become one block per row, so a pipe,
a notebook or an 80-column terminal shows every name and number whole, never cut with "…".
"""

import unicodedata
from collections.abc import Collection, Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

# what a terminal acts on or hides instead of printing: controls (ESC, newline, BEL), format characters
# (right-to-left overrides, zero-width joiners), line and paragraph separators, lone surrogates
_UNPRINTED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
SEPARATOR = " · "
COLUMN_GAP = 3                    # " │ " between two table columns


def one_line(error: BaseException) -> str:
    """`KeyError: 'x'`: the type, and the first line of the message, if any."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def plain(value: object) -> str:
    """`value` as one line of text with each control character written out ("\\x1b", "\\n"); idempotent."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNPRINTED else ch
                   for ch in text)


def cell(value: object, style: str = "") -> Text:
    return Text(plain(value), style=style)


def _folded(text: Text) -> Text:
    """Wrapped at the width, a word longer than a line split over lines: shown whole, never cut."""
    text.no_wrap, text.overflow = False, "fold"
    return text


class Packed:
    """Items joined by " · " on as few lines as the width needs, a line broken only between items."""

    def __init__(self, items: Sequence[Text], indent: str = ""):
        self.items, self.indent = items, indent

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        line: Text | None = None
        for item in self.items:
            if line is not None and line.cell_len + len(SEPARATOR) + item.cell_len <= options.max_width:
                line.append(SEPARATOR).append_text(item)
                continue
            if line is not None:
                yield _folded(line)
            line = Text(self.indent).append_text(item)
        if line is not None:
            yield _folded(line)


class FittedTable:
    """A table when every value fits the width whole, else one block per row (its first cell a title line).

    `flexible` names the one column that may take what the others leave (a status with its error): at least
    `flexible_width[0]` columns, at most `flexible_width[1]`; it wraps, or with `cut` is cut with "…" (a live
    frame keeps one line per row). No other value is ever cut.
    """

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Text]], right: Collection[str] = (),
                 flexible: str | None = None, flexible_width: tuple[int, int] = (10, 48), cut: bool = False):
        self.columns, self.rows, self.right = columns, rows, right
        self.flexible, self.flexible_width, self.cut = flexible, flexible_width, cut

    def _widths(self) -> list[int]:
        return [max([len(column)] + [row[i].cell_len for row in self.rows]) for i, column in enumerate(self.columns)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self._widths()
        fixed = sum(w for column, w in zip(self.columns, widths) if column != self.flexible)
        room = options.max_width - fixed - COLUMN_GAP * (len(self.columns) - 1)
        if self.flexible is None and room >= 0:
            yield self._table(None)
        elif self.flexible is not None and room >= self.flexible_width[0]:
            yield self._table(min(room, self.flexible_width[1]))
        else:
            yield from self._blocks()

    def _table(self, flexible_room: int | None) -> Table:
        table = Table(expand=False, show_edge=False, pad_edge=False)
        for column in self.columns:
            wraps = column == self.flexible and not self.cut
            table.add_column(column, justify="right" if column in self.right else "left", no_wrap=not wraps,
                             overflow="fold" if wraps else "ellipsis",
                             max_width=flexible_room if column == self.flexible else None)
        for cells in self.rows:
            if self.cut and self.flexible is not None and flexible_room is not None:
                cells = list(cells)
                flexible = self.columns.index(self.flexible)
                cells[flexible] = cells[flexible].copy()
                cells[flexible].truncate(flexible_room, overflow="ellipsis")
            table.add_row(*cells)
        return table

    def _blocks(self) -> RenderResult:
        flexible = self.columns.index(self.flexible) if self.flexible is not None else None
        for cells in self.rows:
            title = cells[0].copy()
            title.stylize("bold")
            if flexible is not None:
                title.append(" ").append_text(cells[flexible])
            yield _folded(title)
            yield Packed([Text(f"{column} ").append_text(value) for i, (column, value)
                          in enumerate(zip(self.columns, cells)) if i not in (0, flexible) and value.plain],
                         indent="  ")
