"""Classification metrics via scikit-learn; Recall@k and MRR for rankings with relevant *sets*."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

KS = (1, 5, 10)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str],
                           present_only: bool = False) -> dict:
    """Accuracy, macro and weighted precision/recall/F1, per class, confusion. `present_only`: the
    macro and weighted averages cover the classes present in y_true only (a fold's own figures)."""
    labels = list(range(len(names)))
    averaged = sorted({int(v) for v in y_true}) if present_only else labels
    out = {"accuracy": float(accuracy_score(y_true, y_pred)), "n": int(len(y_true))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=averaged, average=avg, zero_division=0)
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, n in enumerate(names)}
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def f1_macro(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """classification_metrics' f1_macro in one scikit-learn call instead of five: what the tuning and
    blending grids maximise, hundreds of times per run."""
    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def first_hit_rank(ranking: Sequence[str], relevant: set) -> int | None:
    """1-based rank of the first relevant item, None when the list holds none."""
    for r, item in enumerate(ranking, 1):
        if item in relevant:
            return r
    return None


def retrieval_metrics(rankings: Sequence[Sequence[str]], relevant: Sequence[set], ks=KS, groups=None) -> dict:
    """Recall@k: share of queries with a relevant item in the top k. MRR: mean 1/rank of the first
    relevant item (0 when the ranking holds none). Queries with an empty relevant set are an error.
    `groups` (one hashable key per query): each group's queries are averaged first, then the groups
    equally (t2i per caption: a caption carried by k images is k queries that weigh one caption)."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings but {len(relevant)} relevant sets")
    if any(not r for r in relevant):
        raise ValueError("a query has no relevant item; drop it before scoring")
    ranks = [first_hit_rank(rk, rel) for rk, rel in zip(rankings, relevant)]
    n = len(ranks)
    if n == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, "mrr": float("nan"), "n_queries": 0}
    if groups is None:
        out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
        out["mrr"] = float(np.mean([1.0 / r if r else 0.0 for r in ranks]))
        out["n_queries"] = n
        return out
    if len(groups) != n:
        raise ValueError(f"{n} rankings but {len(groups)} group keys")
    index: dict = {}
    inv = np.array([index.setdefault(g, len(index)) for g in groups])
    size = np.bincount(inv)
    hit = np.array([r or 0 for r in ranks])

    def per_group(x):  # the mean within each group, then over groups
        return float(np.mean(np.bincount(inv, weights=x) / size))

    out = {f"recall@{k}": per_group(((hit > 0) & (hit <= k)).astype(float)) for k in ks}
    out["mrr"] = per_group(np.where(hit > 0, 1.0 / np.maximum(hit, 1), 0.0))
    out["n_queries"] = n
    out["n_groups"] = len(size)
    return out
