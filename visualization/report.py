"""The study report: `<study-dir>/report/` with one PNG per figure and `report.md`, a page that
reads without W&B (tables, findings, and the figures inline)."""
from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

from experiments import faults
from visualization.plots import save_figure
from visualization.terminal import format_value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return format_value(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure_file(study: str, key: str) -> str:
    """Path of a figure's PNG inside the report folder."""
    return f"{study}/{_slug(key)}.png"


def data_file(study: str, key: str) -> str:
    """Path of a long table's CSV inside the report folder."""
    return f"{study}/{_slug(key)}.csv"


def write_csv(path: Path, headers: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def write_report(study_dir: Path, meta: dict, results: list) -> Path:
    """Write the report afresh (figures are closed once saved); returns the Markdown page's path."""
    out = study_dir / "report"
    tmp = study_dir / ".report.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arms = meta["arms"]
    lines = [f"# Study `{meta['study_id']}`", "",
             f"Studies: {', '.join(meta['spec']['study']['names'])}. Status: **{meta['status']}**. "
             f"Report written {time.strftime('%Y-%m-%d %H:%M')} from the files in this folder "
             f"(`python run_experiments.py --report {meta['study_id']}` rebuilds it).", "",
             "## Arms", "", _md_table(
                 ["arm", "id", "architecture", "dead handling", "studies", "status", "steps", "time (s)"],
                 [[a["name"], a["arm_id"], a["architecture"], a["dead_handling"], ", ".join(a.get("studies", [])),
                   a["status"] + (f" ({a['reason']})" if a.get("reason") else ""), a.get("steps"), a.get("seconds")]
                  for a in arms]), ""]
    for res in results:
        lines += [f"## {res.name}", "", f"*{res.question}*", ""]
        lines += [f"- {f}" for f in res.findings] + ([""] if res.findings else [])
        for table in res.tables.values():
            lines += [f"**{table.title}**", "", _md_table(table.headers, table.rows), ""]
        for key, table in res.data.items():
            rel = data_file(res.name, key)
            write_csv(tmp / rel, table.headers, table.rows)
            lines += [f"**{table.title}**: [{rel}]({rel}) ({len(table.rows):,} rows)", ""]
        for key, draw in res.figures.items():
            rel = figure_file(res.name, key)
            save_figure(draw(), tmp / rel)  # one figure open at a time
            faults.reached("report-figure")
            lines += [f"![{res.name} {key}]({rel})", ""]
    (tmp / "report.md").write_text("\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a half-written report never replaces a complete one
    return out / "report.md"
