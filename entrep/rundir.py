"""A run directory's files by name, run-level and per fold, and whether a folder is a blend
(blend.json). Every module that reads or writes these names takes them from here."""
from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"         # the run's defining config, written once
IDENTITY = "run.json"          # the data (per image) and effective batch the run trains on, written once
FOLDS = "folds.csv"            # the frozen folds
REPORT = "report.json"         # out-of-fold figures (written last by the report)
TUNED = "tuned.json"           # inference settings tuned on all folds, for infer.py
OOF_TABLE = "oof.csv"          # every labelled image's OOF class probabilities
FAILURES = "failures.json"     # the worst OOF retrieval queries per track, with their top 5 (for the page)
PAGE = "report.html"           # the report as one self-contained page (entrep/page.py)
TIMING = "timing.json"         # wall time per stage of each train.py call
BLEND = "blend.json"           # a blend directory's members
PREDICTIONS = "predictions"    # infer.py's output folder (default)
SUBMISSION = "submission"      # submit.py's output folder (default)

# in a fold folder (fold0/, fold1/, ...; fold-1/ for the all-data model)
ADAPTER_DIR = "adapter"        # peft's save_pretrained folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KIT_FILE = "kit.safetensors"   # the kit's own trained tensors (head, fusion, scales; unfrozen blocks)
META_FILE = "meta.json"        # what the weights were trained as (model, labels, LoRA)
METRICS_FILE = "metrics.json"  # written last: marks the fold finished
HISTORY = "history.csv"        # per-epoch rows
OOF_FILE = "oof.npz"           # the held-out images' outputs (entrep/oof.py)
MEMORY_FILE = "memory.npz"     # the t2i known-pair memory (entrep/memory.py)

# in a predictions folder (infer.py's output, written as one unit)
PRED_CLASSES = "classes.csv"   # every test image's class probabilities
PRED_RANKINGS = {"i2i": "i2i.json", "t2i": "t2i.json"}
PRED_META = "meta.json"        # queries, galleries, settings, what they were made from: what submit.py needs
PRED_FILES = (PRED_CLASSES, *PRED_RANKINGS.values(), PRED_META)  # the set, written and read as one unit


def is_blend(path: str | Path) -> bool:
    return (Path(path) / BLEND).is_file()

