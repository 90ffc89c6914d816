"""Terminal output: a progress bar and box-drawn tables of results."""

import math
import numbers
import sys
import textwrap

from tqdm import tqdm


def progress_bar(total: int, initial: int, desc: str, unit: str = "step", disable: bool = False,
                 position: int | None = None) -> tqdm:
    """tqdm bar on stderr; `initial` lets a resumed run start the bar at its restored step, and
    `position` stacks the bars of arms trained together, one line each."""
    # In a captured log (CI, nohup) every refresh becomes a line, so refresh rarely there.
    mininterval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=disable,
        position=position,
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


def shortlist(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, comma-separated, with " ..." when there are more."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def format_timing(timing: dict[str, float]) -> str:
    """summary.json's "timing" as "310 s (model 3 s, training 220 s, ...)": phases under half a second left out."""
    shown = ", ".join(f"{name} {sec:.0f} s" for name, sec in timing.items() if name != "total" and sec >= 0.5)
    return f"{timing['total']:.0f} s ({shown})"


def round_beside(value: float, threshold: float, digits: int = 2) -> float:
    """`value` rounded to `digits` decimals, or more (up to 4, then cut towards its own side) where
    rounding would carry it across `threshold`: 0.7996 beside 0.8 is 0.7996, never 0.8."""
    reached = value >= threshold
    for d in range(digits, 5):
        rounded = round(value, d)
        if (rounded >= threshold) == reached:
            return rounded
    return (math.ceil if reached else math.floor)(value * 1e4) / 1e4  # e.g. 0.79999 -> 0.7999


def format_beside(value: float, threshold: float, digits: int = 2) -> str:
    """round_beside as text, with as many decimals as it kept ("0.80", "0.7996")."""
    rounded = round_beside(value, threshold, digits)
    shown = next(d for d in range(digits, 5) if round(rounded, d) == rounded or d == 4)
    return f"{rounded:.{shown}f}"


def boxed_table(title: str, columns: list[str], rows: list[list[object]], width: int = 100) -> str:
    """Render a table with box-drawing characters; numeric columns are right-aligned.

    No line is wider than `width` (unless one column alone is): long headers wrap onto several
    lines, and a table still too wide continues below, repeating its first column."""
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
    if sum(w + 3 for w in widths) + 1 > width:  # too wide: long headers wrap, down to their longest word
        widths = [min(w, max([8, *map(len, c.split())] + [len(r[i]) for r in cells]))
                  for i, (c, w) in enumerate(zip(columns, widths))]
    chunks, chunk = [], [0]
    for i in range(1, len(columns)):
        if chunk[1:] and sum(widths[j] + 3 for j in (*chunk, i)) + 1 > width:
            chunks.append(chunk)
            chunk = [0]
        chunk.append(i)
    chunks.append(chunk)
    parts = [_box(title if n == 0 else f"{title} (continued)", [columns[i] for i in c], [widths[i] for i in c],
                  [[r[i] for i in c] for r in cells], [numeric[i] for i in c], width) for n, c in enumerate(chunks)]
    return "\n".join(parts)


def _box(title: str, columns: list[str], widths: list[int], cells: list[list[str]], numeric: list[bool],
         width: int) -> str:
    widths = list(widths)
    inner = sum(widths) + 3 * len(widths) - 1  # each column is padded by one space per side, plus separators
    # A long title widens a narrow table (its last column) to 60 columns, then wraps.
    grow = min(len(title) + 2, max(inner, 60), width - 2) - inner
    if grow > 0:
        widths[-1] += grow
        inner += grow
    title_lines = textwrap.wrap(title, inner - 2) or [""]
    headers = [textwrap.wrap(c, w) or [""] for c, w in zip(columns, widths)]
    depth = max(map(len, headers))
    headers = [[""] * (depth - len(h)) + h for h in headers]  # bottom-aligned, next to the values

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "║ " + " │ ".join(padded) + " ║"

    def rule(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    out = [
        "╔" + "═" * inner + "╗",
        *("║" + t.center(inner) + "║" for t in title_lines),
        rule("╟", "─", "┬", "╢"),
        *(line([h[d] for h in headers]) for d in range(depth)),
        rule("╟", "─", "┼", "╢"),
        *(line(r) for r in cells),
        rule("╚", "═", "╧", "╝"),
    ]
    return "\n".join(out)


def wrapped_finding(text: str, width: int = 100) -> str:
    """A finding as a bullet that wraps within `width` columns."""
    return textwrap.fill(text, width, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False)
