"""Write the challenge files from a run's predictions: one validated JSON and one zip per track.

    python submit.py --run runs/NAME [--topk 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from entrep import rundir
from entrep.cli import console
from entrep.submission import TRACK_TITLES, SubmissionError, rankings_to_submission, validate, write_track


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="submit.py", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--topk", type=int, default=1, help="1: one image per query (the challenge form); >1: ranked lists")
    ap.add_argument("--out", help="output folder (default: RUN/submission)")
    args = ap.parse_args(argv)
    pred = Path(args.run) / rundir.PREDICTIONS
    if not (pred / "meta.json").is_file():
        raise SubmissionError(f"{pred}: no predictions; run infer.py --run {args.run} --data TEST_DIR first")
    meta = json.loads((pred / "meta.json").read_text())
    if args.topk > meta.get("topk", args.topk):
        raise SubmissionError(f"--topk {args.topk}, but {pred} holds top-{meta['topk']} rankings; re-run infer.py "
                              f"--run {args.run} --data {meta['test_dir']} infer.topk={args.topk}, or lower --topk")
    out = Path(args.out) if args.out else Path(args.run) / rundir.SUBMISSION
    if out.exists() and not out.is_dir():
        raise SubmissionError(f"--out {out} is a file; give a folder (it will hold cls|i2i|t2i .json and .zip)")
    gallery = set(meta["gallery"])
    leak = meta.get("test_images_in_training", {})
    if leak_names := sorted(set(leak.get("by_name", [])) | set(leak.get("by_content", []))):
        console.print(f"warning: {len(leak_names)} gallery images are also training images (e.g. "
                      f"{leak_names[:3]}); answers may point at them (predictions/meta.json lists them)")
    written = []
    queries = meta["queries"]
    for track, why in meta.get("not_predicted", {}).items():
        console.print(f"no {track} submission: {why}")
    if queries.get("cls"):
        df = pd.read_csv(pred / "classes.csv", keep_default_na=False).set_index("image")
        sub = {q: int(df.loc[meta["on_disk"][q], "pred_idx"]) for q in queries["cls"]}
        validate("cls", sub, queries["cls"], n_classes=len(meta["labels"]))
        written.append(("cls", len(sub), *write_track("cls", sub, out)))
    for track in ("i2i", "t2i"):
        if queries.get(track):
            rankings = json.loads((pred / f"{track}.json").read_text(encoding="utf-8"))
            sub = rankings_to_submission(rankings, args.topk)
            validate(track, sub, queries[track], gallery)
            written.append((track, len(sub), *write_track(track, sub, out)))
    if not written:
        raise SubmissionError(f"{meta['test_dir']} had no query lists (cls.csv, i2i.csv, t2i.csv)")
    # one predictions set per folder: a track this test folder lacks must not leave another set's files
    stale = [p for track in TRACK_TITLES if track not in {w[0] for w in written}
             for p in (out / f"{track}.json", out / f"{track}.zip") if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        console.print(f"removed {len(stale)} files of an earlier predictions set: {', '.join(p.name for p in stale)}")
    from rich.table import Table

    t = Table(title=f"submission files (top-{args.topk})")
    for col in ("track", "queries", "json", "zip"):
        t.add_column(col)
    for track, n, js, zp in written:
        t.add_row(TRACK_TITLES[track], str(n), str(js), str(zp))
    console.print(t)
    return 0
