"""Write the challenge files from a run's predictions: one validated JSON and one zip per track.

    python submit.py --run runs/NAME [--topk 1] [--out DIR] [--predictions DIR]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from entrep import rundir
from entrep.cli import console
from entrep.io import changed_since, folder_snapshot, kit_file, read_json
from entrep.submission import TRACK_TITLES, SubmissionError, rankings_to_submission, validate, write_submission


@dataclass(frozen=True)
class PredictionsMeta:
    """What submit.py reads of a predictions folder's meta.json."""
    raw: dict
    topk: int
    queries: dict
    labels: list
    test_dir: str
    galleries: dict  # track -> set of gallery images
    leak_names: list  # gallery images that are training images
    not_predicted: dict  # track -> why


def read_meta(pred: Path, at=None) -> PredictionsMeta:
    """A predictions folder's meta.json (`at(name)`: where to read it, io.folder_snapshot); a field of
    another type is one line naming the file."""
    meta_file = pred / rundir.PRED_META
    meta = read_json(at(rundir.PRED_META) if at else meta_file)
    with kit_file(meta_file):
        queries = meta["queries"]
        # per-track galleries; predictions of an older kit hold one gallery for both tracks
        galleries = {t: set(meta["galleries"][t] if "galleries" in meta else meta["gallery"])
                     for t in ("i2i", "t2i") if queries.get(t)}
        leak = meta.get("test_images_in_training", {})
        return PredictionsMeta(raw=meta, topk=int(meta["topk"]), queries=queries, labels=meta["labels"],
                               test_dir=meta["test_dir"], galleries=galleries,
                               leak_names=sorted(set(leak.get("by_name", [])) | set(leak.get("by_content", []))),
                               not_predicted=dict(meta.get("not_predicted", {})))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="submit.py", description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="the run (or blend) directory; optional when --predictions and --out are given")
    ap.add_argument("--topk", type=int, default=1, help="1: one image per query (the challenge form); >1: ranked lists")
    ap.add_argument("--out", help="output folder (default: RUN/submission)")
    ap.add_argument("--predictions", help="infer.py's output folder (default: RUN/predictions)")
    args = ap.parse_args(argv)
    if args.run is None and not (args.predictions and args.out):
        raise SubmissionError("give --run RUN, or both --predictions DIR and --out DIR")
    pred = Path(args.predictions) if args.predictions else Path(args.run) / rundir.PREDICTIONS
    if not (pred / rundir.PRED_META).is_file():
        raise SubmissionError(f"{pred}: no predictions; run infer.py --run {args.run or 'RUN'} --data TEST_DIR"
                              f"{' --out ' + str(pred) if args.predictions else ''} first")
    out = Path(args.out) if args.out else Path(args.run) / rundir.SUBMISSION
    with folder_snapshot(pred) as at:  # the set infer.py wrote as one unit, read as one (infer may be replacing it)
        meta = read_meta(pred, at)
        check_current(meta, pred, args.run)
        subs = read_submissions(pred, at, meta, args, out)
    if not subs:
        raise SubmissionError(f"{meta.test_dir} had no query lists (cls.csv, i2i.csv, t2i.csv)")
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    written = write_submission(subs, out)  # one unit: the folder holds this set, no other set's files
    if stale := sorted(before - {p.name for ps in written.values() for p in ps}):
        console.print(f"removed {len(stale)} files of an earlier predictions set: {', '.join(stale)}")
    from rich.table import Table

    t = Table(title=f"submission files (top-{args.topk})")
    for col in ("track", "queries", "json", "zip"):
        t.add_column(col)
    for track, (js, zp) in written.items():
        t.add_row(TRACK_TITLES[track], str(len(subs[track])), str(js), str(zp))
    console.print(t)
    return 0


def is_run_dir(path: Path) -> bool:
    return (path / rundir.CONFIG).is_file() or rundir.is_blend(path)


def check_current(meta: PredictionsMeta, pred: Path, run: str | None) -> None:
    """Predictions are answers of the run as it was: a file they were made from that has changed since
    (tuned.json re-tuned by a re-score or a re-blend, a fold retrained, a member replaced, the base
    weights swapped) makes them stale, refused in one line with the command that renews them."""
    made_from = meta.raw.get("made_from")
    if made_from is None:  # predictions of an older kit recorded nothing to compare
        return
    with kit_file(pred / rundir.PRED_META):
        recorded, files = Path(made_from["run"]), made_from["files"]
    # without --run: the run the predictions sit in (a copy or a moved run is its own), else the recorded one
    root = Path(run) if run else pred.parent if is_run_dir(pred.parent) else recorded
    if not is_run_dir(root):
        raise SubmissionError(f"{pred} was made from the run {recorded}, which is not there now; pass --run RUN "
                              f"(where it is) to check the predictions against it")
    renew = (f"renew it: python infer.py --run {root} --data {meta.test_dir}"
             f"{' --out ' + str(pred) if pred.resolve() != (root / rundir.PREDICTIONS).resolve() else ''}")
    if changed := changed_since(root, files, pred / rundir.PRED_META):
        gone = [p for p in changed if not (root / p).exists()]
        what = (f"{len(gone)} of the files it was made from are gone (e.g. {root / gone[0]})" if gone else
                f"{len(changed)} of the files it was made from changed since (e.g. {root / changed[0]})")
        made = "" if root.resolve() == recorded.resolve() else f" (made from {recorded}, checked against {root})"
        raise SubmissionError(f"{pred} is stale{made}: {what}; {renew}")


def read_submissions(pred: Path, at, meta: PredictionsMeta, args, out: Path) -> dict:
    """Each predicted track's submission at --topk, validated, from the predictions set (`at`); `out`, where
    they will go, is refused first if it is a file."""
    if args.topk > meta.topk:
        raise SubmissionError(f"--topk {args.topk}, but {pred} holds top-{meta.topk} rankings; re-run infer.py "
                              f"--run {args.run or 'RUN'} --data {meta.test_dir} infer.topk={args.topk}, or lower --topk")
    if out.exists() and not out.is_dir():
        raise SubmissionError(f"--out {out} is a file; give a folder (it will hold cls|i2i|t2i .json and .zip)")
    if meta.leak_names:
        console.print(f"warning: {len(meta.leak_names)} gallery images are also training images (e.g. "
                      f"{meta.leak_names[:3]}); answers may point at them (predictions/meta.json lists them)")
    for track, why in meta.not_predicted.items():
        console.print(f"no {track} submission: {why}")
    subs = {}
    if meta.queries.get("cls"):
        with kit_file(pred / rundir.PRED_CLASSES):
            df = pd.read_csv(at(rundir.PRED_CLASSES), keep_default_na=False).set_index("image")
            sub = {q: int(df.loc[meta.raw["on_disk"][q], "pred_idx"]) for q in meta.queries["cls"]}
        validate("cls", sub, meta.queries["cls"], n_classes=len(meta.labels))
        subs["cls"] = sub
    for track in ("i2i", "t2i"):
        if meta.queries.get(track):
            rankings = read_json(at(rundir.PRED_RANKINGS[track]))
            with kit_file(pred / rundir.PRED_RANKINGS[track]):
                sub = rankings_to_submission(rankings, args.topk)
            validate(track, sub, meta.queries[track], meta.galleries[track])
            subs[track] = sub
    return subs
