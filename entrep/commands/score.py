"""Score a submission against its ground truth, for any track.

    python -m entrep.score --submission cls.zip --truth TRUTH_DIR [--json]
    python -m entrep.score --track {cls,i2i,t2i} --submission S.json --truth T.json [--json]

Submission: one JSON, the challenge's zip, or a folder, of JSONs named by track (cls.json, i2i.json,
t2i.json); every track found is scored. Truth: one JSON (one track), or a folder holding one truth
JSON per track, found by name (*cls*.json, *i2i*.json, *t2i*.json, e.g. the demo's truth/).
Truth: Track 1 `{image: class index}`; Tracks 2/3 `{query: image}` or `{query: [relevant images]}`.
Tracks 2/3 accept a top-1 name or a ranked list per query. A query missing from the submission
counts as wrong. --json prints one JSON object: the figures of a single JSON submission, or
{track: figures} for a zip or folder.
"""
from __future__ import annotations

import argparse
import json
import math
import zipfile
from pathlib import Path

from rich.table import Table

from entrep.cli import make_console
from entrep.leaderboard import read_submission, read_truth, score
from entrep.submission import TRACK_TITLES


def _strict(result: dict) -> dict:
    """Strict JSON: a figure that does not exist is null, never NaN."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", choices=list(TRACK_TITLES),
                    help="the track of a single JSON not named by track; restricts a zip or folder to it")
    ap.add_argument("--submission", required=True, help="a track JSON, the challenge's zip, or a folder of JSONs")
    ap.add_argument("--truth", required=True, help="a truth JSON, or a folder of one truth JSON per track")
    ap.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = ap.parse_args(argv)
    err = make_console(stderr=True)  # warnings on stderr: --json keeps stdout one JSON object
    subs = read_submission(args.submission, args.track)
    truths = read_truth(args.truth, list(subs))
    results = {}
    for track, (where, sub) in subs.items():
        results[track] = score(track, sub, truths[track][1],
                               warn=lambda msg, t=track: err.print(f"warning: {t}: {msg}", highlight=False,
                                                                   soft_wrap=True, markup=False))
    single = Path(args.submission).is_file() and not zipfile.is_zipfile(args.submission)
    if args.json:
        out = _strict(results[next(iter(results))]) if single else {t: _strict(r) for t, r in results.items()}
        print(json.dumps(out, allow_nan=False))
        return 0
    console = make_console()
    for track, result in results.items():
        t = Table(title=TRACK_TITLES[track])
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in result.items():
            if k != "confusion":
                t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        sub = subs[track][1]
        if track != "cls" and sub and all(isinstance(a, str) or len(a) == 1 for a in sub.values()):
            t.caption = "one answer per query (the challenge's top-1 form): R@5, R@10 and MRR equal R@1"
        console.print(t)
        # the paths on a line of their own: in the title (or caption) a long path wrapped mid-word
        console.print(f"{subs[track][0]} against {truths[track][0]}", soft_wrap=True, highlight=False, markup=False)
    return 0
