"""Terminal output: a progress bar and box-drawn tables of results."""

import math
import numbers
import sys

from tqdm import tqdm


def progress_bar(total: int, initial: int, desc: str, unit: str = "step", disable: bool = False) -> tqdm:
    """tqdm bar on stderr; `initial` lets a resumed run start the bar at its restored step."""
    # In a captured log (CI, nohup) every refresh becomes a line, so refresh rarely there.
    mininterval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=disable,
        file=sys.stderr,
        mininterval=mininterval,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def format_value(v: object) -> str:
    """Floats to 4 significant digits, ints with thousands separators, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    if isinstance(v, numbers.Real):
        v = float(v)
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def boxed_table(title: str, columns: list[str], rows: list[list[object]]) -> str:
    """Render a table with box-drawing characters; numeric columns are right-aligned."""
    if not columns:
        raise ValueError("a table needs at least one column")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells, expected {len(columns)}: {row}")
    cells = [[format_value(v) for v in row] for row in rows]
    # A column is numeric when every non-missing cell is a number; missing cells then line up with the numbers.
    numeric = [
        any(r[i] is not None for r in rows) and all(r[i] is None or _is_number(r[i]) for r in rows)
        for i in range(len(columns))
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    inner = sum(widths) + 3 * len(widths) - 1  # each column is padded by one space per side, plus separators
    if len(title) + 2 > inner:  # widen the last column so a long title fits
        widths[-1] += len(title) + 2 - inner
        inner = len(title) + 2

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "║ " + " │ ".join(padded) + " ║"

    def rule(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    out = [
        "╔" + "═" * inner + "╗",
        "║" + title.center(inner) + "║",
        rule("╟", "─", "┬", "╢"),
        line(columns),
        rule("╟", "─", "┼", "╢"),
        *(line(r) for r in cells),
        rule("╚", "═", "╧", "╝"),
    ]
    return "\n".join(out)
