"""Score a submission JSON against a ground-truth JSON, for any track.

    python -m entrep.score --track {cls,i2i,t2i} --submission S.json --truth T.json [--json]

Truth: Track 1 `{image: class index}`; Tracks 2/3 `{query: image}` or `{query: [relevant images]}`.
Submission: the challenge format; Tracks 2/3 accept a top-1 name or a ranked list per query.
A query missing from the submission counts as wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from entrep.labels import ENTREP_CLASSES
from entrep.metrics import classification_metrics, retrieval_metrics
from entrep.submission import TRACKS


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected a JSON object")
    return data


def score(track: str, sub: dict, truth: dict, names=ENTREP_CLASSES) -> dict:
    missing = [q for q in truth if q not in sub]
    if track == "cls":
        keys = list(truth)
        y_pred = [sub[k] if isinstance(sub.get(k), int) else -1 for k in keys]
        out = classification_metrics([truth[k] for k in keys], y_pred, [str(n) for n in names])
        out.pop("per_class")
    else:
        rankings = [sub.get(q, []) if isinstance(sub.get(q, []), list) else [sub[q]] for q in truth]
        relevant = [set(v) if isinstance(v, list) else {v} for v in truth.values()]
        out = retrieval_metrics(rankings, relevant)
    out["missing"] = len(missing)
    out["extra"] = len([q for q in sub if q not in truth])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrep.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", required=True, choices=list(TRACKS))
    ap.add_argument("--submission", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = ap.parse_args(argv)
    result = score(args.track, _load(args.submission), _load(args.truth))
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.table import Table

    from entrep.cli import make_console

    t = Table(title=f"{TRACKS[args.track]}: {args.submission}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if k != "confusion":
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    make_console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
