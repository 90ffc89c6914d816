"""The study report: `<study-dir>/report/` with one PNG per figure and `report.md`, a page that
reads without W&B (tables, findings, and the figures inline)."""
from __future__ import annotations

import csv
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from config.records import StudyRecord, hook_label
from visualization.generated import markdown_table
from visualization.plots import save_figures
from visualization.terminal import format_timing, format_value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _md_table(headers: list[str], rows: list[list]) -> str:
    return markdown_table(headers, [[format_value(v) for v in row] for row in rows])


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


def summary_lines(results: list) -> list[str]:
    """Every study's findings, one bullet each: the top of the report and of a docs excerpt."""
    lines = []
    for res in results:
        lines += [f"- **{res.name}**: {finding}" for finding in res.findings] or [f"- **{res.name}**: no result."]
    return lines


def write_report(study_dir: Path, record: StudyRecord, results: list, source_rows: list[list[str]],
                 after_figure: Callable[[], None] = lambda: None) -> Path:
    """Write the report afresh (figures are closed once saved); returns the Markdown page's path.

    The page opens with what a reader needs first: the findings of every study and the setup (model,
    hook, data, arms, training, code); then one section per study with its tables and its figures,
    each with a line saying what to look for. `source_rows` are the setup rows, from the source, that
    say what the activations were."""
    out = study_dir / "report"
    tmp = study_dir / ".report.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = [f"# Study `{record.study_id}`", "",
             f"Studies: {', '.join(record.spec['study']['names'])}. Status: **{record.status}**. "
             f"Report written {time.strftime('%Y-%m-%d %H:%M')} from the files in this folder "
             f"(`python run_experiments.py --report {record.study_id}` rebuilds it).", "", "## Summary", "",
             *summary_lines(results), "", *setup_section(record, source_rows)]
    jobs = []  # every figure of the report, drawn once the page is laid out
    for res in results:
        lines += [f"## {res.name}", "", f"*{res.question}*", ""]
        for table in res.tables.values():
            lines += [f"**{table.title}**", "", _md_table(table.headers, table.rows), ""]
        for key, table in res.data.items():
            rel = data_file(res.name, key)
            write_csv(tmp / rel, table.headers, table.rows)
            lines += [f"**{table.title}**: [{rel}]({rel}) ({len(table.rows):,} rows)", ""]
        for key, draw in res.figures.items():
            rel = figure_file(res.name, key)
            jobs.append((draw, tmp / rel))
            lines += [f"![{res.name} {key}]({rel})", "", f"*{res.captions[key]}*", ""]
    for _ in save_figures(jobs):
        after_figure()  # the runner's fault-injection point
    (tmp / "report.md").write_text("\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a half-written report never replaces a complete one
    return out / "report.md"


def setup_section(record: StudyRecord, source_rows: list[list[str]]) -> list[str]:
    """The "Setup" section: what the activations were (`source_rows`), how each arm was trained,
    which code ran."""
    spec, setup = record.spec, record.setup
    data, train = spec["data"], spec["plans"][0]["arms"][0]["train"] if spec.get("plans") else {}
    rows = list(source_rows)
    caches = record.hooks
    first = next(iter(caches.values()), {})
    if "train_tokens" in first:  # the same tokens at every hook point
        scales = [(hook, info.get("norm_scale")) for hook, info in caches.items() if info.get("norm_scale")]
        scaled = (f" {scales[0][1]:.4g}" if len(scales) == 1 else
                  " " + ", ".join(f"{scale:.4g} ({hook_label(hook)})" for hook, scale in scales))
        rows.append(["activation cache" + ("s" if len(caches) > 1 else ""),
                     f"{first['train_tokens']:,} train and {first['eval_tokens']:,} eval activations"
                     + (" per hook point" if len(caches) > 1 else "") + " (metrics on eval)"
                     + (f", scaled by{scaled} to mean squared norm d_in" if data.get("normalize") and scales else "")])
    if train:
        rows.append(["training", f"{train['steps'] or str(train['epochs']) + ' epochs'}"
                                 f"{' steps' if train['steps'] else ''}, batch {train['batch_size']:,}, lr "
                                 f"{train['lr']:g} (warm-up {train['warmup_steps']} steps, decay over the last "
                                 f"{train['decay_fraction']:.0%}), seed {train['seed']}"])
    commits = setup.get("commits")
    rows.append(["code", f"commit {', then '.join(commits)}" if commits else "commit not recorded"])
    if setup.get("machines"):  # studies recorded before it was kept have no row
        rows.append(["machine", ", then ".join(setup["machines"])])
    arm_rows = [[a.name, a.arm_id, a.architecture, a.d_sae, a.sparsity, a.dead_handling, ", ".join(a.studies),
                 a.status + (f" ({a.reason})" if a.reason else ""), a.steps, a.tokens, a.seconds] for a in record.arms]
    return ["## Setup", "", _md_table(["setting", "value"], rows), "",
            _md_table(["arm", "folder", "architecture", "d_sae", "sparsity", "dead handling", "studies", "status",
                       "steps", "tokens", "time (s)"], arm_rows), ""]


EXCERPT_ROWS = 12


def docs_excerpt(record: StudyRecord, results: list, kind: str, source_rows: list[list[str]],
                 timing: dict | None = None) -> str:
    """A docs page's block (visualization/generated.py) of a study: its findings, and for `results` its
    setup and its tables of at most EXCERPT_ROWS rows, as Markdown stamped with the commit the study
    ran at and today's date."""
    commits = ", then ".join(record.setup.get("commits") or ["(not recorded)"])
    machines = record.setup.get("machines")
    on = f" on {', then '.join(machines)}" if machines else ""
    lines = [f"*Generated on {time.strftime('%Y-%m-%d')} by `python run_experiments.py --report {record.study_id} "
             f"--docs FILE` from study `{record.study_id}`, which ran at commit {commits}{on}; do not edit by hand.*",
             "", *summary_lines(results), ""]
    if kind == "results":
        if timing:
            lines += [f"Time (the run's last process): {format_timing(timing)}.", ""]
        lines += setup_section(record, source_rows)[2:]
        for res in (r for r in results if r.in_docs):  # the tables of a row per arm, not those of a row per concept
            for table in res.tables.values():
                if len(table.rows) <= EXCERPT_ROWS:
                    lines += [f"**{res.name}: {table.title}**", "", _md_table(table.headers, table.rows), ""]
    return "\n".join(lines)
