"""A run directory's files by name, and what a folder is: a training run (config.yaml), a blend of
runs (blend.json), or neither. Every module that reads or writes these names takes them from here."""
from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"         # the run's defining config, written once
IDENTITY = "run.json"          # the data (per image) and effective batch the run trains on, written once
FOLDS = "folds.csv"            # the frozen folds
REPORT = "report.json"         # out-of-fold figures (written last by the report)
TUNED = "tuned.json"           # inference settings tuned on all folds, for infer.py
OOF_TABLE = "oof.csv"          # every labelled image's OOF class probabilities
TIMING = "timing.json"         # wall time per stage of each train.py call
BLEND = "blend.json"           # a blend directory's members
PREDICTIONS = "predictions"    # infer.py's output folder (default)
SUBMISSION = "submission"      # submit.py's output folder (default)


def is_blend(path: str | Path) -> bool:
    return (Path(path) / BLEND).is_file()

