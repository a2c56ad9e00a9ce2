"""Every run and blend under a folder, as one table.

    python -m entrep.runs [DIR] [--sort COLUMN] [--csv FILE]
    python -m entrep.runs --diff RUN_A RUN_B

DIR (default runs/) is searched for report.json, ablation rungs included. Each row: the OOF figures
per track as the mean over folds +- their standard deviation (the noise band a difference must beat;
the pooled figure is in each report), the backbone, the recipe switches that differ between the listed
runs, the wall time of the last train.py call (a re-score is a call), and the report's date. --sort
takes any column (the figures sort by their mean, best first). --diff lists the config keys that differ
between two runs, and both runs' pooled figures side by side.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path

import pandas as pd
from rich.table import Table

from entrep import rundir
from entrep.cli import console
from entrep.config import flat_dict, load_config, recipe_switches, to_dict
from entrep.errors import EntrepError
from entrep.io import atomic_write_csv, kit_file, read_json
from entrep.page import fold_spread, fold_values

FIGURES = {"accuracy": ("classification", "accuracy"), "f1_macro": ("classification", "f1_macro"),
           "i2i_mrr": ("i2i", "mrr"), "t2i_mrr": ("t2i", "mrr")}
SEARCH_DEPTH = 3  # runs/<name>, runs/<name>_ablation/<rung>, and one level more


def find_runs(root: Path) -> list[Path]:
    found = [p.parent for depth in range(SEARCH_DEPTH + 1) for p in root.glob("/".join(["*"] * depth + [rundir.REPORT]))]
    return sorted(set(found))


def describe_run(run: Path, root: Path) -> dict:
    """One row: figures with their fold spread, what the run is, and its recipe switches."""
    rep = read_json(run / rundir.REPORT)
    mean, std = fold_spread(fold_values(rep, list(FIGURES.values())))
    row = {"run": str(run.relative_to(root)) if run.is_relative_to(root) else str(run),
           "kind": "blend" if rundir.is_blend(run) else "run", "folds": len(rep.get("folds", []))}
    for (name, _), m, s in zip(FIGURES.items(), mean, std):
        row[name], row[f"{name}_std"] = m, s
    row["switches"], row["backbone"] = {}, "?"
    if row["kind"] == "blend":
        row["backbone"] = f"{len(read_json(run / rundir.BLEND)['members'])} members"
    elif (run / rundir.CONFIG).is_file():
        row["switches"] = recipe_switches(load_config(run / rundir.CONFIG))
        row["backbone"] = row["switches"].pop("model")
    timing = read_json(run / rundir.TIMING) if (run / rundir.TIMING).is_file() else {}
    row["wall_s"] = timing.get("total_s", math.nan)
    row["date"] = dt.datetime.fromtimestamp((run / rundir.REPORT).stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return row


def runs_table(root: Path) -> pd.DataFrame:
    """Every run under `root`, one row each; `recipe` holds the switches that differ between them. A run
    whose files cannot be read is a row saying why, not the end of the table."""
    rows = []
    for run in find_runs(root):
        try:
            with kit_file(run):  # a field of another type in its files (a hand edit): this row says so
                rows.append(describe_run(run, root))
        except EntrepError as e:
            rows.append({"run": str(run.relative_to(root)), "kind": "unreadable", "folds": 0, "backbone": "?",
                         **{f: math.nan for f in FIGURES}, **{f"{f}_std": math.nan for f in FIGURES},
                         "switches": {}, "wall_s": math.nan, "date": "", "note": str(e)})
    if not rows:
        return pd.DataFrame()
    have = [r["switches"] for r in rows if r["switches"]]
    keys = list(dict.fromkeys(k for s in have for k in s))
    differ = [k for k in keys if len({s.get(k) for s in have}) > 1]
    for r in rows:
        r["recipe"] = r.pop("note", None) or "; ".join(f"{k} {r['switches'][k]}" for k in differ if k in r["switches"])
        del r["switches"]
    return pd.DataFrame(rows)


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def show(table: pd.DataFrame, root: Path) -> None:
    t = Table(title=f"runs under {root}: OOF figures, mean ± std over folds", title_justify="left")
    for col in ("run", "kind", "backbone", "folds", *FIGURES, "recipe", "wall", "date"):
        t.add_column(col, justify="right" if col in FIGURES or col in ("folds", "wall") else "left",
                     overflow="fold")
    for r in table.to_dict("records"):
        wall = "-" if math.isnan(r["wall_s"]) else f"{r['wall_s'] / 60:.1f} min"
        t.add_row(r["run"], r["kind"], str(r.get("backbone", "")), str(r["folds"]),
                  *[_cell(r[f], r[f"{f}_std"]) for f in FIGURES], r["recipe"], wall, r["date"])
    console.print(t)


def diff(a: Path, b: Path) -> None:
    """Config keys and pooled figures that differ between two runs (or blends)."""
    def config(run):
        return flat_dict(to_dict(load_config(run / rundir.CONFIG))) if (run / rundir.CONFIG).is_file() else {}

    def figures(run):
        rep = read_json(run / rundir.REPORT)
        return {f"{p} {m}": (rep.get(p) or {}).get(m) for p, m in [*FIGURES.values(), ("i2i", "recall@1"),
                                                                   ("t2i", "recall@1")]}

    t = Table(title=f"{a} vs {b}", title_justify="left")
    for col in ("", str(a), str(b)):
        t.add_column(col, overflow="fold")
    ca, cb = config(a), config(b)
    for k in sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k) and k not in ("name",)):
        t.add_row(k, str(ca.get(k, "-")), str(cb.get(k, "-")))
    fa, fb = figures(a), figures(b)
    for k in fa:
        t.add_row(f"[b]{k}[/b]", *[("-" if v is None else f"{v:.4f}") for v in (fa[k], fb[k])])
    console.print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.runs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default="runs", help="the folder the runs are under (default: runs)")
    ap.add_argument("--sort", default="date", help="a column: run, kind, backbone, folds, "
                                                   f"{', '.join(FIGURES)}, wall_s, date (default)")
    ap.add_argument("--csv", help="also write the table to this CSV file")
    ap.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"), help="two runs' differences instead of the table")
    args = ap.parse_args(argv)
    if args.diff:
        for run in map(Path, args.diff):
            if not (run / rundir.REPORT).is_file():
                raise EntrepError(f"{run}: no {rundir.REPORT}; --diff compares finished runs or blends")
        diff(*map(Path, args.diff))
        return 0
    root = Path(args.dir)
    if not root.is_dir():
        raise EntrepError(f"{root}: not a folder (the folder your runs are under, default runs/)")
    table = runs_table(root)
    if table.empty:
        raise EntrepError(f"{root}: no run or blend with a {rundir.REPORT} under it")
    if args.sort not in table:
        raise EntrepError(f"--sort {args.sort}: not a column; one of {', '.join(c for c in table if c != 'recipe')}")
    table = table.sort_values(args.sort, ascending=args.sort not in FIGURES, na_position="last", kind="stable")
    show(table, root)
    if args.csv:
        atomic_write_csv(args.csv, table)
    return 0
