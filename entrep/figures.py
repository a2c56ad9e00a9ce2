"""The run's (or blend's) report: report.json with every figure out of fold, oof.csv, tuned.json
and the plots. Figures come from folds scored with settings chosen without them (entrep/tuning.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from entrep import rundir
from entrep.io import FileSet, atomic_files
from entrep.metrics import first_hit_rank, retrieval_metrics
from entrep.oof import (OOF_TOPK, RELEVANCE, RETRIEVAL_TRACKS, FoldOOF, FoldView, pooled_classification, pooled_metrics,
                        track_rankings)
from entrep.page import write_page_into
from entrep.tuning import Scored, crossfit, tune

HOW = {
    "classification": "pooled over folds: each image predicted by the fold model that never saw it, trained a "
                      "fixed train.epochs (no epoch picked on it), TTA as configured, head_weight tuned on the "
                      "other folds' OOF predictions (cross-fitted)",
    "i2i": "pooled over folds: queries and gallery from one held-out fold; slerp alpha and re-ranking tuned on the "
           "other folds' i2i MRR (cross-fitted)",
    "t2i": "pooled over folds: (caption, image) pairs as queries and the gallery from one held-out fold, one "
           "target per query, averaged per caption and then over captions (a fold's caption weighs once, as each "
           "of the leaderboard's captions is one query); slerp alpha, WiSE scale, memory weight and re-ranking "
           "tuned on the other folds' t2i MRR under the same rule (cross-fitted)",
    "t2i_pairs": "the same rankings, every (caption, image) pair weighed once: a caption carried by k images counts "
                 "k times; shown for comparison, optimised by nothing",
    "t2i_any": "the same rankings scored by the easier any-carrier rule; shown for comparison, optimised by nothing",
    "per_fold": "folds[k].classification averages macro F1 over the classes present in fold k's truth (a class "
                "absent from a fold would otherwise count as F1 0); the pooled figures cover every class",
    "folds": "stratified by class, grouped by the union of i2i components, patient ids and near-duplicate "
             "clusters (cv.near_dup: aligned correlation, so motion does not split them)",
    "tuned": "tuned.json: the same tuning on all folds, for infer.py; it scores none of these figures",
}


def score_folds(scored: dict[int, Scored], table, names) -> dict:
    """The report's figures: per fold, and pooled over folds (classification over every labelled image,
    retrieval over every fold's queries). t2i follows the challenge's one-target rule weighed per
    caption; t2i_pairs (every pair once) and t2i_any (the easier any-carrier rule) stand beside it."""
    figures = {"classification": pooled_classification({k: s.view for k, s in scored.items()}, table, names)}
    parts = (*RETRIEVAL_TRACKS, "t2i_pairs", "t2i_any")
    per_fold: dict[str, dict] = {t: {} for t in parts}
    rows = []
    for k, s in sorted(scored.items()):
        row = {"fold": k, "n_images": len(s.view.images), "settings": s.settings}
        c = pooled_classification({k: s.view}, table, names, present_only=True)
        row["n_labelled"] = c.get("n", 0)
        if c:
            row["classification"] = {m: c[m] for m in ("accuracy", "f1_macro", "f1_weighted")}
        for part in parts:
            track = "i2i" if part == "i2i" else "t2i"
            per_fold[part][k] = ranked = track_rankings(s.view, table, track, s.rerank[track], rule=part)
            if ranked.rankings:
                row[part] = retrieval_metrics(ranked.rankings, ranked.relevant, groups=ranked.groups)
        rows.append(row)
    for part in parts:
        figures[part] = (pooled_metrics(per_fold[part]) or {"n_queries": 0}) | {"relevance": RELEVANCE[part]}
    figures["folds"] = rows
    return figures


def oof_table(views: dict[int, FoldView], table, names) -> pd.DataFrame:
    """Every labelled image's OOF class probabilities, as scored in the report."""
    rows = []
    label_of = dict(zip(table["image"], table["label"]))
    for k, v in sorted(views.items()):
        for n, p in zip(v.images, v.probs):
            if pd.isna(label_of[n]):
                continue  # unlabelled images have embeddings in the fold's oof.npz, no class to score
            rows.append({"image": n, "fold": k, "label": label_of[n], "pred": names[int(p.argmax())],
                         **{f"p_{c}": float(x) for c, x in zip(names, p)}})
    return pd.DataFrame(rows)


WORST_QUERIES = 8  # per retrieval track, in failures.json


def worst_queries(scored: dict[int, Scored], table, n: int = WORST_QUERIES) -> dict:
    """Per retrieval track, the n OOF queries whose first right answer ranks lowest (none in the top
    OOF_TOPK first), each with its fold, top 5 and right answers: the page's retrieval failures. A t2i
    caption carried by several images appears once, with its worst target."""
    out = {}
    for track in RETRIEVAL_TRACKS:
        cases = {}
        for k, s in sorted(scored.items()):
            ranked = track_rankings(s.view, table, track, s.rerank[track])
            for query, ranking, relevant in zip(ranked.queries, ranked.rankings, ranked.relevant):
                rank = first_hit_rank(ranking, relevant)
                case = {"fold": k, "query": query, "rank": rank, "top": list(ranking[:5]),
                        "relevant": sorted(relevant)}
                key, badness = (k, query), OOF_TOPK + 1 if rank is None else rank
                if key not in cases or badness > cases[key][0]:
                    cases[key] = (badness, case)
        # worst first; among equally bad ones, the folds in turn (not all of fold 0's first)
        turn = {key: i for k in scored for i, key in enumerate(x for x in cases if x[0] == k)}
        worst = sorted(cases.items(), key=lambda kv: (-kv[1][0], turn[kv[0]], kv[0][0]))[:n]
        out[track] = [c for _, (_, c) in worst]
    return out


VERSIONED = ("torch", "torchvision", "open_clip_torch", "timm", "peft", "accelerate", "transformers", "numpy",
             "scipy", "scikit-learn", "pandas", "pillow")


def package_versions() -> dict[str, str]:
    """The versions a report was made with: the same commit gives other figures under other versions
    (peft 0.21 -> 0.22 moved the demo's accuracy by 0.03-0.05)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def image_paths(table) -> dict[str, Path]:
    """Image name -> file, for the page's thumbnails (none for a table without files)."""
    return dict(zip(table["image"], map(Path, table["path"]))) if "path" in table else {}


PLOTS = ("confusion_matrix.png", "per_class_f1.png")


def plots(files: FileSet, cls: dict, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(cls["confusion"])
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 1 + 0.7 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("out-of-fold confusion matrix")
    _save_fig(fig, files.path(PLOTS[0]))
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 3))
    ax.bar(names, [cls["per_class"][n]["f1"] for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (out of fold)")
    ax.tick_params(axis="x", rotation=45)
    _save_fig(fig, files.path(PLOTS[1]))


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def crossfit_figures(oof: dict[int, FoldOOF], table, names, cfg) -> tuple[dict, dict[int, Scored]]:
    """(figures, scored folds): every fold scored with settings tuned on the other folds."""
    scored = crossfit(oof, table, names, cfg)
    return score_folds(scored, table, names) | {"how": HOW}, scored


def write_report(run_dir: Path, oof: dict[int, FoldOOF], table, names, cfg, extra: dict | None = None) -> dict:
    """A run's report from its folds' OOF files: cross-fitted figures, and tuned.json from all folds;
    `extra` (e.g. the pseudo-labels each fold trained with) goes into report.json as it is."""
    figures, scored = crossfit_figures(oof, table, names, cfg)
    tuned = tune(oof, table, names, cfg) | {"how": HOW["tuned"]}
    with atomic_files(run_dir) as files:
        write_scored(files, figures | (extra or {}) | {"tuned": tuned}, tuned, scored, table, names)
        write_page_into(files, image_paths(table))
    return figures | (extra or {}) | {"tuned": tuned}


def write_scored(files: FileSet, figures: dict, tuned: dict, scored: dict[int, Scored], table, names) -> dict:
    """tuned.json, oof.csv, report.json, failures.json and the plots of a run or a blend, into `files` (io.atomic_files:
    the set is replaced as one unit, so tuned.json never disagrees with the report beside it)."""
    files.write_json(rundir.TUNED, tuned)
    files.write_csv(rundir.OOF_TABLE, oof_table({k: s.view for k, s in scored.items()}, table, names))
    files.write_json(rundir.REPORT, figures | {"versions": package_versions()})
    files.write_json(rundir.FAILURES, worst_queries(scored, table))
    if figures["classification"]:
        plots(files, figures["classification"], names)
    else:  # no plot of this report: an earlier report's must not stay beside it
        for name in PLOTS:
            files.remove(name)
    return figures
