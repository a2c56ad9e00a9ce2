"""Blend finished runs that share folds, with weights chosen out of fold; the blend directory is used
by infer.py and submit.py like a run directory.

    python -m entrep.blend --runs runs/A runs/B [...] --name NAME [--data DIR] [--rounds 20]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from entrep import rundir
from entrep.cli import console, setup_logging
from entrep.config import load_config, validate_run_name
from entrep.errors import EntrepError
from entrep.io import exclusive_run, read_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.blend", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--runs", nargs="+", required=True, help="finished run directories (all folds and report.json)")
    ap.add_argument("--name", required=True, help="the blend directory: OUTPUT_DIR/NAME")
    ap.add_argument("--output-dir", help="where the blend directory goes (default: the first run's parent)")
    ap.add_argument("--data", help="the training release (default: the first run's data.root); relevance and "
                                   "labels come from its annotations")
    ap.add_argument("--rounds", type=int, default=20,
                    help="ensemble-selection rounds, one pick each; a member's weight is its share of the picks "
                         "in the best bag (default 20)")
    args = ap.parse_args(argv)
    setup_logging()
    validate_run_name(args.name)
    if len(args.runs) < 2:
        raise EntrepError(f"--runs {' '.join(args.runs)}: a blend needs at least two runs")
    if args.rounds < 1:
        raise EntrepError(f"--rounds {args.rounds}: at least 1")
    out = Path(args.output_dir or Path(args.runs[0]).parent) / args.name
    if (out.parent / rundir.CONFIG).is_file() or rundir.is_blend(out.parent):
        raise EntrepError(f"--output-dir {out.parent} is a run (or blend) directory: the blend would be written "
                          f"among its own files ({out}); give the folder that holds the runs, e.g. --output-dir "
                          f"{out.parent.parent}")
    if (out / rundir.CONFIG).is_file():
        raise EntrepError(f"{out} is a training run; give the blend another --name")
    from entrep.ensemble import blend, load_members, member_refs  # the model stack, once args are good
    from entrep.labels import LabelSet

    if (out / rundir.BLEND).is_file():
        had = read_json(out / rundir.BLEND).get("members")
        now = member_refs(args.runs, out)
        if had != now:
            raise EntrepError(f"{out} is a blend of {had}; give a blend of {now} another --name")
    members, folds = load_members(args.runs)  # every refusal before anything is written
    labels = LabelSet.from_config(members[0].cfg.labels)
    root = args.data or members[0].cfg.data.root
    if not Path(root).is_dir():
        raise EntrepError(f"{root}: the training release is not there (the first run's data.root); pass --data DIR")
    from entrep.training import read_training_release

    # the release as the members' training read it (skips, unlabelled conflicts): what they were scored on
    table = read_training_release(load_config(members[0].run / rundir.CONFIG, [f"data.root={root}"]), labels)
    with exclusive_run(out, "blend"):
        report = blend(members, folds, out, table, list(labels.names), args.rounds)
    print_blend(report, out)
    return 0


def figure_row(r: dict) -> list[str]:
    c = r.get("classification", {})
    cells = [c.get("accuracy"), c.get("f1_macro")]
    for t in ("i2i", "t2i"):
        cells += [r.get(t, {}).get("recall@1"), r.get(t, {}).get("mrr")]
    return ["-" if x is None else f"{x:.4f}" for x in cells]


def print_blend(report: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title="out-of-fold scores: members and blend")
    for col in ("", "accuracy", "f1_macro", "i2i R@1", "i2i MRR", "t2i R@1", "t2i MRR"):
        t.add_column(col, justify="left" if not col else "right")
    for run, figures in report["members"].items():
        t.add_row(run, *figure_row(figures))
    t.add_row(f"blend {out.name}", *figure_row(report), style="bold")
    w = report["tuned"]["weights"]
    members = list(report["members"])
    t.caption = (f"{out}. Every figure cross-fitted (report.json 'how'). Weights for infer.py, chosen on all folds: "
                 + "; ".join(f"{part} " + ", ".join(f"{Path(m).name} {x:.2f}" for m, x in zip(members, w[part]))
                             for part in ("cls", "i2i", "t2i"))
                 + ". A weight is a member's share of the selection's picks, not its importance: a member with "
                   "near-uniform probabilities can take a large weight and count for little (report.html sets "
                   "each weight beside the member's own figures)")
    console.print(t)
